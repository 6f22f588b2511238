"""V2PE rotary embedding: one launch rotates q and k, cos/sin from float positions inside the kernel.

Angle accuracy: ``u = position * inv_freq / 2pi`` (turns) is formed in float64 and reduced
exactly to within 1/8 turn of a quarter turn; only that remainder goes to float32, so positions
up to 2^24 keep ~1e-7 accuracy (a float32 product position * inv_freq is off by ~1e-2 radians at
1e6). The float64 and trigonometric work is per (token,
frequency), shared by the up to 8 heads of a program; the kernel stays memory-bound.
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
def _cos_sin_of_turns(u):
    """cos(2*pi*u), sin(2*pi*u) in float32 for float64 turns ``u``.

    The nearest quarter turn q is split off exactly in float64, leaving |r| <= 1/8 turn; the angle
    2*pi*r (|x| <= pi/4) goes to float32 and through Taylor polynomials (truncation < 2e-9), then
    the quadrant q mod 4 rotates the result. No branches and no large-argument path.
    """
    q = tl.floor(u * 4.0 + 0.5)
    x = (u - q * 0.25).to(tl.float32) * 6.283185307179586
    x2 = x * x
    s = x * (1.0 + x2 * (-1.6666666666666666e-1 + x2 * (8.333333333333333e-3 + x2 * (
        -1.984126984126984e-4 + x2 * 2.7557319223985893e-6))))
    c = 1.0 + x2 * (-0.5 + x2 * (4.1666666666666664e-2 + x2 * (-1.3888888888888889e-3 + x2 * (
        2.48015873015873e-5 + x2 * -2.755731922398589e-7))))
    quadrant = q.to(tl.int64) & 3
    sin = tl.where(quadrant == 0, s, tl.where(quadrant == 1, c, tl.where(quadrant == 2, -s, -c)))
    cos = tl.where(quadrant == 0, c, tl.where(quadrant == 1, -s, tl.where(quadrant == 2, -c, s)))
    return cos, sin


@triton.jit
def _rotate_heads(x_ptr, o_ptr, head0, head1, stride_xt, stride_xh, stride_ot, stride_oh,
                  t, mask, d, cos, sin, HALF: tl.constexpr):
    """Heads ``[head0, head1)`` of the tokens ``t``: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x_row = t[:, None] * stride_xt + d[None, :]
    o_row = t[:, None] * stride_ot + d[None, :]
    for h in range(head0, head1):
        x_off = x_row + tl.cast(h, tl.int64) * stride_xh
        o_off = o_row + tl.cast(h, tl.int64) * stride_oh
        x1 = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_ptr + o_off, (x1 * cos - x2 * sin).to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(o_ptr + o_off + HALF, (x2 * cos + x1 * sin).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, turns_ptr,
                   T, HQ, HK, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_qot, stride_qoh, stride_kot, stride_koh,
                   HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                   HEADS: tl.constexpr, INVERSE: tl.constexpr):
    """Program (i, j): tokens [i*BLOCK_T, ...), head group j of q (then of k), HEADS heads per group.

    cos/sin live in the same [BLOCK_T, HALF_PAD] layout as the data tiles, so each thread computes
    them once for its own elements and reuses them for every head of the group.
    """
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, HALF_PAD)
    mask = (t < T)[:, None] & (d < HALF)[None, :]

    pos = tl.load(pos_ptr + t, mask=t < T, other=0).to(tl.float64)
    turns = tl.load(turns_ptr + d, mask=d < HALF, other=0.0)
    cos, sin = _cos_sin_of_turns(pos[:, None] * turns[None, :])
    if INVERSE:
        sin = -sin

    n_qg = tl.cdiv(HQ, HEADS)
    if pid_h < n_qg:
        h0 = pid_h * HEADS
        _rotate_heads(q_ptr, qo_ptr, h0, tl.minimum(h0 + HEADS, HQ), stride_qt, stride_qh, stride_qot, stride_qoh,
                      t, mask, d, cos, sin, HALF)
    else:
        h0 = (pid_h - n_qg) * HEADS
        _rotate_heads(k_ptr, ko_ptr, h0, tl.minimum(h0 + HEADS, HK), stride_kt, stride_kh, stride_kot, stride_koh,
                      t, mask, d, cos, sin, HALF)


def rotary_config(half: int, hq: int, hk: int) -> dict[str, int]:
    """Tiles of ~1K elements per half (8 values per thread at 4 warps), up to 8 heads per program."""
    half_pad = triton.next_power_of_2(half)
    return dict(HALF_PAD=half_pad, BLOCK_T=max(1, 1024 // half_pad), HEADS=8)


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
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(HQ, cfg["HEADS"]) + triton.cdiv(HK, cfg["HEADS"]))
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
