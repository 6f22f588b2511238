"""V2PE: variable visual position encoding.

Text tokens advance the position by 1; every visual token of an image advances it by that image's
``delta`` (<= 1). The first text token after an image continues at ceil(last visual position) + 1.
With delta = 1 this is exactly 0, 1, 2, ... Positions restart at 0 for each packed sample.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

# delta = stride / 256, stride in {1, 2, 4, ..., 256}
V2PE_DELTAS = tuple(2**i / 256 for i in range(9))


def sample_deltas(num_images: int, generator: Optional[torch.Generator] = None) -> list[float]:
    """Draw one delta per image uniformly from {1/256, ..., 1} (training-time V2PE)."""
    idx = torch.randint(len(V2PE_DELTAS), (num_images,), generator=generator)
    return [V2PE_DELTAS[i] for i in idx.tolist()]


def v2pe_positions_1d(input_ids: Sequence[int], img_context_id: int, deltas: Sequence[float] | float = 1.0) -> list[float]:
    """Positions of one sample. Each maximal run of ``img_context_id`` is one image; ``deltas`` is
    one float per image (or one float for all)."""
    pos: list[float] = []
    p = -1.0
    prev_visual = False
    image = -1
    for t in input_ids:
        if t == img_context_id:
            if not prev_visual:
                image += 1
            d = deltas if isinstance(deltas, (int, float)) else deltas[image]
            p = p + d
            prev_visual = True
        else:
            p = (math.ceil(p) if prev_visual else p) + 1.0
            prev_visual = False
        pos.append(p)
    if not isinstance(deltas, (int, float)) and image + 1 != len(deltas):
        raise ValueError(f"V2PE: {image + 1} images in the sample but {len(deltas)} deltas given")
    return pos


def v2pe_position_ids(input_ids: torch.Tensor, img_context_id: int, delta: float = 1.0,
                      cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float position ids ``[B, S]`` for a batch; each segment of ``cu_seqlens`` (over the flattened
    tokens) restarts at 0. Without ``cu_seqlens`` each row is one sample. Fixed ``delta``."""
    B, S = input_ids.shape
    flat = input_ids.reshape(-1).tolist()
    if cu_seqlens is None:
        bounds = [i * S for i in range(B + 1)]
    else:
        bounds = cu_seqlens.tolist()
    out: list[float] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out.extend(v2pe_positions_1d(flat[a:b], img_context_id, delta))
    return torch.tensor(out, dtype=torch.float32).view(B, S)
