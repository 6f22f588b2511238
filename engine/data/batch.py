"""The data contract between the loader, the packer and the model.

A ``Sample`` is one tokenised conversation or text document (with its image tiles).
A ``PackedBatch`` is ``[rows, seq]`` tokens holding several samples per row; sample
boundaries are ``cu_seqlens`` over the flattened ``rows*seq`` tokens (padding at the end of
a row forms its own segment), so attention never crosses samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional

import torch

IGNORE_INDEX = -100


def token_weight(num_targets: int, mode: str) -> float:
    """Loss weight of each supervised token of a sample with ``num_targets`` of them: ``token`` 1,
    ``sample`` 1/n, ``square`` 1/sqrt(n) (InternVL3's square averaging)."""
    if num_targets <= 0:
        return 0.0
    if mode == "token":
        return 1.0
    if mode == "sample":
        return 1.0 / num_targets
    if mode == "square":
        return 1.0 / math.sqrt(num_targets)
    raise ValueError(f"loss reduction {mode!r} must be token, sample or square")


@dataclass
class Sample:
    input_ids: torch.Tensor  # [L] int64
    labels: torch.Tensor  # [L] int64, aligned with input_ids; IGNORE_INDEX where not supervised
    pixel_values: Optional[torch.Tensor] = None  # [tiles, 3, H, W]
    image_tiles: list[int] = field(default_factory=list)  # tiles per image, in prompt order
    source: str = ""  # "file:line" for messages
    kind: str = "multimodal"  # multimodal | text
    index: int = -1  # position in the global sample order (seeds per-sample randomness)
    tile_ids: Optional[list[int]] = None  # the tiles ``pixel_values`` holds (None: all, in order)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_tiles(self) -> int:
        return int(sum(self.image_tiles))

    @property
    def num_targets(self) -> int:
        """Supervised next-token targets (labels shifted by one inside the sample)."""
        return int((self.labels[1:] != IGNORE_INDEX).sum())


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, S] int64
    targets: torch.Tensor  # [B, S] int64: next token inside the sample, IGNORE_INDEX elsewhere
    loss_weights: torch.Tensor  # [B, S] float32, 0 where target is ignored
    position_ids: torch.Tensor  # [B, S] float32 (V2PE positions, restart at 0 per sample)
    cu_seqlens: torch.Tensor  # [segments+1] int32 over the flattened B*S tokens
    pixel_values: Optional[torch.Tensor] = None  # [tiles, 3, H, W], consumed in order
    image_tiles: Optional[torch.Tensor] = None  # [images] int64 tiles per image
    num_samples: int = 0
    text_tokens: int = 0  # non-visual, non-padding tokens
    visual_tokens: int = 0

    @property
    def max_seqlen(self) -> int:
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max()) if self.cu_seqlens.numel() > 1 else 0

    @property
    def num_tiles(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])

    def to(self, device, dtype: Optional[torch.dtype] = None) -> "PackedBatch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=True)
                if f.name == "pixel_values" and dtype is not None:
                    v = v.to(dtype)
            out[f.name] = v
        return PackedBatch(**out)
