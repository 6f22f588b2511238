"""Argument validation shared by the Triton and reference paths (same errors either way)."""

from __future__ import annotations

from typing import Optional

import torch

_POSITION_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64)


def check_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float,
                 inv_freq: Optional[torch.Tensor]) -> None:
    """q ``[..., Hq, D]``, k ``[..., Hk, D]``, positions ``[...]``, D even."""
    if q.dim() < 2 or k.dim() < 2:
        raise ValueError(f"v2pe_rotary: q and k must be [..., heads, head_dim], got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[:-2] != k.shape[:-2] or q.shape[:-2] != positions.shape:
        raise ValueError(f"v2pe_rotary: token dims differ: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"positions {tuple(positions.shape)} (need q[..., Hq, D], k[..., Hk, D], positions[...])")
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"v2pe_rotary: head_dim of q ({d}) and k ({k.shape[-1]}) differ")
    if d % 2 or d == 0:
        raise ValueError(f"v2pe_rotary: head_dim {d} must be even and positive")
    if q.dtype != k.dtype or not q.dtype.is_floating_point:
        raise ValueError(f"v2pe_rotary: q and k must share a floating dtype, got {q.dtype} and {k.dtype}")
    if positions.dtype not in _POSITION_DTYPES:
        raise ValueError(f"v2pe_rotary: positions dtype {positions.dtype} must be one of float32, float64, int32, int64 "
                         "(half precision cannot hold large positions)")
    if q.device != k.device or q.device != positions.device:
        raise ValueError(f"v2pe_rotary: q ({q.device}), k ({k.device}) and positions ({positions.device}) must share a device")
    if inv_freq is None:
        if not theta > 0:
            raise ValueError(f"v2pe_rotary: theta {theta} must be > 0")
    elif inv_freq.shape != (d // 2,):
        raise ValueError(f"v2pe_rotary: inv_freq shape {tuple(inv_freq.shape)} must be ({d // 2},)")


def shuffle_ratio(x: torch.Tensor, scale: float, version: str, name: str = "pixel_shuffle") -> int:
    """Validate ``x [N, H, W, C]`` for an InternVL pixel shuffle and return r = 1/scale."""
    if version not in ("v1", "v2"):
        raise ValueError(f"{name}: version {version!r} must be 'v1' or 'v2'")
    if not (isinstance(scale, (int, float)) and 0 < scale <= 1):
        raise ValueError(f"{name}: scale {scale!r} must be 1/r for an integer r >= 1")
    r = round(1.0 / scale)
    if abs(1.0 / scale - r) > 1e-9:
        raise ValueError(f"{name}: scale {scale!r} must be 1/r for an integer r >= 1")
    if x.dim() != 4:
        raise ValueError(f"{name}: x must be [N, H, W, C], got shape {tuple(x.shape)}")
    n, h, w, c = x.shape
    if h % r or w % r:
        raise ValueError(f"{name}: spatial size {h}x{w} of x {tuple(x.shape)} is not divisible by 1/scale = {r}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name}: x dtype {x.dtype} must be floating point")
    return r


def check_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], features: int, eps: float) -> None:
    if weight.shape != (features,):
        raise ValueError(f"pixel_shuffle_layernorm: weight shape {tuple(weight.shape)} must be ({features},)")
    if bias is not None and bias.shape != (features,):
        raise ValueError(f"pixel_shuffle_layernorm: bias shape {tuple(bias.shape)} must be ({features},)")
    if not eps > 0:
        raise ValueError(f"pixel_shuffle_layernorm: eps {eps} must be > 0")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"pixel_shuffle_layernorm: {name} on {t.device} but x on {x.device}")


def check_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor,
               ignore_index: int, tp_rank: int, tp_size: int, vocab_size: Optional[int]) -> int:
    """Validate the fused loss arguments; returns the true (unpadded) vocab size."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"weighted_linear_cross_entropy: hidden {tuple(hidden.shape)} must be [tokens, hidden] and "
                         f"lm_head_weight {tuple(weight.shape)} must be [vocab_local, hidden]")
    t, h = hidden.shape
    if weight.shape[1] != h:
        raise ValueError(f"weighted_linear_cross_entropy: hidden size {h} != lm_head_weight.shape[1] {weight.shape[1]}")
    if labels.shape != (t,) or token_weights.shape != (t,):
        raise ValueError(f"weighted_linear_cross_entropy: labels {tuple(labels.shape)} and token_weights "
                         f"{tuple(token_weights.shape)} must both be ({t},)")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"weighted_linear_cross_entropy: labels dtype {labels.dtype} must be int64 or int32")
    if not token_weights.dtype.is_floating_point:
        raise ValueError(f"weighted_linear_cross_entropy: token_weights dtype {token_weights.dtype} must be floating point")
    if hidden.dtype != weight.dtype or not hidden.dtype.is_floating_point:
        raise ValueError(f"weighted_linear_cross_entropy: hidden ({hidden.dtype}) and lm_head_weight ({weight.dtype}) "
                         "must share a floating dtype")
    for name, x in (("lm_head_weight", weight), ("labels", labels), ("token_weights", token_weights)):
        if x.device != hidden.device:
            raise ValueError(f"weighted_linear_cross_entropy: {name} on {x.device} but hidden on {hidden.device}")
    padded = weight.shape[0] * tp_size
    if vocab_size is None:
        vocab_size = padded
    if not 0 < vocab_size <= padded:
        raise ValueError(f"weighted_linear_cross_entropy: vocab_size {vocab_size} must be in [1, {padded}] "
                         f"(lm_head rows {weight.shape[0]} x tp {tp_size})")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"weighted_linear_cross_entropy: labels[{i}] = {int(labels[i])} is outside [0, {vocab_size}) "
                         f"and is not ignore_index {ignore_index}")
    return vocab_size
