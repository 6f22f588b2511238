"""Qwen2.5-style decoder: GQA with q/k/v bias, RoPE from float (V2PE) positions, SwiGLU, RMSNorm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from engine.config import LLMConfig
from engine.models.attention import DocumentMask
from engine.models.layers import RMSNorm, apply_rotary_reference
from engine.models.vit import CoreAttention

RotaryFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class SequenceContext:
    """What every decoder layer needs about the packed tokens it processes."""

    positions: torch.Tensor  # [B, S] float32
    cu_seqlens: Optional[torch.Tensor]  # [segments+1] over the flattened B*S tokens
    mask: Optional[DocumentMask] = None  # the microbatch's attention mask, built once (attention.block_mask)


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        H, D = cfg.hidden_size, cfg.head_dim
        self.head_dim = D
        self.rope_theta = cfg.rope_theta
        self.q_proj = nn.Linear(H, cfg.num_heads * D, bias=True)
        self.k_proj = nn.Linear(H, cfg.num_kv_heads * D, bias=True)
        self.v_proj = nn.Linear(H, cfg.num_kv_heads * D, bias=True)
        self.o_proj = nn.Linear(cfg.num_heads * D, H, bias=False)
        self.core = CoreAttention(causal=True)
        self.rotary: RotaryFn = apply_rotary_reference

    def forward(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, -1, self.head_dim)
        k = self.k_proj(x).view(B, S, -1, self.head_dim)
        v = self.v_proj(x).view(B, S, -1, self.head_dim)
        q, k = self.rotary(q, k, ctx.positions, self.rope_theta)
        out = self.core(q, k, v, ctx.cu_seqlens, ctx.mask)
        return self.o_proj(out.reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class QwenLM(nn.Module):
    """Embedding, decoder layers, final norm and an untied LM head. Pipeline parallelism keeps
    a contiguous slice of ``layers`` per stage and drops the parts a stage does not own."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens: Optional[nn.Module] = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm: Optional[nn.Module] = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head: Optional[nn.Module] = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.activation_checkpointing = False

    def forward_layers(self, h: torch.Tensor, ctx: SequenceContext, indices: Optional[Iterable[int]] = None) -> torch.Tensor:
        """Decoder layers ``indices`` (default: all, in order), each recomputed in backward when
        activation checkpointing is on (training, with gradients)."""
        for i in range(len(self.layers)) if indices is None else indices:
            layer = self.layers[i]
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, ctx, use_reentrant=False)
            else:
                h = layer(h, ctx)
        return h
