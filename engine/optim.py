"""AdamW with decay on matrices only, warmup + cosine schedule, global-norm clipping.

Parameters below fp32 (``train.param_dtype=bfloat16``, ``engine.precision``) get ``MasterAdamW``:
AdamW over fp32 master copies that steps from the fp32 main grads and writes the parameters back.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from engine.config import TrainConfig
from engine.precision import grad_of, has_masters, zero_grads


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embedding" not in name.split(".")[-1] else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class MasterAdamW(torch.optim.AdamW):
    """AdamW over fp32 master copies of parameters stored in a lower precision.

    ``param_groups`` hold the masters (``LambdaLR`` works as usual) and ``self.params[i]`` is the
    model parameter of ``self.masters[i]``. ``step`` takes each master's gradient from the
    parameter's fp32 main grad, runs AdamW and copies the masters into the parameters.
    ``state_dict`` carries the masters under ``"masters"``; ``load_state_dict`` restores them exactly."""

    def __init__(self, groups: Sequence[dict], **kwargs):
        self.params: list[torch.nn.Parameter] = []
        self.masters: list[torch.nn.Parameter] = []
        inner = []
        for g in groups:
            masters = []
            for p in g["params"]:
                m = torch.nn.Parameter(p.detach().to(torch.float32, copy=True))
                self.params.append(p)
                self.masters.append(m)
                masters.append(m)
            inner.append({**g, "params": masters})
        super().__init__(inner, **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        zero_grads(self.params, set_to_none)
        super().zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        for p, m in zip(self.params, self.masters):
            g = grad_of(p)
            m.grad = None if g is None else g.to(torch.float32)
        loss = super().step(closure)
        for p, m in zip(self.params, self.masters):
            p.copy_(m)
        return loss

    @torch.no_grad()
    def masters_from_params(self) -> None:
        """Masters follow the parameters (after loading weights without masters)."""
        for p, m in zip(self.params, self.masters):
            m.copy_(p)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "masters": [m.detach().clone() for m in self.masters]}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("masters", None)
        super().load_state_dict(state_dict)
        with torch.no_grad():
            if masters is None:
                self.masters_from_params()
                return
            for p, m, saved in zip(self.params, self.masters, masters, strict=True):
                m.copy_(saved)
                p.copy_(m)


def build_optimizer(named_params, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, or ``MasterAdamW`` when a trainable parameter is stored below fp32."""
    groups = param_groups(named_params, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device.type == "cuda":
        kwargs["fused"] = True  # torch's fused AdamW (no apex needed)
    if has_masters(p for g in groups for p in g["params"]):
        return MasterAdamW(groups, **kwargs)
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
    """L2 norm of all gradients (``grad_of``: fp32 main grads when present; float64 sum of squares),
    before clipping; clips ``local`` when ``max_norm > 0``. Parallel: the squares of ``counted``
    (this rank's parameters whose elements no other rank counts; default ``local``) are summed over
    ``group`` (None: the default group)."""
    grads = [grad_of(p) for p in local]
    device = next((g.device for g in grads if g is not None), torch.device("cpu"))
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for p in local if counted is None else counted:
        g = grad_of(p)
        if g is not None:
            sq += torch.linalg.vector_norm(g.detach().double()) ** 2
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(sq, group=group)
    total = float(sq.sqrt())
    if max_norm > 0:
        scale = min(max_norm / (total + 1e-6), 1.0)
        for g in grads:
            if g is not None:
                g.mul_(scale)
    return total
