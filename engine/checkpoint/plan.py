"""Which rank of a layout stores which piece of each parameter, without launching the layout.

Mirrors the sharding of ``engine.parallel.parallelize`` (checked against live ranks in
tests/test_checkpoint_reshard.py): column-parallel weights split dim 0, row-parallel dim 1,
vocabulary and ViT heads zero-padded to a multiple of tp (the padding is never stored), GQA kv
heads replicated when kv_heads < tp (stored once), pipeline stages holding contiguous layers.
A piece is written by the rank at data- and head-parallel coordinate 0 of its grid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from engine.checkpoint.regions import Box
from engine.config import Config
from engine.parallel.tensor_parallel import ShardInfo, padded_vocab

_LLM_LAYER = re.compile(r"language_model\.layers\.(\d+)\.(.+)")
_VIT_LAYER = re.compile(r"vision_model\.layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class ShardSpec:
    grid: str  # llm | vit
    info: ShardInfo  # dim, full, padded, replicas as the parallel layers use them
    stage: Optional[int]  # LLM pipeline rank holding the tensor


def layer_stage(layer: int, num_layers: int, pp: int, vpp: int) -> int:
    from engine.parallel.pipeline import rank_layers

    for rank, chunks in enumerate(rank_layers(num_layers, pp, vpp)):
        if any(layer in r for r in chunks):
            return rank
    raise ValueError(f"layer {layer} is in no pipeline stage of {num_layers} layers")


def shard_spec(name: str, shape: Sequence[int], cfg: Config) -> ShardSpec:
    """How parameter ``name`` of global ``shape`` is split under ``cfg.parallel``."""
    m, L, V = cfg.model, cfg.parallel.llm, cfg.parallel.vit

    def spec(grid: str, dim: Optional[int] = None, padded: int = 0, replicas: int = 1,
             stage: Optional[int] = None) -> ShardSpec:
        full = shape[dim] if dim is not None else 0
        return ShardSpec(grid, ShardInfo(grid, dim, full, padded or full, replicas), stage)

    if name.startswith("language_model."):
        tp, pp, last = L.tp, L.pp, L.pp - 1
        split = tp > 1
        mt = _LLM_LAYER.match(name)
        if mt:
            stage, sub = layer_stage(int(mt.group(1)), m.llm.num_layers, pp, L.vpp), mt.group(2)
            if not split:
                return spec("llm", stage=stage)
            if sub.startswith(("self_attn.q_proj.", "mlp.gate_proj.", "mlp.up_proj.")):
                return spec("llm", 0, stage=stage)
            if sub.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                return spec("llm", 0, replicas=max(1, tp // m.llm.num_kv_heads), stage=stage)
            if sub in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
                return spec("llm", 1, stage=stage)
            return spec("llm", stage=stage)
        if name == "language_model.embed_tokens.weight":
            return spec("llm", 0, padded_vocab(m.llm.vocab_size, tp), stage=0) if split else spec("llm", stage=0)
        if name == "language_model.lm_head.weight":
            return spec("llm", 0, padded_vocab(m.llm.vocab_size, tp), stage=last) if split else spec("llm", stage=last)
        return spec("llm", stage=last)  # final norm
    tp = V.tp
    mt = _VIT_LAYER.match(name)
    if tp > 1 and mt:
        sub = mt.group(2)
        c_pad = -(-m.vision.num_heads // tp) * tp * m.vision.head_dim
        if sub.startswith(("attn.q_proj.", "attn.k_proj.", "attn.v_proj.")) or sub in ("attn.q_norm.weight",
                                                                                       "attn.k_norm.weight"):
            return spec("vit", 0, c_pad)
        if sub == "attn.proj.weight":
            return spec("vit", 1, c_pad)
        if sub.startswith("mlp.fc1."):
            return spec("vit", 0)
        if sub == "mlp.fc2.weight":
            return spec("vit", 1)
    return spec("vit")


def grid_sizes(cfg: Config, world: int) -> dict[str, dict[str, int]]:
    L, V = cfg.parallel.llm, cfg.parallel.vit
    return {"llm": {"tp": L.tp, "hp": L.hp, "dp": world // (L.tp * L.hp * L.pp), "pp": L.pp},
            "vit": {"tp": V.tp, "hp": V.hp, "dp": world // (V.tp * V.hp)}}


def _rank(sizes: dict[str, int], **coords: int) -> int:
    r, stride = 0, 1
    for d, s in sizes.items():
        r += coords.get(d, 0) * stride
        stride *= s
    return r


def target_pieces(name: str, shape: Sequence[int], cfg: Config, world: int) -> list[tuple[int, Box]]:
    """``(rank, global box)`` of every stored piece of ``name`` under the layout (padding stripped)."""
    s = shard_spec(name, shape, cfg)
    sizes = grid_sizes(cfg, world)[s.grid]
    tp = sizes["tp"]
    base = {"pp": s.stage} if s.stage is not None else {}
    full = tuple(int(x) for x in shape)
    if s.info.dim is None:
        return [(_rank(sizes, tp=0, **base), (tuple(0 for _ in full), full))]
    out = []
    d = s.info.dim
    for r in range(0, tp, s.info.replicas):
        a, b = s.info.local_range(r, tp)
        b = min(b, s.info.full)
        if b <= a:
            continue
        offsets = [0] * len(full)
        sizes_ = list(full)
        offsets[d], sizes_[d] = a, b - a
        out.append((_rank(sizes, tp=r, **base), (tuple(offsets), tuple(sizes_))))
    return out


def default_world(cfg: Config) -> int:
    """The smallest world holding both grids' model-parallel groups."""
    import math

    L, V = cfg.parallel.llm, cfg.parallel.vit
    return math.lcm(L.tp * L.hp * L.pp, V.tp * V.hp)
