"""Training objectives: what a runner asks of the training mode.

A runner (``engine.step.LocalRunner`` on one process, ``engine.parallel.runner.ParallelRunner`` on any
layout) owns the mechanics of a step: placement, loading, the ViT, the exchange of its features, the
pipeline, gradient reduction. What differs between pre-training, SFT, PRM and MPO is an objective
object, called at fixed points of every step:

- ``order(placement)``: per replica and microbatch, the order in which the microbatch consumes its
  items' image tiles (the exchange delivers features in this order);
- ``pack(items, order, group, ctx)``: one microbatch (``Packed``) of the step's items;
- ``totals(packed)``: this replica's sums the loss is normalised by; the runner adds them over data
  parallelism before any forward, so the loss and the gradients do not depend on the split;
- ``begin(totals, batch, runner)``: per-step preparation; False: nothing to train on this step;
- ``head(lm, layout, h, tokens, mb)``: on the last pipeline stage, from the last decoder layer's
  output: ``(loss to backward, {statistic: float})``, the loss this microbatch's share of the step's;
- ``finish(sums)``: the step's ``loss``, ``weight_total`` and metrics from the statistics summed over
  microbatches and replicas;
- ``state_dict``/``load_state_dict``: state besides model and optimizer, kept in checkpoints.

``LanguageModelling`` is pre-training, SFT and PRM (they differ in their data's loss weights only).
MPO is ``engine.posttrain.objective.MPO``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from engine.balance.packing import tight_rows
from engine.data.batch import PackedBatch
from engine.data.packing import first_fit, pack
from engine.parallel.parallelize import LLMLayout, loss_terms
from engine.parallel.ulysses import LocalTokens


@dataclass
class PackContext:
    """What packing needs besides the items: the run's config, the pad id, the token-split multiple."""

    cfg: Any
    pad_id: int = 0
    multiple: int = 1


@dataclass
class Packed:
    """One microbatch: its tokens (``batch``; pixels travel separately, ``batch.pixel_values`` holds
    ``tiles x 0``), the step positions of its items in tile order, and ``feature_index``: for each
    consumed tile, its row among the microbatch's features (None: consumed in ``positions`` order)."""

    batch: PackedBatch
    positions: list[int]
    feature_index: Optional[torch.Tensor] = None
    extra: Any = None  # the objective's own view of the microbatch


def empty_step_stats() -> dict:
    """A runner's statistics of a step before anything is counted (and of a step with nothing to train on)."""
    return {"loss": 0.0, "weight_total": 0.0, "tokens": 0, "text_tokens": 0, "visual_tokens": 0, "samples": 0,
            "metrics": {}}


def packed_counts(packed: Sequence["Packed"]) -> list[float]:
    """``[text tokens, visual tokens, samples]`` of microbatches."""
    b = [p.batch for p in packed]
    return [sum(x.text_tokens for x in b), sum(x.visual_tokens for x in b), sum(x.num_samples for x in b)]


def count_stats(text: float, visual: float, samples: float) -> dict:
    """The token and sample entries of a step's statistics from ``packed_counts`` (summed over replicas)."""
    return {"text_tokens": int(text), "visual_tokens": int(visual), "samples": int(samples),
            "tokens": int(text + visual)}


class Objective:
    """The interface, with the defaults of a loss over tokens."""

    name = "objective"
    stat_keys: tuple[str, ...] = ("loss",)

    def order(self, placement) -> list[list[list[int]]]:
        return placement.order()

    def pack(self, items: Sequence, order: list[int], group: list[int], ctx: PackContext) -> Packed:
        raise NotImplementedError

    def totals(self, packed: Sequence[Packed]) -> list[float]:
        raise NotImplementedError

    def begin(self, totals: list[float], batch, runner) -> bool:
        raise NotImplementedError

    def head(self, lm, layout: LLMLayout, h: torch.Tensor, tokens: LocalTokens,
             mb: Packed) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def finish(self, sums: dict[str, float]) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"the {self.name} objective keeps no state, the checkpoint has {sorted(state)}")


def _without_pixels(s):
    """The sample with its tile count but no pixels (they reach the LLM through the exchange)."""
    if s.pixel_values is None:
        return s
    return dataclasses.replace(s, pixel_values=torch.empty(s.num_tiles, 0), tile_ids=None)


class LanguageModelling(Objective):
    """Weighted next-token cross entropy: the step loss is ``sum(w * ce) / W`` with ``W`` the token
    weights of the whole global batch (pre-training, SFT, PRM)."""

    name = "lm"

    def __init__(self):
        self.W = 0.0

    def pack(self, items, order, group, ctx: PackContext) -> Packed:
        """First-fit in ``group`` order, rows at most ``data.max_packed_tokens``, at the tightest
        capacity that keeps the row count (``tight_rows``)."""
        light = [_without_pixels(items[i]) for i in group]
        cfg = ctx.cfg
        _, capacity = tight_rows([s.num_tokens for s in light], cfg.data.max_packed_tokens, first_fit)
        if capacity != cfg.data.max_packed_tokens:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_packed_tokens=capacity))
        batch = pack(light, cfg, ctx.pad_id, ctx.multiple)
        want = [t for i in order for t in items[i].image_tiles]
        got = [] if batch.image_tiles is None else batch.image_tiles.tolist()
        if got != want:
            raise RuntimeError(f"packed image order {got} differs from the exchange order {want}")
        return Packed(batch, list(order))

    def totals(self, packed) -> list[float]:
        return [sum(float(p.batch.loss_weights.double().sum()) for p in packed)]

    def begin(self, totals, batch, runner) -> bool:
        self.W = float(totals[0])
        return self.W > 0

    def head(self, lm, layout, h, tokens, mb):
        ce, _ = loss_terms(lm, layout, h, tokens)
        return ce / self.W, {"loss": float(ce.detach()) / self.W}

    def finish(self, sums) -> dict:
        return {"loss": sums["loss"], "weight_total": self.W, "metrics": {}}

    @staticmethod
    def score(lm, layout, h, tokens, mb: Packed) -> torch.Tensor:
        """The ``forward_only`` head of evaluation: the microbatch's ``(sum(w * ce), sum(w))`` on the row
        of its first item (zeros on the others), so the sums over all rows are the batch's."""
        out = torch.zeros(len(mb.positions), 2, dtype=torch.float64, device=h.device)
        if mb.positions:
            ce, w = loss_terms(lm, layout, h, tokens)
            out[0, 0], out[0, 1] = ce.detach().double(), w.detach().double()
        return out
