"""The MPO objective: preference pairs through the one runner (``engine.step.LocalRunner`` or
``engine.parallel.runner.ParallelRunner``), which calls it at the points ``engine.parallel.objective``
lists. A step:

1. reference log-probs of the step's pairs: from the frozen reference model (sharded like the policy,
   a forward-only pass of the runner) or from the precomputed store;
2. the runner places the pairs on replicas and microbatches like samples (a pair is one item: its
   tokens are the chosen and the rejected sequence's, its tiles the shared image's); each microbatch's
   chosen and rejected sequences are packed together, its images encoded once per pair
   (``feature_index`` hands both sequences the same features);
3. per microbatch ``pref_weight * sum(DPO)/N + quality_weight * sum(BCO)/N + gen_weight * sum(w ce)/W``,
   with N the pairs and W the LM weight of the chosen responses of the global batch (both summed over
   data parallelism before any forward), so gradients do not depend on the split;
4. the reward shift ``delta`` of BCO is updated with the step's mean reward (kept in checkpoints).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from engine.config import Config
from engine.parallel.objective import Objective, PackContext, Packed
from engine.parallel.ulysses import local_slice
from engine.posttrain.config import MPOConfig
from engine.posttrain.logprobs import head_logps
from engine.posttrain.losses import STAT_KEYS, RewardShift, mpo_loss, summarize
from engine.posttrain.pairs import pack_pairs
from engine.posttrain.reference import ReferenceStore


def frozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref


def pair_logps(lm, layout, h: torch.Tensor, tokens, mb: Packed) -> tuple[torch.Tensor, torch.Tensor]:
    """Last stage: ``(log-probs [pairs, 2] (chosen, rejected), LM sum of the chosen responses)``, the
    same on every tp and hp rank."""
    pm = mb.extra
    b = pm.batch
    lm_w = local_slice(pm.lm_weights.to(h.device), layout.hp_group)
    logps, lm_sum = head_logps(lm.norm(h), lm.lm_head.weight, tokens.targets, lm_w, b.cu_seqlens.to(h.device),
                               tuple(b.input_ids.shape), pm.seq_segment.to(h.device), layout.loss_fn, layout.hp_group)
    return logps.view(-1, 2), lm_sum


class MPO(Objective):
    """Mixed Preference Optimization over ``PreferencePair`` items. ``reference``: the frozen
    reference model as the runner's ``shard_like`` returned it (``mpo.reference == 'model'``), or a
    ``ReferenceStore`` set with ``set_reference_store`` (``'precomputed'``)."""

    name = "mpo"
    stat_keys = STAT_KEYS

    def __init__(self, mpo: MPOConfig, cfg: Config):
        self.mpo, self.cfg = mpo, cfg
        self.shift = RewardShift()
        self.store: Optional[ReferenceStore] = None
        self.reference: Optional[nn.Module] = None
        self.num_pairs, self.lm_total, self.tiles = 0.0, 0.0, 0.0  # this step's, over the global batch
        self.ref: Optional[torch.Tensor] = None  # this step's reference log-probs [pairs, 2], step order

    def set_reference_store(self, store: ReferenceStore) -> None:
        """Use precomputed reference log-probs (``posttrain.mpo.reference=precomputed``)."""
        self.store = store

    # ------------------------------------------------------------------ the runner's calls
    def order(self, placement):
        return placement.groups  # tiles in pair order; ``feature_index`` reorders them per sequence

    def pack(self, items, order, group, ctx: PackContext) -> Packed:
        pm = pack_pairs([items[i] for i in group], ctx.cfg, ctx.pad_id, ctx.multiple)
        return Packed(pm.batch, list(group), pm.feature_index, pm)

    def totals(self, packed) -> list[float]:
        return [float(sum(p.extra.num_pairs for p in packed)),
                sum(float(p.extra.lm_weights.double().sum()) for p in packed),
                float(sum(p.extra.num_tiles for p in packed))]

    def begin(self, totals, batch, runner) -> bool:
        self.num_pairs, self.lm_total, self.tiles = (float(t) for t in totals)
        if self.num_pairs <= 0:
            return False
        self.ref = self.reference_logps(batch, runner)
        return True

    def reference_logps(self, batch, runner) -> torch.Tensor:
        """``[pairs, 2]`` float64 (chosen, rejected) reference log-probs of ``batch``, on every rank."""
        if self.store is not None:
            return self.store.lookup(batch.indices if hasattr(batch, "indices") else [p.index for p in batch])
        if self.reference is None:
            raise RuntimeError("posttrain.mpo.reference=precomputed but no reference store was set")
        return runner.forward_only(batch, self.score, 2, model=self.reference)

    @staticmethod
    def score(lm, layout, h, tokens, mb: Packed) -> torch.Tensor:
        """The ``forward_only`` head: ``[pairs, 2]`` sequence log-probs."""
        return pair_logps(lm, layout, h, tokens, mb)[0]

    def head(self, lm, layout, h, tokens, mb: Packed):
        m = self.mpo
        logps, lm_sum = pair_logps(lm, layout, h, tokens, mb)
        ref = self.ref[torch.tensor(mb.positions, dtype=torch.long)].to(logps.device)
        return mpo_loss(logps, ref, lm_sum, pref_weight=m.pref_weight, quality_weight=m.quality_weight,
                        gen_weight=m.gen_weight, beta=m.beta, delta=self.shift.delta, num_pairs=self.num_pairs,
                        lm_weight_total=self.lm_total)

    def finish(self, sums) -> dict:
        m, n = self.mpo, int(self.num_pairs)
        metrics = summarize(sums, n, (m.pref_weight, m.quality_weight, m.gen_weight))
        metrics["mpo/delta"] = self.shift.delta  # the shift this step used
        self.shift.update(0.5 * (metrics["rewards/chosen"] + metrics["rewards/rejected"]))
        metrics["pairs"], metrics["vit_tiles"] = n, int(self.tiles)
        return {"loss": metrics["loss"], "weight_total": float(n), "metrics": metrics}

    def state_dict(self) -> dict:
        return {"reward_shift": self.shift.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "reward_shift" not in state:
            raise ValueError("checkpoint lacks the MPO reward shift ('reward_shift'): not an MPO checkpoint?")
        self.shift.load_state_dict(state["reward_shift"])
