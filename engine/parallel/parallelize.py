"""Apply tensor, sequence and head parallelism to the single-process InternVL model.

``parallelize_*`` swaps the model's modules for sharded ones in place, as the parallel plan
(``engine.parallel.plan``) says, keeping parameter names, so names and ``gather_full_state_dict``
line up with the single-process model. The model is normally on the meta device (shapes only:
``engine.parallel.materialize`` then gives this rank's shards their values); a real model, the
same on every rank, is cut into shards on the host.

Gradient contract (per parameter, ``param.shard_info.grad_sum``): after backward each rank holds
its shard's gradient, complete except over the named group of the parameter's grid, over which
it must be summed (``reduce_model_parallel_grads``); data parallelism then sums over dp (the
"dp_hp" group can fuse an "hp" sum with it).
- sharded over tp: complete over tp (kv heads replicated over tp ranks are summed in backward);
- replicated over tp: complete over tp without sequence parallelism, partial with it;
- everything in a head-parallel model: partial over hp (each rank sees its tokens only);
- projector: complete (it runs on the gathered ViT features on every rank).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from engine.config import Config, ConfigError, validate_parallel
from engine.data.batch import PackedBatch
from engine.models.internvl import InternVLModel, LossFn, reference_linear_loss
from engine.models.llm import QwenLM
from engine.models.vit import InternViT
from engine.parallel.mappings import (Group, all_reduce_stat, group_size, reduce_from_region,
                                      reduce_scatter_to_sequence, scatter_to_sequence)
from engine.parallel.tensor_parallel import (ColumnParallelLinear, RegionEntry, RowParallelLinear, ShardInfo,
                                             VocabParallelEmbedding, VocabParallelLoss, gather_full, make_param,
                                             shard_info, tag)
from engine.parallel.plan import ParallelPlan
from engine.parallel.topology import Grid, Topology
from engine.parallel.ulysses import (LocalTokens, TileGather, TilePadding, TileSplit, UlyssesAttention, local_slice,
                                     shard_batch)


def check_layout(cfg: Config, world: Optional[int] = None) -> None:
    """Config rules plus those of this layout; raises ConfigError naming the keys."""
    validate_parallel(cfg, world)
    v, vt = cfg.model.vision, cfg.parallel.vit.tp
    if vt > v.num_heads:
        raise ConfigError(f"parallel.vit.tp={vt} exceeds model.vision.num_heads={v.num_heads}")


def _tag_rest(module: nn.Module, prefix: str, plan: ParallelPlan) -> None:
    """Tag the parameters no parallel layer tagged (replicated ones) with the plan's ``ShardInfo``."""
    for name, p in module.named_parameters():
        if not hasattr(p, "shard_info"):
            tag(p, plan[f"{prefix}.{name}"].info)


@dataclass
class LLMLayout:
    grid: Grid
    sp: bool
    loss_fn: LossFn
    img_context_id: int

    @property
    def tp_group(self) -> Group:
        return self.grid.group("tp")

    @property
    def hp_group(self) -> Group:
        return self.grid.group("hp")

    @property
    def token_multiple(self) -> int:
        """Packed sequences must be padded to a multiple of this (``pad_to_multiple``)."""
        return self.grid.size("hp") * (self.grid.size("tp") if self.sp else 1)


@dataclass
class ViTLayout:
    grid: Grid
    sp: bool
    padding: TilePadding


@dataclass
class ModelLayout:
    topology: Topology
    llm: LLMLayout
    vit: ViTLayout


def parallelize_llm(lm: QwenLM, grid: Grid, cfg: Config, plan: Optional[ParallelPlan] = None) -> tuple[QwenLM, LLMLayout]:
    """Shard a ``QwenLM`` (all its layers; the runner drops those of other pipeline stages) over
    ``grid``'s tp and hp groups as ``plan`` says; the embedding and LM head are split over the
    padded vocabulary."""
    plan = plan or ParallelPlan(cfg)
    c, tp, hp = lm.cfg, grid.size("tp"), grid.size("hp")
    tpg, hpg = grid.group("tp"), grid.group("hp")
    sp = cfg.parallel.llm.sp and tp > 1

    def info(name: str) -> ShardInfo:
        return plan[f"language_model.{name}"].info

    replicated = info("norm.weight")
    for i, layer in enumerate(lm.layers):
        a, m = layer.self_attn, layer.mlp
        at, ml = f"layers.{i}.self_attn", f"layers.{i}.mlp"
        if tp > 1:
            a.q_proj = ColumnParallelLinear(a.q_proj, info(f"{at}.q_proj.weight"), tpg)
            a.k_proj = ColumnParallelLinear(a.k_proj, info(f"{at}.k_proj.weight"), tpg)
            a.v_proj = ColumnParallelLinear(a.v_proj, info(f"{at}.v_proj.weight"), tpg)
            a.o_proj = RowParallelLinear(a.o_proj, info(f"{at}.o_proj.weight"), replicated, tpg, sp)
            m.gate_proj = ColumnParallelLinear(m.gate_proj, info(f"{ml}.gate_proj.weight"), tpg)
            m.up_proj = ColumnParallelLinear(m.up_proj, info(f"{ml}.up_proj.weight"), tpg)
            m.down_proj = RowParallelLinear(m.down_proj, info(f"{ml}.down_proj.weight"), replicated, tpg, sp)
            layer.input_layernorm.register_forward_hook(RegionEntry(tpg, sp))
            layer.post_attention_layernorm.register_forward_hook(RegionEntry(tpg, sp))
        if hp > 1:
            a.core = UlyssesAttention(a.core, hpg)
    loss_fn: LossFn = reference_linear_loss
    if tp > 1:
        if lm.embed_tokens is not None:
            lm.embed_tokens = VocabParallelEmbedding(lm.embed_tokens, info("embed_tokens.weight"), tpg)
        if lm.norm is not None:
            lm.norm.register_forward_hook(RegionEntry(tpg, sp))
        if lm.lm_head is not None:
            head_info = info("lm_head.weight")
            lm.lm_head = ColumnParallelLinear(lm.lm_head, head_info, tpg)
            start = head_info.local_range(grid.local_rank("tp"), tp)[0]
            loss_fn = VocabParallelLoss(start, c.vocab_size, tpg, mode=cfg.kernels.loss)
    _tag_rest(lm, "language_model", plan)
    return lm, LLMLayout(grid, sp, loss_fn, cfg.model.img_context_token_id)


def parallelize_vit(vit: InternViT, grid: Grid, cfg: Config, plan: Optional[ParallelPlan] = None) -> tuple[InternViT, ViTLayout]:
    """Shard ``InternViT`` over ``grid`` as ``plan`` says: heads padded with zero heads to a
    multiple of tp, the full-width qk-norm reducing its statistics over tp, tile tokens split over
    hp (and tp with sequence parallelism). ``vit(pixel_values)`` keeps its signature and full output."""
    plan = plan or ParallelPlan(cfg)
    tp, hp = grid.size("tp"), grid.size("hp")
    tpg, hpg = grid.group("tp"), grid.group("hp")
    sp = cfg.parallel.vit.sp and tp > 1

    def info(name: str) -> ShardInfo:
        return plan[f"vision_model.{name}"].info

    padding = TilePadding()
    for i, layer in enumerate(vit.layers):
        a, m, at = layer.attn, layer.mlp, f"layers.{i}.attn"
        replicated = info(f"layers.{i}.norm1.weight")
        if tp > 1:
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(a, name, ColumnParallelLinear(getattr(a, name), info(f"{at}.{name}.weight"), tpg))
            if a.qk_normalization:
                for key, norm in (("q_norm", a.q_norm), ("k_norm", a.k_norm)):  # full_dim stays the real hidden size
                    norm.weight = make_param(norm.weight, info(f"{at}.{key}.weight"), tpg)
                    norm.stat_reduce = functools.partial(all_reduce_stat, group=tpg)
            a.proj = RowParallelLinear(a.proj, info(f"{at}.proj.weight"), replicated, tpg, sp)
            m.fc1 = ColumnParallelLinear(m.fc1, info(f"layers.{i}.mlp.fc1.weight"), tpg)
            m.fc2 = RowParallelLinear(m.fc2, info(f"layers.{i}.mlp.fc2.weight"), replicated, tpg, sp)
            layer.norm1.register_forward_hook(RegionEntry(tpg, sp))
            layer.norm2.register_forward_hook(RegionEntry(tpg, sp))
        if hp > 1 or sp:
            a.core = UlyssesAttention(a.core, hpg, padding)
    if hp > 1 or sp:
        split = TileSplit(hpg, tpg if sp else None, padding)
        vit.embeddings.register_forward_hook(split)
        vit.register_forward_hook(TileGather(split))
    _tag_rest(vit, "vision_model", plan)
    return vit, ViTLayout(grid, sp, padding)


def parallelize_model(model: InternVLModel, topology: Topology, cfg: Config,
                      plan: Optional[ParallelPlan] = None) -> tuple[InternVLModel, ModelLayout]:
    """Both grids' layouts on a full model; the projector stays replicated (it is well under 1%
    of the ViT's FLOPs, and a replicated projector keeps the ViT->LLM hand-over free of
    collectives). With llm tp > 1 ``model.loss_fn`` becomes the vocab-parallel loss; otherwise
    the model's own ``loss_fn`` (e.g. a fused kernel) is kept and used by the layout."""
    check_layout(cfg, topology.world)
    plan = plan or ParallelPlan(cfg)
    model.vision_model, vit = parallelize_vit(model.vision_model, topology.vit, cfg, plan)
    model.language_model, llm = parallelize_llm(model.language_model, topology.llm, cfg, plan)
    _tag_rest(model.projector, "projector", plan)
    if topology.llm.size("tp") > 1:
        model.loss_fn = llm.loss_fn
    else:
        llm.loss_fn = model.loss_fn
    return model, ModelLayout(topology, llm, vit)


def keep_stage(model: InternVLModel, plan: ParallelPlan, pp_rank: int) -> InternVLModel:
    """Drop the LLM modules whose parameters the plan gives to other pipeline stages (decoder
    layers become ``nn.Identity``; the embedding, final norm and LM head become None)."""
    lm = model.language_model

    def held(prefix: str) -> bool:
        return plan[f"language_model.{prefix}.weight"].held_by(pp_rank)

    for i in range(len(lm.layers)):
        if not held(f"layers.{i}.input_layernorm"):
            lm.layers[i] = nn.Identity()
    if lm.embed_tokens is not None and not held("embed_tokens"):
        lm.embed_tokens = None
    if lm.norm is not None and not held("norm"):
        lm.norm = None
    if lm.lm_head is not None and not held("lm_head"):
        lm.lm_head = None
    return model


# ----------------------------------------------------------------------------- forward


def embed_tokens(lm: QwenLM, layout: LLMLayout, tokens: LocalTokens,
                 image_embeds: Optional[torch.Tensor]) -> torch.Tensor:
    """First pipeline stage: local token embeddings (sequence-split with sp) with the image
    features ``[tiles, tokens, H]`` (the same on every rank) written over ``<IMG_CONTEXT>``. The
    gradient of ``image_embeds`` comes out complete on every rank."""
    emb, tpg, hpg = lm.embed_tokens, layout.tp_group, layout.hp_group
    h = emb.partial(tokens.input_ids) if isinstance(emb, VocabParallelEmbedding) else emb(tokens.input_ids)
    h = reduce_scatter_to_sequence(h, tpg) if layout.sp else reduce_from_region(h, tpg)
    mask = tokens.image_mask
    n_ctx = int(mask.sum())
    n_feat = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
    if n_ctx != n_feat:
        raise ValueError(f"the batch has {n_ctx} <IMG_CONTEXT> tokens (id {layout.img_context_id}) but "
                         f"{n_feat} image features")
    if n_feat == 0:
        return h
    feats = image_embeds.reshape(-1, image_embeds.shape[-1]).to(h.dtype)
    full = h.new_zeros(*mask.shape, h.shape[-1]).masked_scatter(mask.unsqueeze(-1), feats)
    full, mask = scatter_to_sequence(full, hpg), local_slice(mask, hpg)
    if layout.sp:
        full, mask = scatter_to_sequence(full, tpg), local_slice(mask, tpg)
    return torch.where(mask.unsqueeze(-1), full, h)


def loss_terms(lm: QwenLM, layout: LLMLayout, h: torch.Tensor, tokens: LocalTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Last pipeline stage: final norm, vocab-parallel LM head and loss; ``(sum(w*ce), sum(w))``
    of the whole batch, the same on every rank of the tp and hp groups."""
    h = lm.norm(h)
    ce, w = layout.loss_fn(h.reshape(-1, h.shape[-1]), lm.lm_head.weight, tokens.targets.reshape(-1),
                           tokens.loss_weights.reshape(-1))
    return reduce_from_region(ce, layout.hp_group), reduce_from_region(w.detach(), layout.hp_group)


def shard_tokens(batch: PackedBatch, layout: LLMLayout) -> LocalTokens:
    return shard_batch(batch, layout.hp_group, layout.tp_group if layout.sp else None, layout.img_context_id)


def parallel_loss_terms(model: InternVLModel, layout: ModelLayout, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``InternVLModel.loss_terms`` computes, under the layout. Every rank of the LLM's and
    the ViT's tp x hp groups must be given the same batch; the ViT runs on all its tiles."""
    feats = None
    if batch.pixel_values is not None and batch.pixel_values.shape[0] > 0:
        feats = model.extract_feature(batch.pixel_values)
    lm = model.language_model
    tokens = shard_tokens(batch, layout.llm)
    h = embed_tokens(lm, layout.llm, tokens, feats)
    h = lm.forward_layers(h, tokens.context)
    return loss_terms(lm, layout.llm, h, tokens)


# ----------------------------------------------------------------------------- gradients, state


def _grid(topology: Topology, info: ShardInfo) -> Grid:
    return topology.llm if info.grid == "llm" else topology.vit


def reduce_model_parallel_grads(model: nn.Module, topology: Topology, skip: tuple[str, ...] = ()) -> None:
    """Sum partial gradients (``grad_of``: the fp32 main grad when there is one) in place over each
    parameter's ``grad_sum`` group, except groups listed in ``skip`` (left to the data-parallel
    reducer). Same parameter order on all ranks."""
    from engine.precision import grad_of

    for p in model.parameters():
        info = shard_info(p)
        group = _grid(topology, info).group(info.grad_sum) if info.grad_sum and info.grad_sum not in skip else None
        if group is not None and p.requires_grad:
            if grad_of(p) is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(grad_of(p), group=group)


def gather_full_state_dict(model: nn.Module, topology: Topology, grads: bool = False) -> dict[str, torch.Tensor]:
    """Full single-process tensors (padding stripped, replicas dropped) of every parameter, or of
    their gradients summed over ``grad_sum`` (without changing ``.grad``). Collective over tp/hp."""
    out = {}
    for name, p in model.named_parameters():
        info = shard_info(p)
        grid = _grid(topology, info)
        t = p.detach()
        if grads:
            t = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(t)
            if info.grad_sum and group_size(grid.group(info.grad_sum)) > 1:
                torch.distributed.all_reduce(t, group=grid.group(info.grad_sum))
        out[name] = gather_full(t, info, grid.group("tp"))
    return out
