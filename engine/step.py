"""The single-process runner: one optimisation step, every microbatch on this process.

It is the reference the parallel runner (``engine.parallel.runner.ParallelRunner``, same interface)
is tested against, and it calls the same objective (``engine.parallel.objective``) at the same points:
samples split contiguously over ``parallel.llm.microbatches`` microbatches, the objective packs each
and gives the step's loss normalisers before any forward (language modelling: W, the token weights
of the whole step, so gradients equal those of one big batch however the samples were split), then
per microbatch ViT -> embedding -> decoder layers -> the objective's head, and backward.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from engine.balance.layout import Layout
from engine.balance.placement import place, sample_shapes
from engine.config import Config
from engine.data.loader import StepBatch
from engine.data.packing import first_fit
from engine.models.layers import autocast_context
from engine.parallel.data_share import load_share
from engine.parallel.objective import (LanguageModelling, Objective, PackContext, Packed, count_stats,
                                      empty_step_stats, packed_counts)
from engine.parallel.parallelize import LLMLayout, embed_tokens, shard_tokens
from engine.parallel.topology import build_grid
from engine.precision import apply_param_dtype, autocast_for


class LocalRunner:
    """The single-process runner. ``engine.parallel.runner.ParallelRunner`` has the same
    interface for any layout: ``forward_backward``, ``clip_grad_norm``, ``optimizer``,
    ``state_dict``/``load_state_dict``."""

    def __init__(self, model, cfg: Config, device: torch.device, autocast_dtype: Optional[torch.dtype] = None,
                 pad_id: int = 0, objective: Optional[Objective] = None):
        from engine.optim import build_optimizer

        self.cfg = cfg
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.pad_id = pad_id
        self.poison_loss = False  # fault drill: set by the trainer for faults.nan_at_steps
        self.objective = objective if objective is not None else LanguageModelling()
        self.last_packed: list[Packed] = []
        self._grid = build_grid("llm", {"tp": 1, "hp": 1, "dp": 1, "pp": 1}, 0, 1, create_groups=False)
        from engine.parallel.materialize import is_meta, materialize_for

        if is_meta(model):  # built on the meta device: one process holds every slice of the plan
            from engine.parallel.plan import plan_for

            model = materialize_for(model, cfg, plan_for(cfg), {"llm": (0, 1), "vit": (0, 1)}, device)
        self.model = model.to(device)
        param_dtype = apply_param_dtype(self.model, cfg.train.param_dtype, device)  # before the optimizer's masters
        self.autocast_dtype = autocast_for(param_dtype, autocast_dtype)
        self.optimizer = build_optimizer(self.model.named_parameters(), cfg.train, device)
        if cfg.balance.enabled:
            logging.getLogger("engine.balance").info("balance.enabled: one process, nothing to balance")

    def data_request(self, batch) -> dict:
        """One process loads every sample of a step, all its pixels."""
        return {pos: None for pos in range(len(batch))}

    def layout(self, model=None) -> LLMLayout:
        """The LLM layout of one process (no groups; the model's own loss function)."""
        model = self.model if model is None else model
        return LLMLayout(self._grid, False, model.loss_fn, self.cfg.model.img_context_token_id)

    def _pack_step(self, step: StepBatch) -> tuple[list, list[Packed]]:
        """(the step's items, its microbatches): contiguous groups, packed by the objective."""
        cfg = self.cfg
        if "local_placement" not in step.memo:
            one = Layout(world=1, microbatches=cfg.parallel.llm.microbatches,
                         max_packed_tokens=cfg.data.max_packed_tokens, num_image_token=cfg.model.num_image_token)
            shapes = sample_shapes(step.num_tokens, step.image_tiles, one.num_image_token)
            step.memo["local_placement"] = place(shapes, one, first_fit, balanced=False)
        placement = step.memo["local_placement"]
        items, ctx = step.samples(), PackContext(cfg, self.pad_id)
        order = self.objective.order(placement)[0]
        return items, [self.objective.pack(items, o, g, ctx) for o, g in zip(order, placement.groups[0]) if g]

    def _hidden(self, model, layout: LLMLayout, items, mb: Packed):
        """(tokens, last decoder layer's output) of one microbatch."""
        chunks = [items[i].pixel_values for i in mb.positions if items[i].pixel_values is not None and items[i].num_tiles]
        feats = None
        if chunks:
            feats = model.extract_feature(torch.cat(chunks).to(self.device))
            if mb.feature_index is not None:
                feats = feats.index_select(0, mb.feature_index.to(self.device))
        tokens = shard_tokens(mb.batch.to(self.device), layout)
        lm = model.language_model
        return tokens, lm.forward_layers(embed_tokens(lm, layout, tokens, feats), tokens.context)

    def forward_backward(self, batch) -> dict:
        """One step over ``batch``: a ``StepBatch`` (loaded here) or items in memory."""
        step = batch if isinstance(batch, StepBatch) else StepBatch.from_samples(batch)
        load_share(step, self.data_request, self.device)
        items, packed = self._pack_step(step)
        self.last_packed = packed  # the step's microbatches (tools read their shapes)
        obj, layout, lm = self.objective, self.layout(), self.model.language_model
        stats = {**empty_step_stats(), **step.data_stats()}
        if not obj.begin(obj.totals(packed), step, self):
            return stats
        sums, poison = dict.fromkeys(obj.stat_keys, 0.0), self.poison_loss
        for mb in packed:
            with autocast_context(self.device, self.autocast_dtype):
                tokens, h = self._hidden(self.model, layout, items, mb)
                loss, terms = obj.head(lm, layout, h, tokens, mb)
            if poison:  # the fault drill faults.nan_at_steps
                loss, terms, poison = loss * float("nan"), {k: float("nan") for k in terms}, False
            loss.backward()
            for k, v in terms.items():
                sums[k] += v
        stats.update(obj.finish(sums))
        stats.update(count_stats(*packed_counts(packed)))
        return stats

    @torch.no_grad()
    def forward_only(self, batch, head, width: int, model=None) -> torch.Tensor:
        """``[items, width]`` float64: ``head(lm, layout, h, tokens, packed)`` of every microbatch (values
        in ``packed.positions`` order), under ``model`` (default: the policy), without gradients."""
        step = batch if isinstance(batch, StepBatch) else StepBatch.from_samples(batch)
        load_share(step, self.data_request, self.device)
        model = self.model if model is None else model
        items, packed = self._pack_step(step)
        layout = self.layout(model)
        out = torch.zeros(len(step), width, dtype=torch.float64)
        for mb in packed:
            with autocast_context(self.device, self.autocast_dtype):
                tokens, h = self._hidden(model, layout, items, mb)
                values = head(model.language_model, layout, h, tokens, mb)
            out[torch.tensor(mb.positions, dtype=torch.long)] = values.double().cpu()
        return out

    def shard_like(self, model):
        """A frozen copy of a model (e.g. a reference model) on this runner's device, for ``forward_only``."""
        model = model.requires_grad_(False).to(self.device)
        apply_param_dtype(model, self.cfg.train.param_dtype, self.device, announce=False)
        return model

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

    def extra_state_dict(self) -> dict:
        """The objective's state (e.g. MPO's reward shift); saved with checkpoints."""
        return self.objective.state_dict()

    def load_extra_state_dict(self, state: dict) -> None:
        self.objective.load_state_dict(state)
