"""Rehearse one rank of a job on this machine: build exactly the shards rank R would hold (its
ViT and LLM slices, with their real initial values or the real slices of a transformers
checkpoint), with no process group and no GPU, and measure the time and host memory it takes.

``python -m engine.plan --config C --nodes N --gpus-per-node G --rehearse-rank R [--init-from DIR] --json``
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from engine.config import Config
from engine.models.init import scratch_buffer
from engine.parallel.materialize import fill_local
from engine.parallel.plan import plan_for


@dataclass(frozen=True)
class RankCoords:
    rank: int
    llm: dict[str, int]  # tp, hp, dp, pp
    vit: dict[str, int]  # tp, hp, dp


def rank_coords(cfg: Config, world: int, rank: int) -> RankCoords:
    """Grid coordinates of ``rank`` (``engine.parallel.topology``'s grids, without process groups)."""
    from engine.parallel.topology import build_topology

    if not 0 <= rank < world:
        raise ValueError(f"--rehearse-rank={rank} is not a rank of a world of {world}")
    topo = build_topology(cfg, rank, world, create_groups=False)
    return RankCoords(rank, {d: topo.llm.coord(d) for d in topo.llm.sizes},
                      {d: topo.vit.coord(d) for d in topo.vit.sizes})


def rank_param_bytes(cfg: Config, world: int, rank: int, element_size: int = 4) -> int:
    """Bytes of the parameters rank ``rank`` holds (padding included), from the plan alone."""
    plan = plan_for(cfg)
    c = rank_coords(cfg, world, rank)
    tp = {"llm": cfg.parallel.llm.tp, "vit": cfg.parallel.vit.tp}
    return sum(int(torch.Size(p.local_shape(tp[p.grid])).numel()) * element_size
               for p in plan.rank_params(c.llm["pp"]))


def build_rank_shards(cfg: Config, world: int, rank: int, init_from: Optional[str] = None) -> dict[str, torch.Tensor]:
    """``{name: local tensor}``: what rank ``rank`` materialises (float32, padding included), from
    ``init_from`` (default ``train.init_from``) or the initialisation."""
    init_from = cfg.train.init_from if init_from is None else init_from
    plan = plan_for(cfg)
    c = rank_coords(cfg, world, rank)
    tp = {"llm": (c.llm["tp"], cfg.parallel.llm.tp), "vit": (c.vit["tp"], cfg.parallel.vit.tp)}
    source = None
    if init_from:
        from engine.models.hf_slices import CheckpointSliceReader

        source = CheckpointSliceReader(init_from, cfg.model, keep_open=False)
    out = {}
    scratch = scratch_buffer()
    try:
        for p in plan.rank_params(c.llm["pp"]):
            tp_rank, size = tp[p.grid]
            out[p.name] = fill_local(torch.empty(p.local_shape(size)), p, tp_rank, size, cfg.train.seed, source,
                                     scratch)
    finally:
        if source is not None:
            source.close()
    return out


def rehearse(cfg: Config, world: int, rank: int, init_from: Optional[str] = None) -> dict:
    """The ``rehearsal`` object: ``{rank, params, param_bytes, peak_rss_gib, seconds}`` (+ the rank's
    pipeline stage and tp coordinates)."""
    from engine.metrics import peak_rss_mib

    t0 = time.perf_counter()
    shards = build_rank_shards(cfg, world, rank, init_from)
    seconds = time.perf_counter() - t0
    c = rank_coords(cfg, world, rank)
    params = sum(t.numel() for t in shards.values())
    return {"rank": rank, "params": params, "param_bytes": sum(t.numel() * t.element_size() for t in shards.values()),
            "peak_rss_gib": round(peak_rss_mib() / 1024, 3), "seconds": round(seconds, 2),
            "llm_stage": c.llm["pp"], "llm_tp_rank": c.llm["tp"], "vit_tp_rank": c.vit["tp"],
            "source": init_from or cfg.train.init_from or f"initialisation (train.seed={cfg.train.seed})"}
