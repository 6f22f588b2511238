"""Public entry points: each validates its arguments, then runs the Triton or the reference path."""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.distributed as dist

from kernels import _checks, reference
from kernels._dispatch import MODES, use_triton


def v2pe_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float = 1e6, *,
                inv_freq: Optional[torch.Tensor] = None, mode: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of ``q [..., Hq, D]`` and ``k [..., Hk, D]`` at float ``positions [...]``.

    ``inv_freq`` (``[D/2]``) overrides ``1 / theta^(2i/D)``. Returns ``(q_out, k_out)``, new tensors.
    """
    _checks.check_rotary(q, k, positions, theta, inv_freq)
    if use_triton("v2pe_rotary", mode, (q, k)):
        from kernels._triton.rotary import v2pe_rotary_triton
        return v2pe_rotary_triton(q, k, positions, theta, inv_freq)
    return reference.v2pe_rotary_ref(q, k, positions, theta, inv_freq)


def pixel_shuffle(x: torch.Tensor, scale: float = 0.5, version: str = "v2", *, mode: str = "auto") -> torch.Tensor:
    """InternVL pixel shuffle ``[N, H, W, C] -> [N, H*s, W*s, C/s^2]`` (v2 order; v1 swaps the spatial dims)."""
    _checks.shuffle_ratio(x, scale, version)
    if use_triton("pixel_shuffle", mode, (x,)):
        from kernels._triton.pixel_shuffle import pixel_shuffle_triton
        return pixel_shuffle_triton(x, scale, version)
    return reference.pixel_shuffle_ref(x, scale, version)


def pixel_shuffle_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float = 1e-5,
                            scale: float = 0.5, version: str = "v2", *, mode: str = "auto") -> torch.Tensor:
    """``LayerNorm(pixel_shuffle(x))`` in one pass (the projector's first layer), float32 statistics."""
    r = _checks.shuffle_ratio(x, scale, version, "pixel_shuffle_layernorm")
    _checks.check_layernorm(x, weight, bias, x.shape[-1] * r * r, eps)
    if use_triton("pixel_shuffle_layernorm", mode, (x, weight) if bias is None else (x, weight, bias)):
        from kernels._triton.pixel_shuffle import pixel_shuffle_layernorm_triton
        return pixel_shuffle_layernorm_triton(x, weight, bias, eps, scale, version)
    return reference.pixel_shuffle_layernorm_ref(x, weight, bias, eps, scale, version)


def weighted_linear_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                                  token_weights: torch.Tensor, ignore_index: int = -100,
                                  tp_group: Optional[dist.ProcessGroup] = None, chunk_size: Optional[int] = None,
                                  vocab_size: Optional[int] = None, *,
                                  mode: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum(w * ce), sum(w))`` of the LM head + cross entropy, never materialising all logits.

    hidden ``[T, h]``, lm_head_weight ``[V_local, h]`` (rank r of ``tp_group`` holds vocab rows
    ``[r*V_local, (r+1)*V_local)``), labels ``[T]``, token_weights ``[T]``. Tokens labelled
    ``ignore_index`` count 0 in both sums. Vocab columns ``>= vocab_size`` (padding) never win.
    Gradients flow to ``hidden`` and ``lm_head_weight``. Under tensor parallelism the hidden
    gradient is this rank's partial sum: the caller all-reduces it over ``tp_group`` (the backward
    of Megatron's copy-to-tensor-parallel-region does exactly that). hidden, labels and
    token_weights must be the same on every rank of ``tp_group``. The Triton path drops ignored
    and zero-weight tokens before its GEMMs (one host sync) and keeps its gradients for a single
    backward; the weight gradient is accumulated over token chunks in the weight's dtype.
    """
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"weighted_linear_cross_entropy: chunk_size {chunk_size} must be > 0")
    if use_triton("weighted_linear_cross_entropy", mode, (hidden, lm_head_weight)):
        from kernels._triton.fused_loss import weighted_linear_cross_entropy_triton
        return weighted_linear_cross_entropy_triton(hidden, lm_head_weight, labels, token_weights, ignore_index,
                                                    tp_group, chunk_size, vocab_size)
    return reference.weighted_linear_cross_entropy_ref(hidden, lm_head_weight, labels, token_weights, ignore_index,
                                                       tp_group, chunk_size, vocab_size)


_KERNELS: dict[str, Callable] = {
    "rotary": v2pe_rotary,
    "v2pe_rotary": v2pe_rotary,
    "pixel_shuffle": pixel_shuffle,
    "pixel_shuffle_layernorm": pixel_shuffle_layernorm,
    "loss": weighted_linear_cross_entropy,
    "weighted_linear_cross_entropy": weighted_linear_cross_entropy,
}


def get_kernel(name: str, mode: str = "auto") -> Callable:
    """The entry point ``name`` (rotary | pixel_shuffle | pixel_shuffle_layernorm | loss) bound to ``mode``."""
    if name not in _KERNELS:
        raise ValueError(f"kernels.get_kernel: unknown kernel {name!r}; known: {', '.join(sorted(_KERNELS))}")
    if mode not in MODES:
        raise ValueError(f"kernels.get_kernel: mode {mode!r} for {name!r} must be one of {', '.join(MODES)}")
    return functools.partial(_KERNELS[name], mode=mode)
