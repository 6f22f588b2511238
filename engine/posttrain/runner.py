"""MPO steps on one process (``MPOLocalRunner``) and on any parallel layout (``MPOParallelRunner``).

Both keep the interface of ``engine.step.LocalRunner`` (``forward_backward``, ``clip_grad_norm``,
``optimizer``, ``state_dict``) with preference pairs in place of samples. A step:

1. reference log-probs of every pair: from the frozen reference model (same layout, no
   gradients) or from the precomputed store;
2. pairs split contiguously over data-parallel replicas, then microbatches; each microbatch's
   chosen and rejected sequences packed together, its images encoded once per pair;
3. per microbatch ``pref_weight * sum(DPO)/N + quality_weight * sum(BCO)/N + gen_weight * sum(w ce)/W``
   backward, with N the pairs and W the LM weight of the chosen responses of the global batch,
   so gradients do not depend on the split;
4. the reward shift ``delta`` of BCO is updated with the step's mean reward (kept in ``state_dict``).
"""

from __future__ import annotations

import copy
import functools
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from engine.config import Config
from engine.parallel.runner import Microbatch, ParallelRunner
from engine.posttrain.config import MPOConfig
from engine.posttrain.logprobs import head_logps, model_logps
from engine.posttrain.losses import STAT_KEYS, RewardShift, mpo_loss, summarize
from engine.posttrain.pairs import PairMicrobatch, lm_weight_total, pack_pairs, pair_pixels
from engine.posttrain.preference import PreferencePair
from engine.posttrain.reference import ReferenceStore
from engine.data.packing import split_contiguous
from engine.models.layers import autocast_context
from engine.step import LocalRunner

COUNT_KEYS = ("text_tokens", "visual_tokens", "vit_tiles")


def frozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref


class _MPOSteps:
    """What both runners share: reference look-up, the loss weights, metrics and the reward shift."""

    cfg: Config
    mpo: MPOConfig
    shift: RewardShift
    store: Optional[ReferenceStore]
    last_metrics: dict

    def _init_mpo(self, mpo: MPOConfig) -> None:
        self.mpo = mpo
        self.shift = RewardShift()
        self.store = None
        self.last_metrics = {}

    def set_reference_store(self, store: ReferenceStore) -> None:
        """Use precomputed reference log-probs (``posttrain.mpo.reference=precomputed``)."""
        self.store = store

    def reference_logps(self, pairs: Sequence[PreferencePair]) -> torch.Tensor:
        """``[pairs, 2]`` float64 (chosen, rejected) reference log-probs, on every rank."""
        if self.store is not None:
            return self.store.lookup(pairs)
        if getattr(self, "reference", None) is None:
            raise RuntimeError("posttrain.mpo.reference=precomputed but no reference store was set")
        return self.sequence_logps(pairs, self.reference)

    def _loss_kwargs(self, pairs: Sequence[PreferencePair]) -> dict:
        m = self.mpo
        return dict(pref_weight=m.pref_weight, quality_weight=m.quality_weight, gen_weight=m.gen_weight, beta=m.beta,
                    delta=self.shift.delta, num_pairs=float(len(pairs)),
                    lm_weight_total=lm_weight_total(pairs, self.cfg.data.loss_reduction))

    def _finish(self, sums: dict[str, float], counts: dict[str, float], num_pairs: int) -> dict:
        m = self.mpo
        metrics = summarize(sums, num_pairs, (m.pref_weight, m.quality_weight, m.gen_weight))
        metrics["mpo/delta"] = self.shift.delta  # the shift this step used
        self.shift.update(0.5 * (metrics["rewards/chosen"] + metrics["rewards/rejected"]))
        metrics["vit_tiles"] = int(counts["vit_tiles"])
        self.last_metrics = metrics
        text, visual = int(counts["text_tokens"]), int(counts["visual_tokens"])
        return {"loss": metrics["loss"], "weight_total": float(num_pairs), "tokens": text + visual,
                "text_tokens": text, "visual_tokens": visual, "samples": 2 * num_pairs}

    def _empty(self) -> dict:
        self.last_metrics = {}
        return {"loss": 0.0, "weight_total": 0.0, "tokens": 0, "text_tokens": 0, "visual_tokens": 0, "samples": 0}

    def extra_state_dict(self) -> dict:
        """State besides model and optimizer, the same on every rank (saved with checkpoints)."""
        return {"reward_shift": self.shift.state_dict()}

    def load_extra_state_dict(self, state: dict) -> None:
        if "reward_shift" not in state:
            raise ValueError("checkpoint lacks the MPO reward shift ('reward_shift'): not an MPO checkpoint?")
        self.shift.load_state_dict(state["reward_shift"])

    def _shift_state(self, state: dict) -> dict:
        return {**state, **self.extra_state_dict()}

    def _load_shift(self, state: dict) -> None:
        self.load_extra_state_dict(state)


class MPOLocalRunner(_MPOSteps, LocalRunner):
    """One process. ``reference`` (built from ``model`` when ``mpo.reference == 'model'``) is a
    frozen copy of the initial policy."""

    def __init__(self, model, cfg: Config, mpo: MPOConfig, device: torch.device,
                 autocast_dtype: Optional[torch.dtype] = None, pad_id: int = 0):
        self._init_mpo(mpo)
        self.reference = frozen_copy(model).to(device) if mpo.reference == "model" else None
        LocalRunner.__init__(self, model, cfg, device, autocast_dtype, pad_id)

    def _microbatches(self, pairs: Sequence[PreferencePair]) -> list[tuple[list[PreferencePair], PairMicrobatch]]:
        groups = [g for g in split_contiguous(list(pairs), self.cfg.parallel.llm.microbatches) if g]
        return [(g, pack_pairs(g, self.cfg, self.pad_id).to(self.device)) for g in groups]

    def _encode(self, model, group: Sequence[PreferencePair]) -> Optional[torch.Tensor]:
        px = pair_pixels(group)
        return None if px is None else model.extract_feature(px.to(self.device))

    @torch.no_grad()
    def sequence_logps(self, pairs: Sequence[PreferencePair], model=None) -> torch.Tensor:
        """``[pairs, 2]`` float64 log-probs under ``model`` (default: the policy), no gradients."""
        model = self.model if model is None else model
        out = [torch.zeros(0, 2, dtype=torch.float64)]
        for group, mb in self._microbatches(pairs):
            with autocast_context(self.device, self.autocast_dtype):
                logps, _ = model_logps(model, mb, self._encode(model, group))
            out.append(logps.view(-1, 2).double().cpu())
        return torch.cat(out)

    def forward_backward(self, pairs: Sequence[PreferencePair]) -> dict:
        if not pairs:
            return self._empty()
        ref = self.reference_logps(pairs)
        kw = self._loss_kwargs(pairs)
        sums = dict.fromkeys(STAT_KEYS, 0.0)
        counts = dict.fromkeys(COUNT_KEYS, 0.0)
        start = 0
        for group, mb in self._microbatches(pairs):
            with autocast_context(self.device, self.autocast_dtype):
                logps, lm_sum = model_logps(self.model, mb, self._encode(self.model, group))
                loss, stats = mpo_loss(logps.view(-1, 2), ref[start:start + len(group)].to(self.device), lm_sum, **kw)
            loss.backward()
            start += len(group)
            for k, v in stats.items():
                sums[k] += v
            counts["text_tokens"] += mb.batch.text_tokens
            counts["visual_tokens"] += mb.batch.visual_tokens
            counts["vit_tiles"] += mb.num_tiles
        return self._finish(sums, counts, len(pairs))

    def state_dict(self) -> dict:
        return self._shift_state(LocalRunner.state_dict(self))

    def load_state_dict(self, state: dict) -> None:
        LocalRunner.load_state_dict(self, state)
        self._load_shift(state)


class MPOStages:
    """Pipeline stage functions of the policy: embedding / decoder slices / MPO head. The last
    virtual stage turns the microbatch's log-probs into its share of the MPO loss."""

    def __init__(self, runner: "MPOParallelRunner", mbs: Sequence[Microbatch], packed: Sequence[PairMicrobatch],
                 refs: Sequence[torch.Tensor], loss_kwargs: dict, autocast):
        self.r, self.mbs, self.packed, self.refs, self.kw, self.autocast = runner, mbs, packed, refs, loss_kwargs, autocast
        self.sums = dict.fromkeys(STAT_KEYS, 0.0)

    def forward(self, chunk: int, microbatch: int, x: Optional[torch.Tensor]) -> torch.Tensor:
        r = self.r
        with self.autocast():
            h, done = r.stage_forward(r.model, r.layout.llm, chunk, self.mbs[microbatch], x)
            if not done:
                return h
            logps = r.stage_head(r.model, r.layout.llm, h, self.mbs[microbatch], self.packed[microbatch])
            loss, stats = mpo_loss(logps[0].view(-1, 2), self.refs[microbatch].to(logps[0].device), logps[1], **self.kw)
        for k, v in stats.items():
            self.sums[k] += v
        return loss

    def recv_shape(self, chunk: int, microbatch: int) -> tuple[int, ...]:
        return self.mbs[microbatch].shape


class MPOParallelRunner(_MPOSteps, ParallelRunner):
    """Any layout of ``cfg.parallel`` (tp, sp, hp, pp with vpp, dp, ViT grid). The reference
    model is sharded exactly like the policy."""

    def __init__(self, model, cfg: Config, mpo: MPOConfig, device: torch.device,
                 autocast_dtype: Optional[torch.dtype] = None, pad_id: int = 0):
        self._init_mpo(mpo)
        ref_full = frozen_copy(model) if mpo.reference == "model" else None
        ParallelRunner.__init__(self, model, cfg, device, autocast_dtype, pad_id)
        self.reference, self.ref_layout = None, None
        if ref_full is not None:
            from engine.parallel.parallelize import keep_stage, parallelize_model

            self.reference, self.ref_layout = parallelize_model(ref_full, self.topo, cfg, self.plan)  # on the host first
            keep_stage(self.reference, self.plan, self.pp_rank)
            self.reference.requires_grad_(False).to(device)

    # ------------------------------------------------------------------ stage pieces
    def stage_forward(self, model, layout, chunk: int, mb: Microbatch, x: Optional[torch.Tensor]):
        """(activation, is last virtual stage) of ``chunk`` on this rank."""
        from engine.parallel.parallelize import embed_tokens
        lm, P = model.language_model, self.cfg.parallel.llm.pp
        vs = chunk * P + self.pp_rank
        h = embed_tokens(lm, layout, mb.tokens, mb.image_embeds) if vs == 0 else x
        h = lm.forward_layers(h, mb.tokens.context, self.ranges[chunk])
        return h, vs == P * len(self.ranges) - 1

    def stage_head(self, model, layout, h: torch.Tensor, mb: Microbatch, packed: PairMicrobatch):
        """Last stage: (log-probs [sequences], LM sum), the same on every tp and hp rank."""
        from engine.parallel.ulysses import local_slice

        lm, b = model.language_model, packed.batch
        lm_w = local_slice(packed.lm_weights.to(h.device), layout.hp_group)
        return head_logps(lm.norm(h), lm.lm_head.weight, mb.tokens.targets, lm_w, b.cu_seqlens, tuple(b.input_ids.shape),
                          packed.seq_segment.to(h.device), layout.loss_fn, layout.hp_group)

    # ------------------------------------------------------------------ step plumbing
    def _plan(self, pairs: Sequence[PreferencePair]):
        """(assignment [replica][microbatch] pair positions, this replica's packed microbatches, exchange plan)."""
        from engine.parallel.exchange import ExchangePlan

        llm, M = self.topo.llm, self.cfg.parallel.llm.microbatches
        assignment = [split_contiguous(rep, M) for rep in split_contiguous(list(range(len(pairs))), llm.size("dp"))]
        mine = assignment[llm.coord("dp")]
        packed = [pack_pairs([pairs[i] for i in g], self.cfg, self.pad_id, self.layout.llm.token_multiple) for g in mine]
        plan = ExchangePlan.naive([p.num_tiles for p in pairs], self.topo, assignment)
        return assignment, packed, plan

    def _features(self, model, plan, pairs, grad: bool) -> torch.Tensor:
        """This rank's ViT share, exchanged to the LLM's first stage (pair order per microbatch)."""
        pixels = self.exchange.local_pixels(plan, [p.pixel_values for p in pairs]).to(self.device)
        dtype = self.autocast_dtype or torch.float32
        with torch.set_grad_enabled(grad), autocast_context(self.device, self.autocast_dtype):
            if pixels.shape[0]:
                out = model.extract_feature(pixels).to(dtype)
            else:
                m = self.cfg.model
                out = torch.zeros(0, m.num_image_token, m.llm.hidden_size, dtype=dtype, device=self.device,
                                  requires_grad=grad and self.vit_trainable)
            return self.exchange.forward(out, plan)

    def _microbatches(self, packed: Sequence[PairMicrobatch], feats: torch.Tensor, plan, layout) -> list[Microbatch]:
        from engine.parallel.parallelize import shard_tokens

        H, hidden = self.layout.llm.token_multiple, self.cfg.model.llm.hidden_size
        out = []
        for mb, rows in zip(packed, self.exchange.microbatch_rows(plan)):
            b = mb.batch.to(self.device)
            emb = None
            if rows.stop > rows.start:
                emb = feats[rows].index_select(0, mb.feature_index.to(self.device))
            out.append(Microbatch(shard_tokens(b, layout), emb, (b.input_ids.shape[0], b.input_ids.shape[1] // H, hidden)))
        return out

    def _is_reporter(self) -> bool:
        """One rank per data-parallel replica reports its sums: the last stage's tp = hp = 0 rank."""
        llm = self.topo.llm
        return self.pp_rank == llm.size("pp") - 1 and llm.coord("tp") == 0 and llm.coord("hp") == 0

    @torch.no_grad()
    def sequence_logps(self, pairs: Sequence[PreferencePair], model=None) -> torch.Tensor:
        """``[pairs, 2]`` float64 log-probs under ``model`` (default: the policy) on every rank: a
        forward-only pass through the pipeline (collective over the world)."""
        if model is None or model is self.model:
            model, layout = self.model, self.layout.llm
        else:
            layout = self.ref_layout.llm
        assignment, packed, plan = self._plan(pairs)
        feats = self._features(model, plan, pairs, grad=False)
        mbs = self._microbatches(packed, feats, plan, layout)
        llm = self.topo.llm
        P, V = llm.size("pp"), len(self.ranges)
        group, ranks = llm.group("pp"), llm.ranks("pp")
        out = torch.zeros(len(pairs), 2, dtype=torch.float64, device=self.device)  # NCCL reduces device tensors
        autocast = functools.partial(autocast_context, self.device, self.autocast_dtype)
        for m, (mb, mbp) in enumerate(zip(mbs, packed)):
            x = None
            for vs in range(P * V):
                owner, chunk = vs % P, vs // P
                if owner != self.pp_rank:
                    continue
                if vs > 0:
                    x = torch.empty(mb.shape, dtype=torch.float32, device=self.device)
                    dist.recv(x, ranks[(vs - 1) % P], group=group)
                with autocast():
                    h, last = self.stage_forward(model, layout, chunk, mb, x)
                    if last:
                        logps, _ = self.stage_head(model, layout, h, mb, mbp)
                if not last:
                    dist.send(h.float().contiguous(), ranks[(vs + 1) % P], group=group)
                elif self._is_reporter():
                    idx = torch.tensor(assignment[llm.coord("dp")][m], dtype=torch.long, device=self.device)
                    out[idx] = logps.view(-1, 2).double()
        dist.all_reduce(out)
        return out.cpu()

    def forward_backward(self, pairs: Sequence[PreferencePair]) -> dict:
        if not pairs:
            return self._empty()
        ref = self.reference_logps(pairs)
        kw = self._loss_kwargs(pairs)
        llm = self.topo.llm
        assignment, packed, plan = self._plan(pairs)
        embeds = self._features(self.model, plan, pairs, grad=True)
        leaf = embeds.detach().requires_grad_(embeds.requires_grad)
        mbs = self._microbatches(packed, leaf, plan, self.layout.llm)
        refs = [ref[torch.tensor(g, dtype=torch.long)] for g in assignment[llm.coord("dp")]]
        autocast = functools.partial(autocast_context, self.device, self.autocast_dtype)
        stages = MPOStages(self, mbs, packed, refs, kw, autocast)
        self.executor.run(self.program, stages)
        if embeds.requires_grad:  # collective: every rank runs the reverse exchange
            torch.autograd.backward(embeds, leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))
        self._reduce_grads()

        report = self._is_reporter()
        local = [stages.sums[k] if report else 0.0 for k in STAT_KEYS]
        local += [float(sum(mb.batch.text_tokens for mb in packed)) if report else 0.0,
                  float(sum(mb.batch.visual_tokens for mb in packed)) if report else 0.0,
                  float(sum(mb.num_tiles for mb in packed)) if report else 0.0]
        totals = torch.tensor(local, dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        values = totals.cpu().tolist()
        sums = dict(zip(STAT_KEYS, values[:len(STAT_KEYS)]))
        counts = dict(zip(COUNT_KEYS, values[len(STAT_KEYS):]))
        return self._finish(sums, counts, len(pairs))

    def state_dict(self) -> dict:
        return self._shift_state(ParallelRunner.state_dict(self))

    def load_state_dict(self, state: dict) -> None:
        ParallelRunner.load_state_dict(self, state)
        self._load_shift(state)


def build_mpo_runner(model, cfg: Config, mpo: MPOConfig, device: torch.device, world: int,
                     autocast_dtype: Optional[torch.dtype] = None, pad_id: int = 0):
    cls = MPOParallelRunner if world > 1 else MPOLocalRunner
    return cls(model, cfg, mpo, device, autocast_dtype, pad_id)


