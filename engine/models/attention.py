"""Attention over packed sequences; the one place that picks a backend.

Inputs are ``q [B, S, H, D]``, ``k, v [B, S, Hkv, D]`` and ``cu_seqlens`` over the flattened
``B*S`` tokens (segments never cross rows). Attention stays inside each segment.

Backends: flash-attn's varlen kernel on GPU when installed; otherwise PyTorch's
``scaled_dot_product_attention`` with a block-diagonal (causal) mask. The model never knows which.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=1)
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore

        return flash_attn_varlen_func
    except Exception:  # not installed or broken build
        return None


def segment_ids(cu_seqlens: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """``[B, S]`` index of the segment each token belongs to."""
    pos = torch.arange(B * S, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens[1:].to(pos.dtype), pos, right=True)).view(B, S)


def block_mask(cu_seqlens: Optional[torch.Tensor], B: int, S: int, causal: bool, device) -> Optional[torch.Tensor]:
    """Boolean ``[B, 1, S, S]`` mask (True = attend) or None when plain (causal) attention suffices."""
    if cu_seqlens is None or cu_seqlens.numel() == B + 1 and bool(
        (cu_seqlens == torch.arange(B + 1, device=cu_seqlens.device) * S).all()
    ):
        return None
    seg = segment_ids(cu_seqlens.to(device), B, S)
    mask = seg[:, :, None] == seg[:, None, :]
    if causal:
        mask = mask & torch.ones(S, S, dtype=torch.bool, device=device).tril()
    return mask[:, None]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor] = None,
    causal: bool = True,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Returns ``[B, S, H, D]``. ``mask`` may be passed in precomputed (from ``block_mask``)."""
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    flash = _flash_varlen() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if flash is not None:
        cu = cu_seqlens if cu_seqlens is not None else torch.arange(B + 1, device=q.device) * S
        cu = cu.to(torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
        out = flash(q.reshape(B * S, H, D), k.reshape(B * S, Hkv, D), v.reshape(B * S, Hkv, D),
                    cu, cu, max_len, max_len, causal=causal)
        return out.view(B, S, H, D)
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=2)
        v = v.repeat_interleave(H // Hkv, dim=2)
    if mask is None:
        mask = block_mask(cu_seqlens, B, S, causal, q.device)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if mask is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return out.transpose(1, 2)
