"""Attention over packed sequences; the one place that picks a backend.

Inputs are ``q [B, S, H, D]``, ``k, v [B, S, Hkv, D]`` and ``cu_seqlens`` over the flattened
``B*S`` tokens (segments never cross rows). Attention stays inside each segment.

Backends, best first (``choose_backend``); the model never knows which:
- ``flash``: flash-attn's varlen kernel (CUDA, fp16/bf16, when the package is installed);
- ``varlen``: PyTorch's own document-masked kernel ``torch.nn.attention.varlen.varlen_attn``
  (CUDA, fp16/bf16, when the installed torch has it);
- ``flex``: FlexAttention (compiled) with a document ``BlockMask`` (CUDA);
- ``sdpa``: ``scaled_dot_product_attention`` with a dense block-diagonal (causal) mask: the CPU path.
Grouped-query attention never copies k/v: each backend attends a group of query heads to its k/v
head itself. The mask is a ``DocumentMask`` built once per microbatch (``block_mask``) and shared
by every layer; it makes the dense mask or the BlockMask on first use. The first call on each
(device, dtype) logs the backend it runs.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

log = logging.getLogger("engine.models")

BACKENDS = ("flash", "varlen", "flex", "sdpa")


@functools.lru_cache(maxsize=1)
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore

        return flash_attn_varlen_func
    except Exception:  # not installed or broken build
        return None


@functools.lru_cache(maxsize=1)
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn
    except Exception:  # older torch
        return None


@functools.lru_cache(maxsize=1)
def _flex():
    try:
        from torch.nn.attention import flex_attention as fa

        return fa
    except Exception:
        return None


@functools.lru_cache(maxsize=1)
def _flex_compiled():
    return torch.compile(_flex().flex_attention, dynamic=False)


@functools.lru_cache(maxsize=4)
def _varlen_kwargs(causal: bool, gqa: bool) -> Optional[dict]:
    """Keyword arguments for this torch's ``varlen_attn`` (its signature changed between releases),
    or None when it cannot express the call."""
    import inspect

    params = inspect.signature(_torch_varlen()).parameters
    if "is_causal" in params:
        kw = {"is_causal": causal}
    elif "window_size" in params:
        kw = {"window_size": (-1, 0) if causal else (-1, -1)}
    else:
        return None
    if gqa:
        if "enable_gqa" not in params:
            return None
        kw["enable_gqa"] = True
    return kw


def available_backends(device_type: str, dtype: torch.dtype) -> list[str]:
    """Backends that can run here for this device and dtype, best first (``sdpa`` always last)."""
    out = []
    if device_type == "cuda":
        if dtype in (torch.float16, torch.bfloat16):
            if _flash_varlen() is not None:
                out.append("flash")
            if _torch_varlen() is not None:
                out.append("varlen")
        if _flex() is not None:
            out.append("flex")
    out.append("sdpa")
    return out


_REPORTED: set = set()


def choose_backend(q: torch.Tensor) -> str:
    name = available_backends(q.device.type, q.dtype)[0]
    key = (q.device.type, q.dtype, name)
    if key not in _REPORTED:
        _REPORTED.add(key)
        log.info("attention backend on %s %s: %s", q.device.type, str(q.dtype).replace("torch.", ""), name)
    return name


def segment_ids(cu_seqlens: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """``[B, S]`` index of the segment each token belongs to."""
    pos = torch.arange(B * S, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens[1:].to(pos.dtype), pos, right=True)).view(B, S)


@dataclass
class DocumentMask:
    """Which tokens of a ``[B, S]`` microbatch attend to which: inside their segment (``cu_seqlens``),
    causally when ``causal``. Built once per microbatch; each backend's form is made on first use."""

    cu_seqlens: torch.Tensor
    B: int
    S: int
    causal: bool
    device: Any
    _dense: Optional[torch.Tensor] = field(default=None, repr=False)
    _flex: Any = field(default=None, repr=False)

    def dense(self) -> torch.Tensor:
        """Boolean ``[B, 1, S, S]`` (True = attend), for SDPA."""
        if self._dense is None:
            seg = segment_ids(self.cu_seqlens.to(self.device), self.B, self.S)
            mask = seg[:, :, None] == seg[:, None, :]
            if self.causal:
                mask = mask & torch.ones(self.S, self.S, dtype=torch.bool, device=self.device).tril()
            self._dense = mask[:, None]
        return self._dense

    def flex(self):
        """FlexAttention ``BlockMask`` of the same mask."""
        if self._flex is None:
            seg, causal = segment_ids(self.cu_seqlens.to(self.device), self.B, self.S), self.causal

            def mask_mod(b, h, qi, ki):
                same = seg[b, qi] == seg[b, ki]
                return same & (qi >= ki) if causal else same

            self._flex = _flex().create_block_mask(mask_mod, self.B, None, self.S, self.S, device=self.device)
        return self._flex


def block_mask(cu_seqlens: Optional[torch.Tensor], B: int, S: int, causal: bool, device) -> Optional[DocumentMask]:
    """The microbatch's ``DocumentMask``, or None when plain (causal) attention over each row suffices."""
    if cu_seqlens is None or cu_seqlens.numel() == B + 1 and bool(
        (cu_seqlens == torch.arange(B + 1, device=cu_seqlens.device) * S).all()
    ):
        return None
    return DocumentMask(cu_seqlens, B, S, causal, device)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor] = None,
    causal: bool = True,
    mask: Optional[DocumentMask] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Returns ``[B, S, H, D]``. ``mask``: the microbatch's ``block_mask`` (built here when not
    given); ``backend``: force one of ``BACKENDS`` (default: ``choose_backend``)."""
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    backend = backend or choose_backend(q)
    if backend in ("flash", "varlen"):
        cu = cu_seqlens if cu_seqlens is not None else torch.arange(B + 1, device=q.device) * S
        cu = cu.to(device=q.device, dtype=torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
        flat = (t.reshape(B * S, t.shape[2], D) for t in (q, k, v))
        if backend == "flash":
            out = _flash_varlen()(*flat, cu, cu, max_len, max_len, causal=causal)
        else:
            kw = _varlen_kwargs(causal, Hkv != H)
            if kw is None:  # this torch's varlen_attn cannot do it: the next backend
                return attention(q, k, v, cu_seqlens, causal, mask, "flex" if q.is_cuda and _flex() else "sdpa")
            out = _torch_varlen()(*flat, cu, cu, max_len, max_len, **kw)
        return out.view(B, S, H, D)
    if mask is None and cu_seqlens is not None:
        mask = block_mask(cu_seqlens, B, S, causal, q.device)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = Hkv != H
    if backend == "flex":
        fa = _flex()
        if mask is None:
            mask = DocumentMask(torch.arange(B + 1, device=q.device) * S, B, S, causal, q.device)
        run = _flex_compiled() if q.is_cuda else fa.flex_attention  # compiled on GPU; eager (unfused) elsewhere
        out = run(qt, kt, vt, block_mask=mask.flex(), enable_gqa=gqa)
    elif mask is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask.dense(), enable_gqa=gqa)
    return out.transpose(1, 2)
