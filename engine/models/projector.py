"""Pixel shuffle (scale 0.5) and the MLP projector LayerNorm -> Linear -> GELU -> Linear."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def pixel_shuffle_reference(x: torch.Tensor, scale: float = 0.5, version: str = "v2") -> torch.Tensor:
    """InternVL's shuffle ``[N, H, W, C] -> [N, H*s, W*s, C/s^2]``.

    v2 element map: ``out[n, p, j, q*2C + k*C + c] = x[n, 2p+q, 2j+k, c]``; v1 skips the last permute.
    """
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    if version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


class Projector(nn.Module):
    """``mlp1`` of InternVL: LayerNorm(4C) -> Linear(4C, H) -> GELU -> Linear(H, H)."""

    def __init__(self, in_dim: int, out_dim: int, eps: float = 1e-5):
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_dim, eps=eps)
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(self.layer_norm(x))))
