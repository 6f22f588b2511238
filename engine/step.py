"""One optimisation step on one process: pack microbatches, forward/backward, global loss scale.

The loss of a step is sum(w * ce) / W over all its microbatches, with W the sum of the token
weights of the whole global batch, known before any forward pass. Every microbatch backward
is scaled by 1/W, so gradients equal those of one big batch however the samples were split.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from engine.config import Config
from engine.data.batch import PackedBatch
from engine.data.packing import pack, split_contiguous
from engine.models.layers import autocast_context


def forward_backward(model, batches: Sequence[PackedBatch], device: torch.device,
                     autocast_dtype: Optional[torch.dtype] = None, weight_total: Optional[float] = None,
                     poison: bool = False) -> dict:
    """Accumulate gradients of the global loss over ``batches``; returns loss and token counts.
    ``poison``: the fault drill ``faults.nan_at_steps`` (the first batch's loss becomes NaN)."""
    W = weight_total if weight_total is not None else float(sum(b.loss_weights.sum() for b in batches))
    stats = {"loss": 0.0, "weight_total": W, "tokens": 0, "text_tokens": 0, "visual_tokens": 0, "samples": 0}
    if W <= 0:
        return stats
    for b in batches:
        b = b.to(device)
        with autocast_context(device, autocast_dtype):
            loss_sum, _ = model.loss_terms(b)
        if poison:
            loss_sum, poison = loss_sum * float("nan"), False
        (loss_sum / W).backward()
        stats["loss"] += float(loss_sum.detach()) / W
        stats["text_tokens"] += b.text_tokens
        stats["visual_tokens"] += b.visual_tokens
        stats["samples"] += b.num_samples
    stats["tokens"] = stats["text_tokens"] + stats["visual_tokens"]
    return stats


@torch.no_grad()
def evaluate_loss(model, batches: Sequence[PackedBatch], device: torch.device) -> float:
    """sum(w * ce) / sum(w) over ``batches`` without gradients."""
    num, den = 0.0, 0.0
    for b in batches:
        ls, ws = model.loss_terms(b.to(device))
        num += float(ls)
        den += float(ws)
    return num / max(den, 1e-12)


class LocalRunner:
    """The single-process runner. ``engine.parallel.runner.ParallelRunner`` has the same
    interface for any layout: ``forward_backward``, ``clip_grad_norm``, ``optimizer``,
    ``state_dict``/``load_state_dict``."""

    def __init__(self, model, cfg: Config, device: torch.device, autocast_dtype: Optional[torch.dtype] = None,
                 pad_id: int = 0):
        from engine.optim import build_optimizer

        self.cfg = cfg
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.pad_id = pad_id
        self.poison_loss = False  # fault drill: set by the trainer for faults.nan_at_steps
        from engine.parallel.materialize import is_meta, materialize_for

        if is_meta(model):  # built on the meta device: one process holds every slice of the plan
            from engine.parallel.plan import plan_for

            model = materialize_for(model, cfg, plan_for(cfg), {"llm": (0, 1), "vit": (0, 1)}, device)
        self.model = model.to(device)
        self.optimizer = build_optimizer(self.model.named_parameters(), cfg.train, device)
        if cfg.balance.enabled:
            logging.getLogger("engine.balance").info("balance.enabled: one process, nothing to balance")

    def data_request(self, batch) -> dict:
        """One process loads every sample of a step, all its pixels."""
        return {pos: None for pos in range(len(batch))}

    def forward_backward(self, batch) -> dict:
        """One step over ``batch``: a ``StepBatch`` (loaded here) or samples in memory."""
        from engine.data.loader import StepBatch
        from engine.parallel.data_share import load_share

        step = batch if isinstance(batch, StepBatch) else None
        if step is not None:
            load_share(step, self.data_request, self.device)
            batch = step.samples()
        groups = [g for g in split_contiguous(batch, self.cfg.parallel.llm.microbatches) if g]
        batches = [pack(g, self.cfg, self.pad_id) for g in groups]
        stats = forward_backward(self.model, batches, self.device, self.autocast_dtype, poison=self.poison_loss)
        if step is not None:
            stats.update(step.data_stats())
        return stats

    def clip_grad_norm(self, max_norm: float) -> float:
        from engine.optim import clip_grad_norm

        return clip_grad_norm([p for p in self.model.parameters() if p.requires_grad], max_norm)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def full_state_dict(self) -> dict:
        """The whole model's weights in engine key names (gathered when parallel)."""
        return self.model.state_dict()
