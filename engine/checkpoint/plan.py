"""Which rank of a layout stores which piece of each parameter, without launching the layout.

Reads the parallel plan (``engine.parallel.plan``), as ``engine.parallel.parallelize`` does
(checked against live ranks in tests/test_checkpoint_reshard.py): column-parallel weights split dim 0, row-parallel dim 1,
vocabulary and ViT heads zero-padded to a multiple of tp (the padding is never stored), GQA kv
heads replicated when kv_heads < tp (stored once), pipeline stages holding contiguous layers.
A piece is written by the rank at data- and head-parallel coordinate 0 of its grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from engine.checkpoint.regions import Box
from engine.config import Config
from engine.parallel.plan import plan_for
from engine.parallel.tensor_parallel import ShardInfo


@dataclass(frozen=True)
class ShardSpec:
    grid: str  # llm | vit
    info: ShardInfo  # dim, full, padded, replicas as the parallel layers use them
    stage: Optional[int]  # LLM pipeline rank holding the tensor


def shard_spec(name: str, shape: Sequence[int], cfg: Config) -> ShardSpec:
    """How parameter ``name`` of global ``shape`` is split under ``cfg.parallel`` (the parallel plan)."""
    p = plan_for(cfg)[name]
    if tuple(int(x) for x in shape) != p.shape:
        raise ValueError(f"{name}: shape {tuple(shape)} differs from the configured model's {p.shape}")
    return ShardSpec(p.grid, p.info, p.stage)


def grid_sizes(cfg: Config, world: int) -> dict[str, dict[str, int]]:
    L, V = cfg.parallel.llm, cfg.parallel.vit
    return {"llm": {"tp": L.tp, "hp": L.hp, "dp": world // (L.tp * L.hp * L.pp), "pp": L.pp},
            "vit": {"tp": V.tp, "hp": V.hp, "dp": world // (V.tp * V.hp)}}


def _rank(sizes: dict[str, int], **coords: int) -> int:
    r, stride = 0, 1
    for d, s in sizes.items():
        r += coords.get(d, 0) * stride
        stride *= s
    return r


def target_pieces(name: str, shape: Sequence[int], cfg: Config, world: int) -> list[tuple[int, Box]]:
    """``(rank, global box)`` of every stored piece of ``name`` under the layout (padding stripped)."""
    s = shard_spec(name, shape, cfg)
    sizes = grid_sizes(cfg, world)[s.grid]
    tp = sizes["tp"]
    base = {"pp": s.stage} if s.stage is not None else {}
    full = tuple(int(x) for x in shape)
    if s.info.dim is None:
        return [(_rank(sizes, tp=0, **base), (tuple(0 for _ in full), full))]
    out = []
    d = s.info.dim
    for r in range(0, tp, s.info.replicas):
        a, b = s.info.local_range(r, tp)
        b = min(b, s.info.full)
        if b <= a:
            continue
        offsets = [0] * len(full)
        sizes_ = list(full)
        offsets[d], sizes_[d] = a, b - a
        out.append((_rank(sizes, tp=r, **base), (tuple(offsets), tuple(sizes_))))
    return out


def default_world(cfg: Config) -> int:
    """The smallest world holding both grids' model-parallel groups."""
    import math

    L, V = cfg.parallel.llm, cfg.parallel.vit
    return math.lcm(L.tp * L.hp * L.pp, V.tp * V.hp)
