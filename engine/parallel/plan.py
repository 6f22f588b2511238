"""The parallel plan: for every parameter of the model, which grid it lives on, how tensor
parallelism splits it, which pipeline stage holds it and how it is initialised.

It is the one description of "which rank holds which slice of which parameter". Parallelising
the model (``parallelize``), materialising a rank's shards (``materialize``), the checkpoint
layout (``engine.checkpoint.plan``), the planner (``engine.planning.shards``), the gradient
reducers and the "count each element once" rule of the global grad norm all read it.

Per parameter (``ParamPlan``):
- ``grid``: ``vit`` (ViT and projector) or ``llm``;
- ``info`` (``ShardInfo``): the dimension split over the grid's tp ranks (None when replicated
  or tp = 1), the full and padded sizes along it (vocabulary padded to a multiple of tp, ViT
  attention width padded with zero heads to a multiple of tp), kv replicas (GQA kv heads when
  kv_heads < tp) and the group over which each rank's gradient is a partial sum:
  sharded over tp: complete over tp; replicated over tp: partial over tp with sequence
  parallelism; anything under head parallelism: partial over hp; the projector: complete;
- ``stage``: the LLM pipeline rank holding it (contiguous layers per virtual stage, the embedding
  on the first stage, final norm and LM head on the last); None for the ViT grid (every rank);
- ``init`` and ``draw_dim``: the initialisation rule and the dimension its values are drawn along
  (``engine.models.init``), so a rank draws only its own rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from engine.config import Config, ConfigError
from engine.models.init import InitRule, draw_dim, init_rules, split_dim
from engine.parallel.pipeline import rank_layers
from engine.parallel.tensor_parallel import ShardInfo, padded_vocab


@dataclass(frozen=True)
class ParamPlan:
    name: str
    shape: tuple[int, ...]  # the full single-process shape
    grid: str  # vit | llm
    info: ShardInfo
    stage: Optional[int]  # LLM pipeline rank holding it; None: every rank
    init: InitRule
    draw_dim: int

    def local_shape(self, tp: int) -> tuple[int, ...]:
        if self.info.dim is None:
            return self.shape
        shape = list(self.shape)
        shape[self.info.dim] = self.info.padded // (tp // self.info.replicas)
        return tuple(shape)

    def held_by(self, pp_rank: int) -> bool:
        return self.stage is None or self.stage == pp_rank


def grad_sum_group(hp: bool, partial_over_tp: bool) -> Optional[str]:
    """The group over which a gradient is partial: "tp_hp", "hp", "tp" or None."""
    return {(True, True): "tp_hp", (True, False): "hp", (False, True): "tp"}.get((hp, partial_over_tp))


def vit_padded_hidden(cfg: Config) -> int:
    """ViT attention width after padding the heads with zero heads to a multiple of vit tp."""
    v, tp = cfg.model.vision, cfg.parallel.vit.tp
    return -(-v.num_heads // tp) * tp * v.head_dim


def pipeline_ranges(cfg: Config) -> list[list[range]]:
    """``[pp rank][chunk]`` LLM layer ranges."""
    L = cfg.parallel.llm
    try:
        return rank_layers(cfg.model.llm.num_layers, L.pp, L.vpp)
    except ValueError as e:
        raise ConfigError(f"parallel.llm.pp={L.pp} x vpp={L.vpp} for model.llm.num_layers="
                          f"{cfg.model.llm.num_layers}: {e}") from None


class ParallelPlan:
    """The plan of ``cfg.model`` under ``cfg.parallel`` (built from shapes alone, on the meta device)."""

    def __init__(self, cfg: Config):
        from engine.models.internvl import InternVLModel

        self.cfg = cfg
        with torch.device("meta"):
            model = InternVLModel(cfg.model, init=False)
        rules = init_rules(model, cfg.model.initializer_range, cfg.model.vision.layer_scale_init)
        self.ranges = pipeline_ranges(cfg)
        stage_of = {i: rank for rank, chunks in enumerate(self.ranges) for r in chunks for i in r}
        self.params: dict[str, ParamPlan] = {}
        for name, p in model.named_parameters():
            shape = tuple(int(s) for s in p.shape)
            grid = "llm" if name.startswith("language_model.") else "vit"
            self.params[name] = ParamPlan(name, shape, grid, self._info(name, shape, grid),
                                          self._stage(name, stage_of), rules[name], draw_dim(name))

    def _info(self, name: str, shape: tuple[int, ...], grid: str) -> ShardInfo:
        m = self.cfg.model
        layout = self.cfg.parallel.llm if grid == "llm" else self.cfg.parallel.vit
        tp, hp = layout.tp, layout.hp
        dim = split_dim(name) if tp > 1 else None
        if name.startswith("projector."):
            return ShardInfo("vit")
        if dim is None:
            return ShardInfo(grid, None, 0, 0, 1, grad_sum_group(hp > 1, layout.sp and tp > 1))
        full, padded, replicas = shape[dim], shape[dim], 1
        if name in ("language_model.embed_tokens.weight", "language_model.lm_head.weight"):
            padded = padded_vocab(m.llm.vocab_size, tp)
        elif grid == "llm" and (".self_attn.k_proj." in name or ".self_attn.v_proj." in name):
            replicas = max(1, tp // m.llm.num_kv_heads)
        elif grid == "vit" and ".attn." in name:  # q/k/v, their norms and proj: the padded attention width
            padded = vit_padded_hidden(self.cfg)
        return ShardInfo(grid, dim, full, padded, replicas, grad_sum_group(hp > 1, False))

    @staticmethod
    def _stage(name: str, stage_of: dict[int, int]) -> Optional[int]:
        if not name.startswith("language_model."):
            return None
        rest = name.split(".")
        if rest[1] == "layers":
            return stage_of[int(rest[2])]
        if rest[1] == "embed_tokens":
            return 0
        return max(stage_of.values(), default=0)  # final norm and LM head: the last stage

    def __getitem__(self, name: str) -> ParamPlan:
        return self.params[name]

    def rank_params(self, pp_rank: int) -> list[ParamPlan]:
        """What a rank of pipeline stage ``pp_rank`` holds (the ViT grid's parameters on every rank)."""
        return [p for p in self.params.values() if p.held_by(pp_rank)]


_CACHE: dict[str, ParallelPlan] = {}


def plan_for(cfg: Config) -> ParallelPlan:
    """``ParallelPlan(cfg)``, cached by the model and layout it describes."""
    key = repr((cfg.model, cfg.parallel))
    if key not in _CACHE:
        if len(_CACHE) >= 16:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = ParallelPlan(cfg)
    return _CACHE[key]


def local_slice(p: ParamPlan, tp_rank: int, tp: int) -> tuple[int, int, int]:
    """``(dim, start, stop)``: the real (unpadded) elements of the full tensor that tp rank
    ``tp_rank`` holds, along the split dimension (the whole tensor along ``draw_dim`` if replicated)."""
    if p.info.dim is None:
        return p.draw_dim, 0, p.shape[p.draw_dim]
    a, b = p.info.local_range(tp_rank, tp)
    return p.info.dim, min(a, p.info.full), min(b, p.info.full)
