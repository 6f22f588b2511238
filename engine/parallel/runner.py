"""``ParallelRunner``: one optimisation step on any layout, with ``LocalRunner``'s interface.

Every rank holds the same global list of samples. Per step:
1. samples split contiguously over the LLM data-parallel replicas, each share split again into
   ``parallel.llm.microbatches`` microbatches, each packed (rows padded to the token-split multiple);
2. W = the token weights of the whole global batch (summed over the replicas before any forward);
3. ViT: each ViT data-parallel rank encodes its tiles of the ``ExchangePlan``, the embeddings go
   to the first pipeline stage of the replica that consumes them (``VisualExchange``);
4. LLM: the pipeline schedule (1F1B, or interleaved with ``vpp > 1``); microbatch loss sum(w*ce)/W;
5. the exchange and the ViT run backward from the gradients of the embeddings;
6. partial gradients are summed over their model-parallel groups, then over data parallelism,
   each module over its own grid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from engine.config import Config, ConfigError
from engine.data.batch import Sample
from engine.data.packing import first_fit
from engine.models.llm import QwenLM
from engine.parallel.data_parallel import GradReducer, build_zero_optimizer, clip_grad_norm
from engine.parallel.exchange import ExchangePlan, VisualExchange
from engine.parallel.parallelize import (LLMLayout, check_layout, embed_tokens, gather_full_state_dict, loss_terms,
                                         parallelize_model, reduce_model_parallel_grads, shard_tokens)
from engine.parallel.pipeline import PipelineExecutor, build_program, rank_layers
from engine.parallel.tensor_parallel import shard_info
from engine.parallel.topology import Grid, build_topology
from engine.parallel.ulysses import LocalTokens
from engine.step import autocast_context, pack, split_contiguous


@dataclass
class Microbatch:
    """One microbatch as this rank's stages see it (every rank of a pipeline packs all of them)."""

    tokens: LocalTokens
    image_embeds: Optional[torch.Tensor]  # [tiles, tokens, hidden]: first stage only
    shape: tuple[int, ...]  # this rank's activation between stages


class LLMStages:
    """The pipeline stage module of this rank: embedding on the first virtual stage, a slice of
    decoder layers per chunk, final norm + LM head + loss on the last (loss sum(w*ce)/W)."""

    def __init__(self, lm: QwenLM, layout: LLMLayout, ranges: Sequence[range], pp: int, rank: int,
                 microbatches: Sequence[Microbatch], weight_total: float, autocast=contextlib.nullcontext):
        self.lm, self.layout, self.ranges, self.pp, self.rank = lm, layout, list(ranges), pp, rank
        self.mbs, self.W, self.autocast = microbatches, weight_total, autocast
        self.loss = 0.0  # sum over the microbatches of sum(w*ce)/W (last stage only)

    def forward(self, chunk: int, microbatch: int, x: Optional[torch.Tensor]) -> torch.Tensor:
        mb, vs = self.mbs[microbatch], chunk * self.pp + self.rank
        with self.autocast():
            h = embed_tokens(self.lm, self.layout, mb.tokens, mb.image_embeds) if vs == 0 else x
            for i in self.ranges[chunk]:
                layer = self.lm.layers[i]
                if self.lm.activation_checkpointing and self.lm.training:
                    h = checkpoint(layer, h, mb.tokens.context, use_reentrant=False)
                else:
                    h = layer(h, mb.tokens.context)
            if vs < self.pp * len(self.ranges) - 1:
                return h
            ce, _ = loss_terms(self.lm, self.layout, h, mb.tokens)
        self.loss += float(ce.detach()) / self.W
        return ce / self.W

    def recv_shape(self, chunk: int, microbatch: int) -> tuple[int, ...]:
        return self.mbs[microbatch].shape


def counted_once(p: torch.Tensor, grid: Grid) -> bool:
    """Whether this rank counts ``p`` in the global norm: after the data-parallel sum gradients
    are equal over dp and hp; over tp only sharded parameters differ (replicas count once)."""
    if grid.coord("dp") or grid.coord("hp"):
        return False
    info = shard_info(p)
    return grid.coord("tp") % (info.replicas if info.dim is not None else grid.size("tp")) == 0


class ParallelRunner:
    """Shards ``model`` (the full single-process model, identical on every rank) for the layout
    of ``cfg.parallel`` over the default process group."""

    def __init__(self, model, cfg: Config, device: torch.device, autocast_dtype: Optional[torch.dtype] = None,
                 pad_id: int = 0):
        if not dist.is_initialized():
            raise RuntimeError("ParallelRunner needs an initialised default process group (torchrun)")
        L = cfg.parallel.llm
        check_layout(cfg, dist.get_world_size())
        if L.pp > 1 and cfg.model.llm.tie_word_embeddings:
            raise ConfigError(f"parallel.llm.pp={L.pp} needs model.llm.tie_word_embeddings=false")
        self.cfg, self.device, self.autocast_dtype, self.pad_id = cfg, device, autocast_dtype, pad_id
        self.topo = build_topology(cfg, dist.get_rank(), dist.get_world_size())
        self.model, self.layout = parallelize_model(model, self.topo, cfg)  # shards on the host first
        llm, lm = self.topo.llm, self.model.language_model
        self.pp_rank = llm.coord("pp")
        split = getattr(L, "layers_per_stage", None) or None  # optional list, one entry per virtual stage
        try:
            self.ranges = rank_layers(len(lm.layers), L.pp, L.vpp, split)[self.pp_rank]
        except ValueError as e:
            raise ConfigError(f"parallel.llm.layers_per_stage / pp={L.pp} x vpp={L.vpp}: {e}") from None
        owned = {i for r in self.ranges for i in r}
        for i in range(len(lm.layers)):
            if i not in owned:
                lm.layers[i] = nn.Identity()
        if self.pp_rank > 0:
            lm.embed_tokens = None
        if self.pp_rank < L.pp - 1:
            lm.norm, lm.lm_head = None, None
        self.model.to(device)
        self.program = build_program(L.pp, L.vpp, self.pp_rank, L.microbatches)
        self.executor = PipelineExecutor(llm.group("pp"), llm.ranks("pp"), self.pp_rank, L.vpp, device)
        if llm.group("pp") is not None:  # NCCL wants every rank of the group in its first (batched p2p) call
            dist.all_reduce(torch.zeros(1, device=device), group=llm.group("pp"))
        self.exchange = VisualExchange(self.topo)

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
    def _assignment(self, samples: Sequence[Sample]) -> list[list[list[int]]]:
        """``[replica][microbatch]`` sample positions in packed order (``pack``'s first-fit rows)."""
        M, cap = self.cfg.parallel.llm.microbatches, self.cfg.data.max_packed_tokens
        out = []
        for rep in split_contiguous(list(range(len(samples))), self.topo.llm.size("dp")):
            mbs = split_contiguous(rep, M)
            out.append([[g[k] for row in first_fit([samples[i].num_tokens for i in g], cap) for k in row] for g in mbs])
        return out

    def _pack(self, samples: Sequence[Sample], order: list[int], group: list[int]):
        """Pack one microbatch; its pixels travel through the exchange, so they are dropped here."""
        light = [dataclasses.replace(s, pixel_values=None if s.pixel_values is None else s.pixel_values[:, :0])
                 for s in (samples[i] for i in group)]
        batch = pack(light, self.cfg, self.pad_id, self.layout.llm.token_multiple)
        want = [t for i in order for t in samples[i].image_tiles]
        got = [] if batch.image_tiles is None else batch.image_tiles.tolist()
        if got != want:
            raise RuntimeError(f"packed image order {got} differs from the exchange order {want}")
        return batch

    def forward_backward(self, samples: Sequence[Sample]) -> dict:
        cfg, llm, lm = self.cfg, self.topo.llm, self.model.language_model
        assignment = self._assignment(samples)
        d = llm.coord("dp")
        groups = split_contiguous(split_contiguous(list(range(len(samples))), llm.size("dp"))[d],
                                  cfg.parallel.llm.microbatches)
        batches = [self._pack(samples, order, g) for order, g in zip(assignment[d], groups)]
        local = [sum(float(b.loss_weights.double().sum()) for b in batches), sum(b.text_tokens for b in batches),
                 sum(b.visual_tokens for b in batches), sum(b.num_samples for b in batches)]
        totals = torch.tensor(local, dtype=torch.float64, device=self.device)
        if llm.group("dp") is not None:
            dist.all_reduce(totals, group=llm.group("dp"))
        W, text, visual, n = totals.tolist()
        stats = {"loss": 0.0, "weight_total": W, "tokens": 0, "text_tokens": 0, "visual_tokens": 0, "samples": 0}
        if W <= 0:
            return stats

        autocast = functools.partial(autocast_context, self.device, self.autocast_dtype)
        plan = ExchangePlan.naive([s.num_tiles for s in samples], self.topo, assignment)
        embeds = self._encode(plan, samples, autocast)
        leaf = embeds.detach().requires_grad_(embeds.requires_grad)
        H, hidden = self.layout.llm.token_multiple, cfg.model.llm.hidden_size
        mbs = []
        for b, rows in zip(batches, self.exchange.microbatch_rows(plan)):
            b = b.to(self.device)
            feats = leaf[rows] if rows.stop > rows.start else None
            mbs.append(Microbatch(shard_tokens(b, self.layout.llm), feats,
                                  (b.input_ids.shape[0], b.input_ids.shape[1] // H, hidden)))
        stages = LLMStages(lm, self.layout.llm, self.ranges, llm.size("pp"), self.pp_rank, mbs, W, autocast)
        self.executor.run(self.program, stages)
        if embeds.requires_grad:  # collective: every rank runs the reverse exchange
            torch.autograd.backward(embeds, leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))
        self._reduce_grads()

        last = self.pp_rank == llm.size("pp") - 1 and llm.coord("tp") == 0 and llm.coord("hp") == 0
        loss = torch.tensor([stages.loss if last else 0.0], dtype=torch.float64, device=self.device)
        dist.all_reduce(loss)
        stats.update(loss=float(loss), text_tokens=int(text), visual_tokens=int(visual), samples=int(n),
                     tokens=int(text + visual))
        return stats

    def _encode(self, plan: ExchangePlan, samples: Sequence[Sample], autocast) -> torch.Tensor:
        """This ViT rank's tiles through ViT + projector, then the exchange to the LLM."""
        pixels = self.exchange.local_pixels(plan, [s.pixel_values for s in samples]).to(self.device)
        dtype = self.autocast_dtype or torch.float32
        if pixels.shape[0]:
            with autocast():
                out = self.model.extract_feature(pixels).to(dtype)
        else:
            m = self.cfg.model
            out = torch.zeros(0, m.num_image_token, m.llm.hidden_size, dtype=dtype, device=self.device,
                              requires_grad=self.vit_trainable)
        return self.exchange.forward(out, plan)

    def _reduce_grads(self) -> None:
        reduce_model_parallel_grads(self.model, self.topo, skip=("hp",))
        for r in self.reducers:
            r.reduce()

    # ------------------------------------------------------------------ the rest of the interface
    def clip_grad_norm(self, max_norm: float) -> float:
        local = [p for _, params in self.grids for p in params]
        counted = [p for grid, params in self.grids for p in params if counted_once(p, grid)]
        return clip_grad_norm(local, counted, max_norm)

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
