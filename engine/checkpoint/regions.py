"""Boxes of a global tensor, and where a rank's local tensor sits in it.

A *box* is ``(offsets, sizes)``: a hyperrectangle of a tensor. Checkpoints store every tensor
as its true, unpadded global shape cut into boxes ("pieces"). A rank's local tensor covers one
box of the global tensor along at most one split dimension, possibly followed by zero padding
(vocabulary or heads padded to a multiple of tp), which is never stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

Shape = tuple[int, ...]
Box = tuple[Shape, Shape]  # (offsets, sizes)


def volume(sizes: Sequence[int]) -> int:
    return math.prod(sizes)


def full_box(shape: Sequence[int]) -> Box:
    return tuple(0 for _ in shape), tuple(int(s) for s in shape)


def intersect(a: Box, b: Box) -> Optional[Box]:
    """The common box of ``a`` and ``b`` (same rank), or None when they do not overlap."""
    offsets, sizes = [], []
    for (ao, as_), (bo, bs) in zip(zip(*a), zip(*b)):
        lo, hi = max(ao, bo), min(ao + as_, bo + bs)
        if hi <= lo:
            return None
        offsets.append(lo)
        sizes.append(hi - lo)
    return tuple(offsets), tuple(sizes)


def inside(inner: Box, outer_shape: Sequence[int]) -> bool:
    o, s = inner
    return len(o) == len(outer_shape) and all(0 <= a and a + n <= m for a, n, m in zip(o, s, outer_shape))


def slices(box: Box, origin: Optional[Sequence[int]] = None) -> tuple[slice, ...]:
    """Index of ``box`` in a tensor whose element 0 sits at ``origin`` (default: the global origin)."""
    origin = origin or (0,) * len(box[0])
    return tuple(slice(o - g, o - g + s) for o, s, g in zip(box[0], box[1], origin))


def flat_range_boxes(shape: Sequence[int], start: int, end: int) -> list[tuple[Box, int]]:
    """Boxes covering elements ``[start, end)`` of a row-major tensor of ``shape``, in order, each
    with its first flat index. Each box is a contiguous run of the flat range (at most 2 per dim)."""
    shape = tuple(int(s) for s in shape)
    if end <= start:
        return []
    if not shape:
        return [(((), ()), start)]
    if len(shape) == 1:
        return [(((start,), (end - start,)), start)]
    inner = volume(shape[1:])
    r0, c0 = divmod(start, inner)
    r1, c1 = divmod(end, inner)
    out: list[tuple[Box, int]] = []

    def row(r: int, a: int, b: int) -> None:
        for (o, s), f in flat_range_boxes(shape[1:], a, b):
            out.append((((r,) + o, (1,) + s), r * inner + f))

    if r0 == r1:
        row(r0, c0, c1)
        return out
    if c0:
        row(r0, c0, inner)
        r0 += 1
    if r1 > r0:
        out.append((((r0,) + (0,) * (len(shape) - 1), (r1 - r0,) + shape[1:]), r0 * inner))
    if c1:
        row(r1, 0, c1)
    return out


@dataclass(frozen=True)
class Placement:
    """A local tensor of ``local_shape`` inside a global tensor of ``global_shape``: along ``dim``
    local index ``i`` is global ``start + i``; global indices at or past ``global_shape[dim]`` are
    padding. ``dim=None``: the local tensor is the whole global tensor."""

    global_shape: Shape
    local_shape: Shape
    dim: Optional[int] = None
    start: int = 0

    def to_global(self, local: Box) -> Optional[tuple[Box, Box]]:
        """``(global box, local box)`` of the stored (unpadded) part of a local box; None if it is all padding."""
        if self.dim is None:
            return local, local
        d = self.dim
        offsets, sizes = list(local[0]), list(local[1])
        lo = self.start + offsets[d]
        keep = min(lo + sizes[d], self.global_shape[d]) - lo
        if keep <= 0:
            return None
        g_off = offsets.copy()
        g_off[d] = lo
        sizes[d] = keep
        return (tuple(g_off), tuple(sizes)), (tuple(offsets), tuple(sizes))

    def stored(self) -> Optional[tuple[Box, Box]]:
        """The whole local tensor's stored part."""
        return self.to_global(full_box(self.local_shape))


def take(t: torch.Tensor, box: Box, origin: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``t[box]`` (a view) for a tensor whose element 0 sits at ``origin``."""
    if t.dim() == 0:
        return t
    return t[slices(box, origin)]
