"""InternViT: patch embedding + CLS + position embedding, pre-norm layers with layer scale.

300M flavour: LayerNorm with bias, qkv bias. 6B flavour: RMSNorm, no qkv bias, and qk-norm
(RMSNorm over the full hidden size, before the split into heads). No final norm.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from engine.config import VisionConfig
from engine.models.attention import attention
from engine.models.layers import RMSNorm


def make_norm(cfg: VisionConfig, dim: int) -> nn.Module:
    if cfg.norm_type == "rms_norm":
        return RMSNorm(dim, cfg.layer_norm_eps)
    return nn.LayerNorm(dim, eps=cfg.layer_norm_eps)


class CoreAttention(nn.Module):
    """softmax(q k^T / sqrt(d)) v inside each packed segment. Parallel wrappers (Ulysses)
    replace this module; the layers around it do not change."""

    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v, cu_seqlens=None, mask=None):
        return attention(q, k, v, cu_seqlens, causal=self.causal, mask=mask)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, C))
        self.patch_embedding = nn.Conv2d(3, C, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, C))

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        pos = self.position_embedding
        side = self.cfg.image_size // self.cfg.patch_size
        if h == side and w == side:
            return pos
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        grid = grid.to(pos.dtype).reshape(1, -1, h * w).permute(0, 2, 1)
        return torch.cat([pos[:, :1], grid], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [N, C, h, w]
        N, C, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(N, 1, C).to(x.dtype), x], dim=1)
        return x + self._pos_embed(h, w).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        C = cfg.hidden_size
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(C, C, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(C, C, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(C, C, bias=cfg.qkv_bias)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:
            self.q_norm = RMSNorm(C, cfg.layer_norm_eps)
            self.k_norm = RMSNorm(C, cfg.layer_norm_eps)
        self.core = CoreAttention(causal=False)
        self.proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(B, S, -1, self.head_dim) for t in (q, k, v))
        out = self.core(q, k, v)
        return self.proj(out.reshape(B, S, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        C = cfg.hidden_size
        self.norm1 = make_norm(cfg, C)
        self.attn = VisionAttention(cfg)
        self.ls1 = nn.Parameter(cfg.layer_scale_init * torch.ones(C))
        self.norm2 = make_norm(cfg, C)
        self.mlp = VisionMLP(cfg)
        self.ls2 = nn.Parameter(cfg.layer_scale_init * torch.ones(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1 * self.attn(self.norm1(x))
        return x + self.ls2 * self.mlp(self.norm2(x))


class InternViT(nn.Module):
    def __init__(self, cfg: VisionConfig, select_layer: int = -1):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        # select_layer indexes hidden states as InternVL and transformers do: 0 = embeddings,
        # k = output of layer k, -1 = output of the last layer. Layers after it are unused.
        n = cfg.num_layers + 1 + select_layer if select_layer < 0 else select_layer
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(n))
        self.activation_checkpointing = False

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[tiles, 3, H, W] -> [tiles, 1 + patches, C]`` (output of the selected layer)."""
        x = self.embeddings(pixel_values)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x
