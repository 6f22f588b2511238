"""Placement of one global batch on a training step's ranks: balanced, or the naive split.

A ``Placement`` gives, per LLM data-parallel replica ``d`` and microbatch ``m``, the samples in the
order the packer receives them (``groups``) and the rows the packer makes of them (``rows``: the
packer's own rule ``pack_rows`` at the tightest capacity that keeps its row count, ``tight_rows``),
and per ViT data-parallel rank the tile ranges it encodes (``vit``), with the cost model's predicted
times (``predicted``).

- naive: contiguous equal sample counts per replica and per microbatch, in loader order; tiles split
  contiguously over the ViT ranks in sample order (``ExchangePlan.naive``).
- balanced: ``balance()``; each microbatch's samples are handed to the packer longest first, so an
  in-order first-fit packer makes first-fit-decreasing rows, as many as the balancer's.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from engine.balance.assignment import Assignment, TileRange
from engine.balance.balancer import balance, evaluate
from engine.balance.cost import CostModel
from engine.balance.layout import Layout, SampleShape
from engine.balance.packing import tight_rows

PackRows = Callable[[Sequence[int], int], list[list[int]]]  # (lengths, capacity) -> rows of positions


@dataclass
class Placement:
    method: str
    groups: list[list[list[int]]]  # [replica][microbatch] sample indices, packer input order
    rows: list[list[list[list[int]]]]  # [replica][microbatch][row] sample indices, packed order
    vit: list[list[TileRange]]  # [ViT rank] (sample, first tile, end tile)
    predicted: Optional[Assignment]  # None when placed without rows (``place(..., rows=False)``)
    seconds: float  # time taken to decide the placement

    def order(self) -> list[list[list[int]]]:
        """``[replica][microbatch]`` sample indices in packed order."""
        return [[[s for row in mb for s in row] for mb in rep] for rep in self.rows]

    def replica_of(self, n: int) -> np.ndarray:
        out = np.full(n, -1, dtype=np.int64)
        for d, rep in enumerate(self.groups):
            for mb in rep:
                out[mb] = d
        return out

    def vit_rank_of(self, sample_tiles: Sequence[int]) -> np.ndarray:
        """ViT rank of every tile of the step (tiles numbered in sample order)."""
        start = np.concatenate([[0], np.cumsum(np.asarray(sample_tiles, dtype=np.int64))])
        out = np.full(int(start[-1]), -1, dtype=np.int64)
        for v, ranges in enumerate(self.vit):
            for s, a, b in ranges:
                out[start[s] + a:start[s] + b] = v
        return out

    def checksum(self) -> int:
        """CRC-32 of the placement (equal on every rank when all ranks decided alike)."""
        return zlib.crc32(repr((self.groups, self.vit)).encode())


def sample_shapes(num_tokens: Sequence[int], image_tiles: Sequence[Sequence[int]],
                  num_image_token: int) -> list[SampleShape]:
    """``SampleShape`` of each sample from its LLM token count (image context included) and tiles per image."""
    return [SampleShape.from_tokens(n, t, num_image_token) for n, t in zip(num_tokens, image_tiles)]


def _split(items: Sequence[int], parts: int) -> list[list[int]]:
    """Contiguous chunks whose sizes differ by at most one, larger chunks first."""
    n, out, start = len(items), [], 0
    for i in range(parts):
        size = n // parts + (1 if i < n % parts else 0)
        out.append(list(items[start:start + size]))
        start += size
    return out


def _rows(groups: list[list[list[int]]], tokens: np.ndarray, capacity: int,
          pack_rows: PackRows) -> list[list[list[list[int]]]]:
    return [[[[mb[k] for k in row] for row in tight_rows([int(tokens[i]) for i in mb], capacity, pack_rows)[0]]
             for mb in rep] for rep in groups]


def naive_vit(sample_tiles: Sequence[int], vit_ranks: int) -> list[list[TileRange]]:
    """Tiles split contiguously over the ViT ranks in sample order, as tile ranges."""
    total = int(sum(sample_tiles))
    sizes = [len(c) for c in _split(range(total), vit_ranks)]
    out: list[list[TileRange]] = [[] for _ in range(vit_ranks)]
    s, off = 0, 0
    for v, size in enumerate(sizes):
        while size > 0:
            while sample_tiles[s] == off:
                s, off = s + 1, 0
            take = min(size, int(sample_tiles[s]) - off)
            out[v].append((s, off, off + take))
            off += take
            size -= take
    return out


def place(samples: Sequence[SampleShape], layout: Layout, pack_rows: PackRows, cost: CostModel | None = None,
          balanced: bool = True, seed: int = 0, rows: bool = True) -> Placement:
    """Placement of ``samples`` (one global batch). With ``balanced`` and at least one sample per
    microbatch, the balancer's; otherwise the naive split (method ``"naive"``). ``rows=False`` leaves
    out the rows and the predicted times (enough for ``moved``)."""
    cost = cost or CostModel()
    n, dp, m = len(samples), layout.llm_dp, layout.microbatches
    tokens = np.fromiter((s.llm_tokens(layout.num_image_token) for s in samples), dtype=np.int64, count=n)
    tiles = [s.tiles for s in samples]
    t0 = time.perf_counter()
    if balanced and n >= dp * m:
        a = balance(samples, layout, cost, seed=seed)
        groups = [[sorted((s for row in mb for s in row), key=lambda s: (-tokens[s], s)) for mb in rep]
                  for rep in a.llm]
        vit, method = a.vit, "balanced"
    else:
        groups = [_split(rep, m) for rep in _split(list(range(n)), dp)]
        vit, method = naive_vit(tiles, layout.vit_ranks), "naive"
    seconds = time.perf_counter() - t0
    if not rows:
        return Placement(method, groups, [], vit, None, seconds)
    packed = _rows(groups, tokens, layout.max_packed_tokens, pack_rows)
    return Placement(method, groups, packed, vit, evaluate(method, packed, vit, samples, layout, cost), seconds)


def moved(p: Placement, base: Placement, sample_tiles: Sequence[int]) -> tuple[int, int]:
    """(samples on another LLM replica, tiles on another ViT rank) in ``p`` than in ``base``."""
    n = len(sample_tiles)
    samples = int(np.count_nonzero(p.replica_of(n) != base.replica_of(n)))
    tiles = int(np.count_nonzero(p.vit_rank_of(sample_tiles) != base.vit_rank_of(sample_tiles)))
    return samples, tiles
