"""Small building blocks shared by the ViT and the LLM."""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn as nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32. ``stat_reduce`` (set by tensor parallelism) turns the local
    sum of squares into the global one when the normalised dimension is sharded."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.full_dim = dim  # size of the normalised dimension before any sharding
        self.stat_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        sq = h.pow(2).sum(-1, keepdim=True)
        if self.stat_reduce is not None:
            sq = self.stat_reduce(sq)
        h = h * torch.rsqrt(sq / self.full_dim + self.eps)
        return self.weight * h.to(dtype)


def rotary_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[..., head_dim]`` for float positions (angles in float64: V2PE positions are
    fractional and can reach 1e6, where a float32 product is off by ~1e-2 radians)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim))
    ang = positions.to(torch.float64)[..., None] * inv_freq
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float):
    """Rotate-half RoPE (Qwen2 convention). q ``[B, S, H, D]``, k ``[B, S, Hkv, D]``, positions ``[B, S]``."""
    cos, sin = rotary_angles(positions, q.shape[-1], theta)
    cos, sin = cos[:, :, None, :].to(q.dtype), sin[:, :, None, :].to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def autocast_context(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast to ``dtype`` on ``device``; nothing for float32 (or None)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
