"""Each rank loads only its share of a step: what its LLM replica trains on and what its ViT rank encodes.

The step is placed from the shape index alone (every rank computes the same placement), then a rank
loads the tokens of the samples of its LLM data-parallel replica and the pixels of the tiles of its
ViT data-parallel rank, nothing else. A sample that fails to load on some rank (a file changed after
indexing, a corrupt image) must leave the step on every rank: the ranks agree on the failures with one
small all-reduce, drop them and place the step again, loading what the new placement adds.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.distributed as dist

from engine.balance.cost import CostModel
from engine.balance.layout import Layout
from engine.balance.placement import Placement, place, sample_shapes
from engine.data.dataset import SKIP_REASONS
from engine.data.loader import StepBatch, Want
from engine.data.packing import first_fit

log = logging.getLogger("engine.balance")


def place_step(batch: StepBatch, layout: Layout, cost: CostModel, balanced: bool, seed: int) -> tuple[Placement, Placement]:
    """(placement used for ``batch``, the naive placement), decided from its shapes alone and the same
    on every rank: the balancer's when ``balanced`` (seeded by ``seed`` and the step's first sample
    index), else the naive split. Memoised on the batch (the loader asks ahead when prefetching)."""
    if "placement" in batch.memo:
        return batch.memo["placement"]
    shapes = sample_shapes(batch.num_tokens, batch.image_tiles, layout.num_image_token)
    naive = place(shapes, layout, first_fit, cost, balanced=False, rows=not balanced)
    chosen = naive
    if balanced:
        mixed = seed * 1_000_003 + (batch.indices[0] if len(batch) else 0)
        chosen = place(shapes, layout, first_fit, cost, balanced=True, seed=mixed % 2**63)
        if chosen.method != "balanced":
            log.warning("balance: %d samples cannot fill %d replicas x %d microbatches; naive split this step",
                        len(batch), layout.llm_dp, layout.microbatches)
    batch.memo["placement"] = (chosen, naive)
    return chosen, naive


def share_coords(layout: Layout, rank: int) -> tuple[int, int]:
    """(LLM data-parallel replica, ViT data-parallel rank) of global ``rank``: the grids order ranks
    tp, hp, dp(, pp), and ``Layout`` folds hp into tp."""
    return (rank // layout.llm_tp) % layout.llm_dp, rank // layout.vit_tp


def rank_share(placement: Placement, replica: int, vit_rank: int) -> Want:
    """``{position: tiles}``: every sample of LLM replica ``replica`` (tokens; no pixels unless also
    below) and the tiles ViT rank ``vit_rank`` encodes."""
    want: dict[int, set[int]] = {s: set() for mb in placement.groups[replica] for s in mb}
    for s, a, b in placement.vit[vit_rank]:
        want.setdefault(s, set()).update(range(a, b))
    return {s: tuple(sorted(t)) for s, t in want.items()}


def agree_on_skips(found: dict, n: int, device: torch.device,
                   group: Optional[dist.ProcessGroup] = None) -> dict[int, tuple[str, str]]:
    """``{position: (reason, message)}`` of the samples any rank found bad (collective over ``group``);
    the message is known only where the sample failed ("" elsewhere)."""
    codes = torch.zeros(n, dtype=torch.int32)
    for pos, r in found.items():
        codes[pos] = SKIP_REASONS.index(r.reason) + 1
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        codes = codes.to(device)  # the collective's device (NCCL: the GPU)
        dist.all_reduce(codes, op=dist.ReduceOp.MAX, group=group)
        codes = codes.cpu()
    return {p: (SKIP_REASONS[int(codes[p]) - 1], found[p].message if p in found else "")
            for p in torch.nonzero(codes).flatten().tolist()}


def load_share(batch: StepBatch, want: Callable[[StepBatch], Want], device: torch.device,
               mark: Callable[..., None] = lambda phase, collective=False: None) -> None:
    """Load this rank's share of ``batch`` (``want(batch)``: the runner's ``data_request``, decided
    from the batch as it stands), and repeat without the samples any rank could not load (collective;
    a step with no bad sample costs one all-reduce of one int per sample). ``mark(phase, collective)``
    names what the rank is doing (the hang watchdog's ``enter``)."""
    while True:
        mark("data: loading this rank's share")
        found = batch.load(want(batch))
        mark("data: agreeing on failed samples (all-reduce)", collective=True)
        bad = agree_on_skips(found, len(batch), device)
        if not bad:
            return
        if batch.loader is None:
            raise RuntimeError(f"samples {sorted(batch.indices[p] for p in bad)} of an in-memory batch failed")
        batch.loader.record_load_skips(batch, bad)  # drops them; the next want() places the rest
