"""V2PE rotary embedding: one launch rotates q and k, cos/sin from float positions inside the kernel.

Angle accuracy: ``u = position * inv_freq / 2pi`` (turns) is formed in float64, reduced to
``[-1/2, 1/2]`` exactly, converted to radians in float64 and only then to float32 for cos/sin,
so large positions (1e6) lose nothing. The float64 work is per (token, frequency), shared by all
heads of a program; the kernel stays memory-bound.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels import _alloc
from kernels.reference import rotary_inv_freq


@triton.jit
def _rotate_heads(x_ptr, o_ptr, head0, H, stride_xt, stride_xh, stride_ot, stride_oh,
                  t, t_mask, d, d_mask, cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    h = head0 + tl.arange(0, BLOCK_H)
    mask = t_mask[:, None, None] & (h < H)[None, :, None] & d_mask[None, None, :]
    x_off = t[:, None, None] * stride_xt + h[None, :, None].to(tl.int64) * stride_xh + d[None, None, :]
    o_off = t[:, None, None] * stride_ot + h[None, :, None].to(tl.int64) * stride_oh + d[None, None, :]
    x1 = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
    c = cos[:, None, :]
    s = sin[:, None, :]
    tl.store(o_ptr + o_off, (x1 * c - x2 * s).to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_ptr + o_off + HALF, (x2 * c + x1 * s).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, turns_ptr,
                   T, HQ, HK, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_qot, stride_qoh, stride_kot, stride_koh,
                   HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, INVERSE: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < T
    d = tl.arange(0, HALF_PAD)
    d_mask = d < HALF

    pos = tl.load(pos_ptr + t, mask=t_mask, other=0).to(tl.float64)
    turns = tl.load(turns_ptr + d, mask=d_mask, other=0.0)
    u = pos[:, None] * turns[None, :]
    u = u - tl.floor(u + 0.5)
    angle = (u * tl.full((), 6.283185307179586, tl.float64)).to(tl.float32)
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    if INVERSE:
        sin = -sin

    n_qb = tl.cdiv(HQ, BLOCK_HQ)
    if pid_h < n_qb:
        _rotate_heads(q_ptr, qo_ptr, pid_h * BLOCK_HQ, HQ, stride_qt, stride_qh, stride_qot, stride_qoh,
                      t, t_mask, d, d_mask, cos, sin, HALF, BLOCK_HQ)
    else:
        _rotate_heads(k_ptr, ko_ptr, (pid_h - n_qb) * BLOCK_HK, HK, stride_kt, stride_kh, stride_kot, stride_koh,
                      t, t_mask, d, d_mask, cos, sin, HALF, BLOCK_HK)


def rotary_config(half: int, hq: int, hk: int) -> dict[str, int]:
    """Block sizes: up to 8 heads per program, ~2K elements per half tile."""
    half_pad = triton.next_power_of_2(half)
    bhq = min(triton.next_power_of_2(hq), 8)
    bhk = min(triton.next_power_of_2(hk), 8)
    block_t = max(1, 2048 // (max(bhq, bhk) * half_pad))
    return dict(HALF_PAD=half_pad, BLOCK_T=block_t, BLOCK_HQ=bhq, BLOCK_HK=bhk)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rotate(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, turns: torch.Tensor,
           inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q [T, Hq, D]``, ``k [T, Hk, D]`` (last dim contiguous) into new contiguous tensors."""
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    T, HQ, D = q.shape
    HK = k.shape[1]
    qo = _alloc.empty(q.shape, q.dtype, q.device)
    ko = _alloc.empty(k.shape, k.dtype, k.device)
    if T == 0:
        return qo, ko
    cfg = rotary_config(D // 2, HQ, HK)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(HQ, cfg["BLOCK_HQ"]) + triton.cdiv(HK, cfg["BLOCK_HK"]))
    _rotary_kernel[grid](q, k, qo, ko, positions, turns, T, HQ, HK,
                         q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                         qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1),
                         HALF=D // 2, INVERSE=inverse, num_warps=4, **cfg)
    return qo, ko


def rotary_turns(head_dim: int, theta: float, inv_freq: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per-frequency turns per unit position, ``inv_freq / 2pi`` in float64."""
    inv = rotary_inv_freq(head_dim, theta, device) if inv_freq is None else inv_freq.to(device, torch.float64)
    return (inv / (2 * math.pi)).contiguous()


class V2PERotary(torch.autograd.Function):
    """Forward rotates by +angle, backward by -angle (the transpose of a rotation)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                turns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(positions, turns)
        return rotate(q, k, positions, turns, inverse=False)

    @staticmethod
    def backward(ctx, gq: Optional[torch.Tensor], gk: Optional[torch.Tensor]):
        positions, turns = ctx.saved_tensors
        return (*rotate(gq, gk, positions, turns, inverse=True), None, None)


def v2pe_rotary_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float,
                       inv_freq: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten the token dims, rotate, restore shapes (arguments already validated)."""
    lead = positions.shape
    T = positions.numel()
    qf = q.reshape(T, q.shape[-2], q.shape[-1])
    kf = k.reshape(T, k.shape[-2], k.shape[-1])
    pos = positions.reshape(T).contiguous()
    turns = rotary_turns(q.shape[-1], theta, inv_freq, q.device)
    qo, ko = V2PERotary.apply(qf, kf, pos, turns)
    return qo.view(*lead, *q.shape[-2:]), ko.view(*lead, *k.shape[-2:])
