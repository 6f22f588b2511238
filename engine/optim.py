"""AdamW with decay on matrices only, warmup + cosine schedule, global-norm clipping."""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from engine.config import TrainConfig


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embedding" not in name.split(".")[-1] else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(named_params, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(named_params, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device.type == "cuda":
        kwargs["fused"] = True  # torch's fused AdamW (no apex needed)
    return torch.optim.AdamW(groups, **kwargs)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))


def clip_grad_norm(local: Sequence[torch.nn.Parameter], max_norm: float,
                   counted: Optional[Sequence[torch.nn.Parameter]] = None, group=None) -> float:
    """L2 norm of all gradients (float64 sum of squares), before clipping; clips ``local`` when
    ``max_norm > 0``. Parallel: the squares of ``counted`` (this rank's parameters whose elements no
    other rank counts; default ``local``) are summed over ``group`` (None: the default group)."""
    device = next((p.grad.device for p in local if p.grad is not None), torch.device("cpu"))
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for p in local if counted is None else counted:
        if p.grad is not None:
            sq += torch.linalg.vector_norm(p.grad.detach().double()) ** 2
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(sq, group=group)
    total = float(sq.sqrt())
    if max_norm > 0:
        scale = min(max_norm / (total + 1e-6), 1.0)
        for p in local:
            if p.grad is not None:
                p.grad.mul_(scale)
    return total
