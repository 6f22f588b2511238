"""Process grids: one for the LLM, one for the ViT, over the same ranks.

A ``Grid`` factors the world into named dimensions (the first varies fastest) and owns one
process group per dimension and per listed combination of dimensions. Grids are plain
objects passed to the layers that need them; there is no module-level parallel state, so a
ViT layer can only ever see the ViT grid.

LLM grid order: tp, hp, dp, pp   (rank = tp + TP*(hp + HP*(dp + DP*pp)))
ViT grid order: tp, hp, dp
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch.distributed as dist

from engine.config import Config, ConfigError, validate_parallel


@dataclass
class Grid:
    name: str
    rank: int
    world: int
    sizes: dict[str, int]  # ordered, first varies fastest
    groups: dict[str, Optional[dist.ProcessGroup]] = field(default_factory=dict)
    group_ranks: dict[str, list[int]] = field(default_factory=dict)

    def coord(self, dim: str) -> int:
        stride = 1
        for d, s in self.sizes.items():
            if d == dim:
                return (self.rank // stride) % s
            stride *= s
        raise KeyError(f"{self.name} grid has no dimension {dim!r} (has {list(self.sizes)})")

    def size(self, dim: str) -> int:
        return math.prod(self.sizes[d] for d in dim.split("_"))

    def rank_of(self, **coords: int) -> int:
        """Global rank at the given coordinates (missing dimensions: this rank's own)."""
        r, stride = 0, 1
        for d, s in self.sizes.items():
            r += coords.get(d, self.coord(d)) * stride
            stride *= s
        return r

    def group(self, dim: str) -> Optional[dist.ProcessGroup]:
        """Group along ``dim`` (``"tp"``, ``"dp_hp"``, ...); None when this dimension has size 1."""
        return self.groups.get(dim)

    def ranks(self, dim: str) -> list[int]:
        return self.group_ranks[dim]

    def local_rank(self, dim: str) -> int:
        return self.group_ranks[dim].index(self.rank)

    def describe(self) -> str:
        return f"{self.name}[" + " ".join(f"{d}={s}" for d, s in self.sizes.items()) + "]"


def _ranks_along(sizes: dict[str, int], dims: Sequence[str]) -> list[list[int]]:
    """All rank lists that vary exactly over ``dims`` (every other dimension fixed)."""
    names = list(sizes)
    strides = {d: math.prod(sizes[n] for n in names[: names.index(d)]) for d in names}
    fixed = [d for d in names if d not in dims]
    out = []
    for fc in itertools.product(*(range(sizes[d]) for d in fixed)):
        base = sum(c * strides[d] for d, c in zip(fixed, fc))
        ranks = []
        for vc in itertools.product(*(range(sizes[d]) for d in reversed(dims))):
            ranks.append(base + sum(c * strides[d] for d, c in zip(reversed(dims), vc)))
        out.append(sorted(ranks))
    return out


def build_grid(name: str, sizes: dict[str, int], rank: int, world: int, combos: Sequence[str] = (),
               create_groups: bool = True) -> Grid:
    """Create the grid's groups. Every rank must call this with the same arguments in the same
    order (``dist.new_group`` is collective)."""
    if math.prod(sizes.values()) != world:
        raise ConfigError(f"{name} grid {sizes} does not multiply to the world size {world}")
    grid = Grid(name, rank, world, dict(sizes))
    for key in list(sizes) + list(combos):
        dims = key.split("_")
        for ranks in _ranks_along(sizes, dims):
            group = None
            if create_groups and len(ranks) > 1 and dist.is_initialized():
                group = dist.new_group(ranks)
            if rank in ranks:
                grid.group_ranks[key] = ranks
                grid.groups[key] = group if len(ranks) > 1 else None
    return grid


@dataclass
class Topology:
    llm: Grid
    vit: Grid

    @property
    def world(self) -> int:
        return self.llm.world


def build_topology(cfg: Config, rank: int = 0, world: int = 1, create_groups: bool = True) -> Topology:
    """Validate the layout for ``world`` ranks, then build both grids (data parallelism is what
    the world leaves)."""
    validate_parallel(cfg, world)
    L, V = cfg.parallel.llm, cfg.parallel.vit
    llm_dp = world // (L.tp * L.hp * L.pp)
    vit_dp = world // (V.tp * V.hp)
    llm = build_grid("llm", {"tp": L.tp, "hp": L.hp, "dp": llm_dp, "pp": L.pp}, rank, world,
                     combos=("dp_hp", "tp_hp"), create_groups=create_groups)
    vit = build_grid("vit", {"tp": V.tp, "hp": V.hp, "dp": vit_dp}, rank, world,
                     combos=("dp_hp", "tp_hp"), create_groups=create_groups)
    return Topology(llm=llm, vit=vit)
