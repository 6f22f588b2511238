"""Head (Ulysses) parallelism and the token split it relies on.

The hp ranks of a group each hold a contiguous slice of the tokens (dim 1 of ``[B, S, C]``)
everywhere except inside the attention core: there an all-to-all turns ``[B, S/hp, heads, D]``
into ``[B, S, heads/hp, D]``, the core runs on the full sequence with the full ``cu_seqlens`` /
mask (packed samples stay apart), and a second all-to-all brings the result back. Rotary is
applied before the exchange on the local tokens with their own positions.
With sequence parallelism the hp slice is split once more over tp.

LLM: ``shard_batch`` cuts a ``PackedBatch`` (``S`` must be a multiple of the split degree:
pack with ``pad_to_multiple``). ViT: every tile's ``1 + patches`` tokens are padded with zero
tokens to a multiple of the degree and split the same way; padded tokens form their own
attention segment, so real tokens never see them, and are dropped after the last layer.
(Splitting tiles between hp ranks instead would be data parallelism over tiles and would not
shrink the activations of a single large image.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.data.batch import PackedBatch
from engine.models.attention import block_mask
from engine.models.llm import SequenceContext
from engine.parallel.mappings import (Group, all_to_all, gather_from_sequence, group_rank, group_size,
                                      split_to_sequence)


@dataclass
class TilePadding:
    """Tokens per ViT tile before padding (0: no padding). Set by ``TileSplit`` on each forward;
    the cores derive the padding segments from it and the shapes they see, so a recomputation
    under activation checkpointing needs no other state (tiles of one size per run)."""

    valid: int = 0


def tile_segments(tiles: int, padded: int, valid: int, device) -> torch.Tensor:
    """``cu_seqlens`` with each tile's real tokens and its padding as separate segments."""
    bounds = [b for i in range(tiles) for b in (i * padded, i * padded + valid)] + [tiles * padded]
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def expand_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    """Repeat kv heads so that they split over ``n`` ranks in step with the query heads."""
    h = x.shape[2]
    if h % n == 0:
        return x
    if n % h:
        raise ValueError(f"{h} kv heads cannot be split over or replicated to {n} head-parallel ranks")
    return x.repeat_interleave(n // h, dim=2)


class UlyssesAttention(nn.Module):
    """Wraps a ``CoreAttention``: all-to-all to head-sharded full sequences, the core, and back.
    With ``group`` None it only adds the segments of padded ViT tiles (``padding``)."""

    def __init__(self, core: nn.Module, group: Group, padding: Optional[TilePadding] = None):
        super().__init__()
        self.core, self.group, self.padding = core, group, padding

    def _core(self, q, k, v, cu_seqlens, mask):
        if cu_seqlens is None and mask is None and self.padding is not None:
            N, S = q.shape[:2]
            if 0 < self.padding.valid < S:
                cu_seqlens = tile_segments(N, S, self.padding.valid, q.device)
        return self.core(q, k, v, cu_seqlens, mask)

    def forward(self, q, k, v, cu_seqlens=None, mask=None):
        n = group_size(self.group)
        if n == 1:
            return self._core(q, k, v, cu_seqlens, mask)
        if q.shape[2] % n:
            raise ValueError(f"{q.shape[2]} attention heads per rank do not split over {n} head-parallel ranks")
        k, v = expand_kv(k, n), expand_kv(v, n)
        q, k, v = (all_to_all(t, self.group, 2, 1) for t in (q, k, v))
        out = self._core(q, k, v, cu_seqlens, mask)
        return all_to_all(out, self.group, 1, 2)


# ----------------------------------------------------------------------------- ViT tiles


class TileSplit:
    """Forward hook on the ViT embeddings: pad each tile's tokens to a multiple of
    hp * (tp if sequence parallel) and keep the local slice. Upstream (embedding) gradients
    become partial over the splitting groups."""

    def __init__(self, hp_group: Group, sp_group: Group, padding: TilePadding):
        self.hp, self.sp, self.padding = hp_group, sp_group, padding
        self.multiple = group_size(hp_group) * group_size(sp_group)

    def __call__(self, module: nn.Module, inputs, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        Tp = -(-T // self.multiple) * self.multiple
        self.padding.valid = T
        x = F.pad(x, (0, 0, 0, Tp - T))
        return split_to_sequence(split_to_sequence(x, self.hp), self.sp)


class TileGather:
    """Forward hook on the ViT: gather the token slices (the consumers compute the same gradient
    on every rank, so backward keeps the own slice) and drop the padding."""

    def __init__(self, split: TileSplit):
        self.split = split

    def __call__(self, module: nn.Module, inputs, x: torch.Tensor) -> torch.Tensor:
        x = gather_from_sequence(x, self.split.sp, reduce_grads=False)
        x = gather_from_sequence(x, self.split.hp, reduce_grads=False)
        return x[:, : self.split.padding.valid]


# ----------------------------------------------------------------------------- LLM batches


@dataclass
class LocalTokens:
    """This rank's hp slice of a packed batch (sequence parallelism splits only activations)."""

    input_ids: torch.Tensor  # [B, S/hp]
    targets: torch.Tensor  # [B, S/hp]
    loss_weights: torch.Tensor  # [B, S/hp]
    context: SequenceContext  # local positions [B, S/hp]; full cu_seqlens and mask
    image_mask: torch.Tensor  # [B, S] True at <IMG_CONTEXT> (all tokens: features are placed by it)


def local_slice(x: torch.Tensor, group: Group) -> torch.Tensor:
    """This rank's slice of dim 1 (no autograd mapping: for ids, masks and targets)."""
    return x.chunk(group_size(group), 1)[group_rank(group)]


def shard_batch(batch: PackedBatch, hp_group: Group, sp_group: Group, img_context_id: int) -> LocalTokens:
    """Cut ``batch`` to this rank's hp slice. ``sp_group`` is the tp group when sequence
    parallelism is on (it only fixes the multiple ``S`` must have), else None."""
    B, S = batch.input_ids.shape
    multiple = group_size(hp_group) * group_size(sp_group)
    if S % multiple:
        raise ValueError(f"packed sequence length {S} is not a multiple of {multiple} (hp x tp with sequence "
                         f"parallelism); pack with pad_to_multiple={multiple}")
    device = batch.input_ids.device
    mask = block_mask(batch.cu_seqlens, B, S, True, device)
    positions = local_slice(batch.position_ids.to(device, torch.float32), hp_group)
    return LocalTokens(
        input_ids=local_slice(batch.input_ids, hp_group),
        targets=local_slice(batch.targets, hp_group),
        loss_weights=local_slice(batch.loss_weights, hp_group),
        context=SequenceContext(positions, batch.cu_seqlens, mask),
        image_mask=batch.input_ids == img_context_id,
    )
