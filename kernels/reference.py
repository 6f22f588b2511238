"""Plain PyTorch references for every kernel (any device, any dtype, autograd for the backward).

These define the results the Triton kernels must reproduce.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels import _checks


# ----------------------------------------------------------------------------- rotary


def rotary_inv_freq(head_dim: int, theta: float, device: Optional[torch.device] = None) -> torch.Tensor:
    """Qwen2 RoPE frequencies ``1 / theta^(2i/d)``, i < d/2, in float64."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    return 1.0 / (float(theta) ** exponent)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                   inv_freq: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``cos, sin`` of shape ``[..., head_dim]`` over ``[freqs, freqs]``, angles in float64."""
    inv = rotary_inv_freq(head_dim, theta, positions.device) if inv_freq is None else inv_freq.to(torch.float64)
    angles = positions.to(torch.float64)[..., None] * inv
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().float(), emb.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def v2pe_rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float = 1e6,
                    inv_freq: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (rotate-half) of ``q [..., Hq, D]`` and ``k [..., Hk, D]`` at float ``positions [...]``.

    Computed in float32 from float64-accurate cos/sin, cast back to the input dtype.
    """
    _checks.check_rotary(q, k, positions, theta, inv_freq)
    cos, sin = rotary_cos_sin(positions, q.shape[-1], theta, inv_freq)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)

    def rot(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)

    return rot(q), rot(k)


# ----------------------------------------------------------------------------- pixel shuffle


def pixel_shuffle_ref(x: torch.Tensor, scale: float = 0.5, version: str = "v2") -> torch.Tensor:
    """InternVL pixel shuffle ``[N, H, W, C] -> [N, H*s, W*s, C/s^2]`` (v1: the two spatial dims swapped)."""
    r = _checks.shuffle_ratio(x, scale, version)
    n, w, h, c = x.shape  # InternVL's naming; h * scale == h // r etc.
    x = x.reshape(n, w, h // r, c * r)
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, h // r, w // r, c * r * r)
    if version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


def pixel_shuffle_layernorm_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                eps: float = 1e-5, scale: float = 0.5, version: str = "v2") -> torch.Tensor:
    """``LayerNorm(pixel_shuffle(x))`` over the last dim, statistics in float32."""
    y = pixel_shuffle_ref(x, scale, version)
    _checks.check_layernorm(x, weight, bias, y.shape[-1], eps)
    b = None if bias is None else bias.float()
    return F.layer_norm(y.float(), (y.shape[-1],), weight.float(), b, eps).to(x.dtype)


# ----------------------------------------------------------------------------- loss


def _tp_rank_size(tp_group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


class _VocabParallelWeightedCE(torch.autograd.Function):
    """Per-token cross entropy over vocab-sharded logits ``[T, V_local]`` (float32)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, vocab_start: int,
                valid_local: int, tp_group: dist.ProcessGroup) -> torch.Tensor:
        logits = logits.float().clone()
        logits[:, valid_local:] = -math.inf
        m = logits.max(dim=1).values.clamp(min=-1e30)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
        exp = torch.exp(logits - m[:, None])
        s = exp.sum(dim=1)
        dist.all_reduce(s, group=tp_group)
        local = labels - vocab_start
        mine = valid & (local >= 0) & (local < valid_local)
        idx = torch.where(mine, local, torch.zeros_like(local))
        target = torch.where(mine, logits.gather(1, idx[:, None]).squeeze(1), torch.zeros_like(m))
        dist.all_reduce(target, group=tp_group)
        lse = m + torch.log(s)
        ce = torch.where(valid, lse - target, torch.zeros_like(lse))
        ctx.save_for_backward(exp / s[:, None], idx, mine, valid)
        return ce

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor):
        softmax, idx, mine, valid = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(1, idx[:, None], -mine.to(grad.dtype)[:, None])
        grad *= (grad_ce * valid)[:, None]
        return grad, None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, vocab_start: int,
                                 valid_local: int, tp_group: dist.ProcessGroup) -> torch.Tensor:
    """Per-token cross entropy ``[T]`` (0 where not ``valid``) of logits split over ``tp_group`` along the
    vocabulary: this rank holds columns ``vocab_start ..`` of which the first ``valid_local`` are real
    (the rest padding). Max, sum of exponentials and target logit are reduced over the group; every rank
    gets the same values. The engine's one implementation (the fused loss's reference and the
    vocab-parallel log-probs use it)."""
    return _VocabParallelWeightedCE.apply(logits, labels, valid, vocab_start, valid_local, tp_group)


def weighted_linear_cross_entropy_ref(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                                      token_weights: torch.Tensor, ignore_index: int = -100,
                                      tp_group: Optional[dist.ProcessGroup] = None, chunk_size: Optional[int] = None,
                                      vocab_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum(w * ce), sum(w))`` over tokens whose label is not ``ignore_index``.

    Logits are ``hidden @ lm_head_weight.T``; with ``tp_group`` the weight is this rank's contiguous vocab
    slice and the softmax statistics are all-reduced over the group. Columns at or beyond ``vocab_size``
    (padding) are masked out. ``chunk_size`` is accepted for signature parity and ignored.
    """
    rank, size = _tp_rank_size(tp_group)
    vocab_size = _checks.check_loss(hidden, lm_head_weight, labels, token_weights, ignore_index, rank, size, vocab_size)
    valid = labels != ignore_index
    w = token_weights.float() * valid
    logits = F.linear(hidden, lm_head_weight).float()
    v_local = lm_head_weight.shape[0]
    vocab_start = rank * v_local
    valid_local = max(0, min(v_local, vocab_size - vocab_start))
    if tp_group is None:
        if valid_local < v_local:
            pad = torch.arange(v_local, device=logits.device) >= valid_local
            logits = logits.masked_fill(pad, -math.inf)
        ce = F.cross_entropy(logits, labels.long(), reduction="none", ignore_index=ignore_index)
    else:
        ce = vocab_parallel_cross_entropy(logits, labels.long(), valid, vocab_start, valid_local, tp_group)
    return (w * ce).sum(), w.sum()
