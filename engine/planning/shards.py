"""Each rank's parameter shards, built on the meta device from the parallel plan
(``engine.parallel.plan``; no process group, no memory).

``stage_shards`` keeps what ``ParallelRunner`` keeps on one
pipeline stage (its layers; the embedding on the first stage; the final norm and LM head on the
last) and cuts each tensor with the engine's own ``shard_tensor``. All tp ranks of a stage hold
the same shapes, as do all dp and hp ranks, so one representative per stage describes the world.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import Config
from engine.models.internvl import InternVLModel
from engine.optim import param_groups
from engine.parallel.plan import plan_for
from engine.parallel.tensor_parallel import ShardInfo, shard_tensor


def build_meta_model(cfg: Config) -> InternVLModel:
    """The full single-process model with meta tensors (shapes only)."""
    with torch.device("meta"):
        return InternVLModel(cfg.model, init=False)


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


def stage_shards(model: InternVLModel, cfg: Config, stage: int) -> StageShards:
    """Parameters of a rank of pipeline stage ``stage`` (tp rank 0; the others have the same shapes)."""
    L, V = cfg.parallel.llm, cfg.parallel.vit
    plan = plan_for(cfg)
    params, infos = {}, {}
    for name, p in model.named_parameters():
        if not plan[name].held_by(stage):
            continue
        info = plan[name].info
        tp = L.tp if info.grid == "llm" else V.tp
        params[name] = shard_tensor(p, info, 0, tp) if info.dim is not None else p
        infos[name] = info
    return StageShards(stage, plan.ranges[stage], params, infos)


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
