"""Each rank's parameter shards, built on the meta device from the sharding rules of
``engine.parallel.parallelize`` (no process group, no memory).

``shard_rules`` gives every parameter of the single-process model the ``ShardInfo`` that
``parallelize_model`` tags it with; ``stage_shards`` keeps what ``ParallelRunner`` keeps on one
pipeline stage (its layers; the embedding on the first stage; the final norm and LM head on the
last) and cuts each tensor with the engine's own ``shard_tensor``. All tp ranks of a stage hold
the same shapes, as do all dp and hp ranks, so one representative per stage describes the world.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from engine.config import Config
from engine.models.internvl import InternVLModel
from engine.optim import param_groups
from engine.parallel.pipeline import rank_layers
from engine.parallel.tensor_parallel import ShardInfo, padded_vocab, shard_tensor


def build_meta_model(cfg: Config) -> InternVLModel:
    """The full single-process model with meta tensors (shapes only)."""
    with torch.device("meta"):
        return InternVLModel(cfg.model, init=False)


def _grad_sum(hp: bool, tp: bool) -> Optional[str]:
    return {(True, True): "tp_hp", (True, False): "hp", (False, True): "tp"}.get((hp, tp))


def vit_padded_hidden(cfg: Config) -> int:
    """ViT attention width after padding the heads with zero heads to a multiple of vit tp."""
    v, tp = cfg.model.vision, cfg.parallel.vit.tp
    return -(-v.num_heads // tp) * tp * v.head_dim


def _vit_rule(name: str, cfg: Config, C_pad: int) -> Optional[tuple[int, int, int]]:
    """(dim, full, padded) of a sharded ViT parameter (name relative to a layer), None if replicated."""
    v = cfg.model.vision
    C, ffn = v.hidden_size, v.intermediate_size
    if name in ("attn.q_proj.weight", "attn.q_proj.bias", "attn.k_proj.weight", "attn.k_proj.bias",
                "attn.v_proj.weight", "attn.v_proj.bias", "attn.q_norm.weight", "attn.k_norm.weight"):
        return 0, C, C_pad
    if name == "attn.proj.weight":
        return 1, C, C_pad
    if name in ("mlp.fc1.weight", "mlp.fc1.bias"):
        return 0, ffn, ffn
    if name == "mlp.fc2.weight":
        return 1, ffn, ffn
    return None


def _llm_rule(name: str, cfg: Config) -> Optional[tuple[int, int, int, int]]:
    """(dim, full, padded, replicas) of a sharded LLM parameter (name relative to a layer)."""
    c, tp = cfg.model.llm, cfg.parallel.llm.tp
    q, kv, ffn = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    kv_replicas = max(1, tp // c.num_kv_heads)
    if name in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
        return 0, q, q, 1
    if name in ("self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight",
                "self_attn.v_proj.bias"):
        return 0, kv, kv, kv_replicas
    if name == "self_attn.o_proj.weight":
        return 1, q, q, 1
    if name in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        return 0, ffn, ffn, 1
    if name == "mlp.down_proj.weight":
        return 1, ffn, ffn, 1
    return None


def shard_rules(model: InternVLModel, cfg: Config) -> dict[str, ShardInfo]:
    """``ShardInfo`` per parameter name, as ``parallelize_model`` tags them."""
    V, L = cfg.parallel.vit, cfg.parallel.llm
    out: dict[str, ShardInfo] = {}
    vsp, lsp = V.sp and V.tp > 1, L.sp and L.tp > 1
    v_shard, v_rep = _grad_sum(V.hp > 1, False), _grad_sum(V.hp > 1, vsp)
    l_shard, l_rep = _grad_sum(L.hp > 1, False), _grad_sum(L.hp > 1, lsp)
    C_pad = vit_padded_hidden(cfg)
    for name, _ in model.vision_model.named_parameters():
        parts = name.split(".")
        rule = _vit_rule(".".join(parts[2:]), cfg, C_pad) if parts[0] == "layers" and V.tp > 1 else None
        out[f"vision_model.{name}"] = (ShardInfo("vit", rule[0], rule[1], rule[2], 1, v_shard) if rule
                                       else ShardInfo("vit", None, 0, 0, 1, v_rep))
    for name, _ in model.projector.named_parameters():
        out[f"projector.{name}"] = ShardInfo("vit")
    vocab = cfg.model.llm.vocab_size
    for name, _ in model.language_model.named_parameters():
        parts = name.split(".")
        rule = None
        if L.tp > 1 and parts[0] == "layers":
            rule = _llm_rule(".".join(parts[2:]), cfg)
        elif L.tp > 1 and name in ("embed_tokens.weight", "lm_head.weight"):
            rule = (0, vocab, padded_vocab(vocab, L.tp), 1)
        out[f"language_model.{name}"] = (ShardInfo("llm", rule[0], rule[1], rule[2], rule[3], l_shard) if rule
                                         else ShardInfo("llm", None, 0, 0, 1, l_rep))
    return out


@dataclass
class StageShards:
    """One pipeline stage's parameters on one rank: meta tensors in the rank's shapes."""

    stage: int
    layers: list[range]  # LLM layer ranges of this rank's chunks
    params: dict[str, torch.Tensor]  # name -> local meta tensor
    infos: dict[str, ShardInfo]

    def count(self, prefix: str) -> int:
        return sum(t.numel() for n, t in self.params.items() if n.startswith(prefix))

    def unique(self, prefix: str) -> int:
        """Elements of the full (unpadded) tensors this stage's tp group holds between them."""
        total = 0
        for n, t in self.params.items():
            if n.startswith(prefix):
                info = self.infos[n]
                total += t.numel() if info.dim is None else t.numel() // t.shape[info.dim] * info.full
        return total


def _kept(name: str, stage: int, pp: int, owned: set[int]) -> bool:
    if not name.startswith("language_model."):
        return True
    rest = name.split(".")[1:]
    if rest[0] == "layers":
        return int(rest[1]) in owned
    if rest[0] == "embed_tokens":
        return stage == 0
    return stage == pp - 1  # final norm, lm_head


def stage_shards(model: InternVLModel, cfg: Config, stage: int) -> StageShards:
    """Parameters of a rank of pipeline stage ``stage`` (tp rank 0; the others have the same shapes)."""
    L, V = cfg.parallel.llm, cfg.parallel.vit
    rules = shard_rules(model, cfg)
    ranges = rank_layers(cfg.model.llm.num_layers, L.pp, L.vpp)[stage]
    owned = {i for r in ranges for i in r}
    params, infos = {}, {}
    for name, p in model.named_parameters():
        if not _kept(name, stage, L.pp, owned):
            continue
        info = rules[name]
        tp = L.tp if info.grid == "llm" else V.tp
        params[name] = shard_tensor(p, info, 0, tp) if info.dim is not None else p
        infos[name] = info
    return StageShards(stage, ranges, params, infos)


def optimizer_groups(shards: StageShards, cfg: Config) -> list[tuple[str, int]]:
    """(grid, elements) of each flattened optimizer group, as ``build_zero_optimizer`` forms them:
    ViT + projector and the LLM separately, each split into decay / no-decay."""
    freeze = cfg.train.freeze_vit
    named = {"vit": [], "llm": []}
    for n, t in shards.params.items():
        if n.startswith("vision_model.") and freeze:
            continue
        named["llm" if n.startswith("language_model.") else "vit"].append((n, _Shape(t)))
    out = []
    for grid, items in named.items():
        for g in param_groups(items, cfg.train.weight_decay):
            if g["params"]:
                out.append((grid, sum(p.numel() for p in g["params"])))
    return out


class _Shape:
    """What ``param_groups`` reads from a parameter: ``ndim``, ``requires_grad``, ``numel``."""

    requires_grad = True

    def __init__(self, t: torch.Tensor):
        self.ndim, self._n = t.dim(), t.numel()

    def numel(self) -> int:
        return self._n
