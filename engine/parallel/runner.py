"""``ParallelRunner``: one optimisation step on any layout, with ``LocalRunner``'s interface.

Every rank sees the same step as shapes (``StepBatch``: token counts and tiles per image from the
shape index) and loads only its own share of it (``engine.parallel.data_share``). Per step:
1. placement (``engine.balance.placement``): with ``balance.enabled`` the balancer assigns samples
   to the LLM data-parallel replicas, their ``parallel.llm.microbatches`` microbatches and packed
   rows, and tiles to the ViT data-parallel ranks; otherwise samples split contiguously over the
   replicas and microbatches and tiles contiguously over the ViT ranks. Every rank computes the same
   placement from the same shapes (seeded by ``train.seed`` and the step's first sample index), so
   nothing is broadcast; a checksum gathered after the step proves it. The rank then loads the tokens
   of its replica's samples and the pixels of its ViT rank's tiles. Each microbatch is packed
   (rows padded to the token-split multiple);
2. the objective (``engine.parallel.objective``: language modelling, or MPO) packs each microbatch
   and gives its loss normalisers (for language modelling W, the token weights of the whole global
   batch), summed over the replicas before any forward, so where a sample is placed does not change
   the loss or the gradients;
3. ViT: each ViT data-parallel rank encodes its tiles of the ``ExchangePlan``, the embeddings go
   to the first pipeline stage of the replica that consumes them (``VisualExchange``);
4. LLM: the pipeline schedule (1F1B, or interleaved with ``vpp > 1``); on the last stage the
   objective's head gives the microbatch's share of the step loss (language modelling: sum(w*ce)/W);
5. the exchange and the ViT run backward from the gradients of the embeddings;
6. partial gradients are summed over their model-parallel groups, then over data parallelism,
   each module over its own grid.

Step statistics ``data/*``: the most samples tokenised, images and tiles decoded, and seconds waited
for data on any rank. ``balance/*``: predicted max/mean imbalance of the placement (cost model) and the
measured one (compute time of the ViT forward+backward and of the LLM pipeline without its
communication, per rank, averaged over the ranks of each ViT rank / LLM replica; on a CPU also by
process CPU time, ``*_meas_cpu``), bytes the exchange moved between ranks, the placement's time, and
how many samples and tiles it moved off the naive split.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from engine.balance.cost import CostModel
from engine.balance.layout import Layout
from engine.balance.measure import ComputeClock, group_imbalance
from engine.balance.placement import Placement, moved
from engine.config import Config, ConfigError
from engine.data.loader import StepBatch
from engine.models.llm import QwenLM
from engine.optim import clip_grad_norm
from engine.parallel.data_parallel import GradReducer, build_zero_optimizer
from engine.parallel.data_share import load_share, place_step, rank_share
from engine.parallel.exchange import ExchangePlan, VisualExchange
from engine.parallel.objective import (LanguageModelling, Objective, PackContext, Packed, count_stats,
                                      empty_step_stats, packed_counts)
from engine.parallel.materialize import is_meta, materialize_for
from engine.parallel.parallelize import (LLMLayout, check_layout, embed_tokens, gather_full_state_dict, keep_stage,
                                         parallelize_model, reduce_model_parallel_grads, shard_tokens)
from engine.parallel.pipeline import PipelineExecutor, build_program
from engine.parallel.plan import plan_for
from engine.parallel.tensor_parallel import shard_info
from engine.parallel.topology import Grid, build_topology
from engine.parallel.ulysses import LocalTokens
from engine.watchdog import Watchdog
from engine.models.layers import autocast_context
from engine.precision import apply_param_dtype, autocast_for

log = logging.getLogger("engine.balance")


@dataclass
class Microbatch:
    """One microbatch as this rank's stages see it (every rank of a pipeline packs all of them)."""

    tokens: LocalTokens
    image_embeds: Optional[torch.Tensor]  # [tiles, tokens, hidden]: first stage only
    shape: tuple[int, ...]  # this rank's activation between stages


class LLMStages:
    """The pipeline stage module of this rank: embedding on the first virtual stage, a slice of
    decoder layers per chunk, the objective's head on the last (its loss: this microbatch's share)."""

    def __init__(self, lm: QwenLM, layout: LLMLayout, ranges: Sequence[range], pp: int, rank: int,
                 microbatches: Sequence[Microbatch], objective: Objective, packed: Sequence[Packed],
                 autocast=contextlib.nullcontext, poison: bool = False):
        self.lm, self.layout, self.ranges, self.pp, self.rank = lm, layout, list(ranges), pp, rank
        self.mbs, self.objective, self.packed, self.autocast = microbatches, objective, packed, autocast
        self.sums = dict.fromkeys(objective.stat_keys, 0.0)  # over the microbatches (last stage only)
        self.poison = poison  # fault drill: this rank's first loss becomes NaN

    def forward(self, chunk: int, microbatch: int, x: Optional[torch.Tensor]) -> torch.Tensor:
        mb, vs = self.mbs[microbatch], chunk * self.pp + self.rank
        with self.autocast():
            h = embed_tokens(self.lm, self.layout, mb.tokens, mb.image_embeds) if vs == 0 else x
            h = self.lm.forward_layers(h, mb.tokens.context, self.ranges[chunk])
            if vs < self.pp * len(self.ranges) - 1:
                return h
            loss, stats = self.objective.head(self.lm, self.layout, h, mb.tokens, self.packed[microbatch])
        if self.poison:
            loss, self.poison = loss * float("nan"), False
            stats = {k: float("nan") for k in stats}
        for k, v in stats.items():
            self.sums[k] += v
        return loss

    def recv_shape(self, chunk: int, microbatch: int) -> tuple[int, ...]:
        return self.mbs[microbatch].shape


class TimedExecutor(PipelineExecutor):
    """``PipelineExecutor`` that adds the time of its communication steps to ``clock``'s span ``"llm_comm"``
    and tells the hang watchdog which stages it exchanges with."""

    def __init__(self, *args, clock: ComputeClock, watchdog: Watchdog, **kwargs):
        super().__init__(*args, **kwargs)
        self.clock, self.watchdog = clock, watchdog

    def _communicate(self, comm, inbox, outbox, saved, stages) -> None:
        peers = sorted({self.pp_ranks[m.peer] for m in comm.ops})
        wd = self.watchdog
        phase, collective = wd.phase, wd.collective
        wd.enter(f"pipeline send/recv with rank(s) {peers}", collective=True)
        with self.clock.span("llm_comm"):
            super()._communicate(comm, inbox, outbox, saved, stages)
        wd.enter(phase, collective)


def load_cost_model(cfg: Config, value_bytes: int = 4) -> CostModel:
    """``balance.cost_file`` (from tools/calibrate_cost.py), else the defaults with this model's
    embedding size (hidden x ``value_bytes``, the bytes of one exchanged value)."""
    path = cfg.balance.cost_file
    if path:
        try:
            return CostModel.load(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"balance.cost_file={path!r}: {e}") from None
    return CostModel(exchange_bytes_per_token=cfg.model.llm.hidden_size * value_bytes)


def counted_once(p: torch.Tensor, grid: Grid) -> bool:
    """Whether this rank counts ``p`` in the global norm: after the data-parallel sum gradients
    are equal over dp and hp; over tp only sharded parameters differ (replicas count once)."""
    if grid.coord("dp") or grid.coord("hp"):
        return False
    info = shard_info(p)
    return grid.coord("tp") % (info.replicas if info.dim is not None else grid.size("tp")) == 0


def straggler_stats(compute_seconds) -> dict:
    """The step's slowest rank by its own compute time (ViT and LLM spans, communication and waits
    excluded) and that time over the median rank's."""
    import numpy as np

    t = np.asarray(compute_seconds, dtype=np.float64)
    slowest, median = int(t.argmax()), float(np.median(t))
    return {"straggler/rank": slowest, "straggler/ratio": float(t[slowest] / median) if median > 0 else 1.0}


class ParallelRunner:
    """Runs ``model`` under the layout of ``cfg.parallel`` over the default process group. ``model``
    is the single-process model, either built on the meta device (``build_model(cfg, meta=True)``:
    this rank then materialises only its own shards, on its device) or a real one identical on
    every rank (cut into shards on the host)."""

    def __init__(self, model, cfg: Config, device: torch.device, autocast_dtype: Optional[torch.dtype] = None,
                 pad_id: int = 0, objective: Optional[Objective] = None):
        if not dist.is_initialized():
            raise RuntimeError("ParallelRunner needs an initialised default process group (torchrun)")
        L = cfg.parallel.llm
        check_layout(cfg, dist.get_world_size())
        if L.pp > 1 and cfg.model.llm.tie_word_embeddings:
            raise ConfigError(f"parallel.llm.pp={L.pp} needs model.llm.tie_word_embeddings=false")
        self.cfg, self.device, self.autocast_dtype, self.pad_id = cfg, device, autocast_dtype, pad_id
        self.poison_loss = False  # fault drill: set by the trainer for faults.nan_at_steps
        self.objective = objective if objective is not None else LanguageModelling()
        self._frozen_layouts: dict[int, LLMLayout] = {}  # models from ``shard_like``
        self.topo = build_topology(cfg, dist.get_rank(), dist.get_world_size())
        self.plan = plan_for(cfg)
        self.model, self.layout = parallelize_model(model, self.topo, cfg, self.plan)  # on meta when built there
        llm, lm = self.topo.llm, self.model.language_model
        self.pp_rank = llm.coord("pp")
        self.ranges = self.plan.ranges[self.pp_rank]
        keep_stage(self.model, self.plan, self.pp_rank)
        if is_meta(self.model):  # only now, and only this rank's shards, get memory (on the device)
            materialize_for(self.model, cfg, self.plan, {"llm": (llm.coord("tp"), llm.size("tp")),
                                                         "vit": (self.topo.vit.coord("tp"), self.topo.vit.size("tp"))},
                            device)
        self.model.to(device)
        self.param_dtype = apply_param_dtype(self.model, cfg.train.param_dtype, device)  # before reducers, optimizer
        self.autocast_dtype = autocast_dtype = autocast_for(self.param_dtype, autocast_dtype)
        self.program = build_program(L.pp, L.vpp, self.pp_rank, L.microbatches)
        self.clock = ComputeClock(device)
        self.executor = TimedExecutor(llm.group("pp"), llm.ranks("pp"), self.pp_rank, L.vpp, device,
                                      dtype=self.param_dtype,  # bf16 parameters: bf16 activations
                                      clock=self.clock, watchdog=Watchdog(0))  # the trainer's replaces it
        if llm.group("pp") is not None:  # NCCL wants every rank of the group in its first (batched p2p) call
            dist.all_reduce(torch.zeros(1, device=device), group=llm.group("pp"))
        self.exchange = VisualExchange(self.topo)
        self.balance_layout = Layout.from_config(cfg, dist.get_world_size())
        self.cost = load_cost_model(cfg, (autocast_dtype or torch.float32).itemsize)
        self.last_placement: Optional[Placement] = None
        if cfg.balance.enabled:
            log.info("balance: enabled over %d LLM replicas x %d microbatches and %d ViT ranks; cost model %s",
                     self.balance_layout.llm_dp, L.microbatches, self.balance_layout.vit_ranks,
                     cfg.balance.cost_file or "defaults")

        vit_named = [(f"vision_model.{n}", p) for n, p in self.model.vision_model.named_parameters()]
        vit_named += [(f"projector.{n}", p) for n, p in self.model.projector.named_parameters()]
        llm_named = [(f"language_model.{n}", p) for n, p in lm.named_parameters()]
        self.grids = [(self.topo.vit, [p for _, p in vit_named if p.requires_grad]),
                      (llm, [p for _, p in llm_named if p.requires_grad])]
        self.reducers = []
        for grid, params in self.grids:  # an "hp" partial sum fuses with the data-parallel sum
            fused = [p for p in params if shard_info(p).grad_sum == "hp"]
            rest = [p for p in params if shard_info(p).grad_sum != "hp"]
            bucket = cfg.parallel.bucket_mb
            self.reducers += [GradReducer(fused, grid.group("dp_hp"), bucket), GradReducer(rest, grid.group("dp"), bucket)]
        self.vit_trainable = bool(self.grids[0][1])
        if cfg.parallel.zero1:
            self.optimizer = build_zero_optimizer([(vit_named, self.topo.vit.group("dp_hp")),
                                                   (llm_named, llm.group("dp_hp"))], cfg.train)
        else:
            from engine.optim import build_optimizer

            self.optimizer = build_optimizer(self.model.named_parameters(), cfg.train, device)

    # ------------------------------------------------------------------ one step
    def _place(self, batch: StepBatch) -> tuple[Placement, Placement]:
        """(placement used this step, the naive placement), the same on every rank."""
        return place_step(batch, self.balance_layout, self.cost, self.cfg.balance.enabled, self.cfg.train.seed)

    @property
    def watchdog(self) -> Watchdog:
        """The hang watchdog the runner and its pipeline executor report their phases to."""
        return self.executor.watchdog

    @watchdog.setter
    def watchdog(self, wd: Watchdog) -> None:
        self.executor.watchdog = wd

    def data_request(self, batch: StepBatch) -> dict:
        """What this rank loads of ``batch`` (the loader asks ahead of the step when prefetching)."""
        return rank_share(self._place(batch)[0], self.topo.llm.coord("dp"), self.exchange.vit_rank())

    def _pack_step(self, batch: StepBatch):
        """(placement, naive placement, the loaded items, this replica's ``Packed`` microbatches, tile order)."""
        placement, naive = self._place(batch)
        items = batch.samples()
        order = self.objective.order(placement)
        d = self.topo.llm.coord("dp")
        ctx = PackContext(self.cfg, self.pad_id, self.layout.llm.token_multiple)
        packed = [self.objective.pack(items, o, g, ctx) for o, g in zip(order[d], placement.groups[d])]
        return placement, naive, items, packed, order

    def _microbatches(self, packed: Sequence[Packed], feats: torch.Tensor, plan: ExchangePlan,
                      layout: LLMLayout) -> list[Microbatch]:
        """This rank's view of each microbatch: its tokens (hp/sp slice) and, on the first stage, its
        image features in the order it consumes them."""
        H, hidden = layout.token_multiple, self.cfg.model.llm.hidden_size
        out = []
        for p, rows in zip(packed, self.exchange.microbatch_rows(plan)):
            b = p.batch.to(self.device)
            emb = feats[rows] if rows.stop > rows.start else None
            if emb is not None and p.feature_index is not None:
                emb = emb.index_select(0, p.feature_index.to(self.device))
            out.append(Microbatch(shard_tokens(b, layout), emb, (b.input_ids.shape[0], b.input_ids.shape[1] // H,
                                                                 hidden)))
        return out

    def _exchange_plan(self, batch: StepBatch, placement: Placement, order, items) -> tuple[ExchangePlan, torch.Tensor]:
        """The step's exchange plan and the pixels this ViT rank encodes."""
        plan = ExchangePlan.from_ranges(batch.num_tiles, placement.vit, order)
        pixels = self.exchange.local_pixels(plan, [None if s is None else s.pixel_values for s in items], batch.num_tiles,
                                            [None if s is None else s.tile_ids for s in items])
        return plan, pixels.to(self.device)

    def _is_reporter(self) -> bool:
        """One rank per LLM replica reports its objective sums: the last stage's tp = hp = 0 rank."""
        llm = self.topo.llm
        return self.pp_rank == llm.size("pp") - 1 and llm.coord("tp") == 0 and llm.coord("hp") == 0

    def forward_backward(self, batch: StepBatch | Sequence) -> dict:
        """One step over ``batch`` (a ``StepBatch``, or items in memory on every rank)."""
        llm, lm, obj = self.topo.llm, self.model.language_model, self.objective
        if not isinstance(batch, StepBatch):
            batch = StepBatch.from_samples(batch)
        wd = self.watchdog
        load_share(batch, self.data_request, self.device, wd.enter)
        placement, naive, items, packed, order = self._pack_step(batch)
        self.last_placement = placement
        local = obj.totals(packed) + packed_counts(packed)
        totals = torch.tensor(local, dtype=torch.float64, device=self.device)
        wd.enter("loss normalisers (all-reduce over data parallelism)", collective=True)
        if llm.group("dp") is not None:
            dist.all_reduce(totals, group=llm.group("dp"))
        totals = totals.tolist()
        counts, stats = totals[-3:], empty_step_stats()
        wd.enter("objective: step preparation", collective=True)
        if not obj.begin(totals[:-3], batch, self):
            return stats

        self.clock.reset()
        autocast = functools.partial(autocast_context, self.device, self.autocast_dtype)
        plan, pixels = self._exchange_plan(batch, placement, order, items)
        vit_group = self.topo.vit.size("tp") * self.topo.vit.size("hp") > 1
        wd.enter("ViT forward", collective=vit_group)
        out = self._vit_forward(self.model, pixels, autocast, grad=True)
        vit_out = out.detach().requires_grad_(out.requires_grad)
        wd.enter("ViT-to-LLM exchange (all-to-all)", collective=True)
        embeds = self.exchange.forward(vit_out, plan)
        leaf = embeds.detach().requires_grad_(embeds.requires_grad)
        mbs = self._microbatches(packed, leaf, plan, self.layout.llm)
        report = self._is_reporter()
        poison = self.poison_loss and report and llm.coord("dp") == 0  # one rank: the NaN must spread
        stages = LLMStages(lm, self.layout.llm, self.ranges, llm.size("pp"), self.pp_rank, mbs, obj, packed, autocast,
                           poison)
        wd.enter("LLM pipeline", collective=True)
        with self.clock.span("llm"):
            self.executor.run(self.program, stages)
        if embeds.requires_grad:  # collective: every rank runs the reverse exchange
            wd.enter("exchange backward (all-to-all)", collective=True)
            torch.autograd.backward(embeds, leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))
            if out.grad_fn is not None:
                wd.enter("ViT backward", collective=vit_group)
                with self.clock.span("vit"):
                    out.backward(vit_out.grad if vit_out.grad is not None else torch.zeros_like(out))
        wd.enter("gradient reduction (model and data parallel)", collective=True)
        self._reduce_grads()

        c = self.clock
        keys = obj.stat_keys
        mine = [stages.sums[k] if report else 0.0 for k in keys]
        mine += [c.seconds("vit"), c.seconds("llm") - c.seconds("llm_comm"), float(self.exchange.sent_bytes),
                 float(placement.checksum()), c.cpu_seconds("vit"), c.cpu_seconds("llm") - c.cpu_seconds("llm_comm")]
        data_keys = sorted(batch.counters)
        mine += [float(batch.counters[k]) for k in data_keys]
        wd.enter("step statistics (all-gather)", collective=True)
        gathered = self._gather_rows(mine)
        sums, gathered = dict(zip(keys, gathered[:, :len(keys)].sum(axis=0).tolist())), gathered[:, len(keys):]
        if len(set(gathered[:, 3].tolist())) != 1:
            raise RuntimeError(f"ranks placed the step's samples differently (placement checksums "
                               f"{gathered[:, 3].astype('int64').tolist()}); the balancer must be deterministic")
        stats.update(obj.finish(sums))
        stats.update(count_stats(*counts))
        stats.update(self._balance_stats(placement, naive, gathered, batch.num_tiles))
        stats.update(straggler_stats(gathered[:, 0] + gathered[:, 1]))
        stats.update(batch.data_stats({k: gathered[:, 6 + j].max() for j, k in enumerate(data_keys)}))
        return stats

    @torch.no_grad()
    def forward_only(self, batch: StepBatch | Sequence, head, width: int, model=None) -> torch.Tensor:
        """``[items, width]`` float64 values of every item of ``batch`` on every rank (collective): a
        forward pass without gradients through ``model`` (default: the policy; else a model from
        ``shard_like``), the pipeline stage by stage, and ``head(lm, layout, h, tokens, packed)`` on the
        last stage giving ``[items of the microbatch, width]`` in ``packed.positions`` order."""
        if not isinstance(batch, StepBatch):
            batch = StepBatch.from_samples(batch)
        load_share(batch, self.data_request, self.device, self.watchdog.enter)
        model = self.model if model is None else model
        layout = self.layout.llm if model is self.model else self._frozen_layouts[id(model)]
        placement, _, items, packed, order = self._pack_step(batch)
        plan, pixels = self._exchange_plan(batch, placement, order, items)
        autocast = functools.partial(autocast_context, self.device, self.autocast_dtype)
        self.watchdog.enter("forward-only pass (ViT, exchange, pipeline)", collective=True)
        feats = self.exchange.forward(self._vit_forward(model, pixels, autocast, grad=False), plan)
        mbs = self._microbatches(packed, feats, plan, layout)
        lm, llm = model.language_model, self.topo.llm
        P, V = llm.size("pp"), len(self.ranges)
        group, ranks = llm.group("pp"), llm.ranks("pp")
        act = self.param_dtype  # activations between stages, as the executor sends them
        out = torch.zeros(len(batch), width, dtype=torch.float64, device=self.device)  # NCCL reduces device tensors
        for mb, p in zip(mbs, packed):
            x = None
            for vs in range(self.pp_rank, P * V, P):
                if vs > 0:
                    x = torch.empty(mb.shape, dtype=act, device=self.device)
                    dist.recv(x, ranks[(vs - 1) % P], group=group)
                with autocast():
                    h = embed_tokens(lm, layout, mb.tokens, mb.image_embeds) if vs == 0 else x
                    h = lm.forward_layers(h, mb.tokens.context, self.ranges[vs // P])
                    if vs == P * V - 1:
                        values = head(lm, layout, h, mb.tokens, p)
                if vs < P * V - 1:
                    dist.send(h.to(act).contiguous(), ranks[(vs + 1) % P], group=group)
                elif self._is_reporter():
                    out[torch.tensor(p.positions, dtype=torch.long, device=self.device)] = values.double()
        dist.all_reduce(out)
        return out.cpu()

    def shard_like(self, model) -> "torch.nn.Module":
        """A frozen copy of a single-process model (e.g. a reference model) sharded exactly like the
        policy, for ``forward_only``."""
        frozen, layout = parallelize_model(model, self.topo, self.cfg, self.plan)
        keep_stage(frozen, self.plan, self.pp_rank)
        frozen.requires_grad_(False).to(self.device)
        apply_param_dtype(frozen, self.cfg.train.param_dtype, self.device, announce=False)
        self._frozen_layouts[id(frozen)] = layout.llm
        return frozen

    def _gather_rows(self, values: list[float]):
        """``[world, len(values)]`` float64 array of every rank's ``values`` (collective)."""
        mine = torch.tensor(values, dtype=torch.float64, device=self.device)
        rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, mine)
        return torch.stack(rows).cpu().numpy()

    def _balance_stats(self, placement: Placement, naive: Placement, gathered, sample_tiles: list[int]) -> dict:
        L, V = self.cfg.parallel.llm, self.cfg.parallel.vit
        ranks = range(dist.get_world_size())
        llm_dp = self.topo.llm.size("dp")
        replica = [(g // (L.tp * L.hp)) % llm_dp for g in ranks]  # LLM grid order tp, hp, dp, pp
        vit_rank = [g // (V.tp * V.hp) for g in ranks]  # ViT grid order tp, hp, dp
        moved_samples, moved_tiles = moved(placement, naive, sample_tiles)
        a = placement.predicted
        out = {"balance/vit_imbalance_pred": a.vit_imbalance, "balance/llm_imbalance_pred": a.llm_imbalance,
               "balance/vit_imbalance_meas": group_imbalance(gathered[:, 0], vit_rank),
               "balance/llm_imbalance_meas": group_imbalance(gathered[:, 1], replica),
               "balance/exchange_bytes": float(gathered[:, 2].sum()),
               "balance/balancer_ms": placement.seconds * 1e3,
               "balance/moved_samples": moved_samples, "balance/moved_tiles": moved_tiles}
        if self.device.type == "cpu":  # CPU time: free of waiting for a core on a shared host
            out["balance/vit_imbalance_meas_cpu"] = group_imbalance(gathered[:, 4], vit_rank)
            out["balance/llm_imbalance_meas_cpu"] = group_imbalance(gathered[:, 5], replica)
        return out

    def _vit_forward(self, model, pixels: torch.Tensor, autocast, grad: bool) -> torch.Tensor:
        """This ViT rank's tiles through ViT + projector (``[tiles, tokens, hidden]``, plan order)."""
        dtype = self.autocast_dtype or torch.float32
        with torch.set_grad_enabled(grad):
            if pixels.shape[0]:
                with self.clock.span("vit"), autocast():
                    return model.extract_feature(pixels).to(dtype)
            m = self.cfg.model
            return torch.zeros(0, m.num_image_token, m.llm.hidden_size, dtype=dtype, device=self.device,
                               requires_grad=grad and self.vit_trainable)

    def _reduce_grads(self) -> None:
        reduce_model_parallel_grads(self.model, self.topo, skip=("hp",))
        for r in self.reducers:
            r.reduce()

    # ------------------------------------------------------------------ the rest of the interface
    def clip_grad_norm(self, max_norm: float) -> float:
        local = [p for _, params in self.grids for p in params]
        counted = [p for grid, params in self.grids for p in params if counted_once(p, grid)]
        return clip_grad_norm(local, max_norm, counted)

    def state_dict(self) -> dict:
        """This rank's shards of the model and of the optimizer."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def full_state_dict(self) -> dict:
        """The whole model in single-process key names, on every rank (collective)."""
        full = gather_full_state_dict(self.model, self.topo)
        group = self.topo.llm.group("pp")
        if group is not None:
            parts: list = [None] * self.topo.llm.size("pp")
            mine = {k: v for k, v in full.items() if k.startswith("language_model.")}
            dist.all_gather_object(parts, mine, group=group)
            for part in parts:
                full.update(part)
        return full

    def extra_state_dict(self) -> dict:
        """The objective's state (e.g. MPO's reward shift), the same on every rank; saved with checkpoints."""
        return self.objective.state_dict()

    def load_extra_state_dict(self, state: dict) -> None:
        self.objective.load_state_dict(state)
