"""InternVL pixel shuffle (and shuffle + LayerNorm) as single gather passes.

With r = 1/scale and x ``[N, A, B, C]`` the v2 output is ``[N, A/r, B/r, r*r*C]`` with
``out[n, a, b, (q*r + k)*C + c] = x[n, a*r + q, b*r + k, c]``; v1 stores the same rows as
``[N, B/r, A/r, r*r*C]``. Each output row is r*r contiguous channel runs of the input.

Shuffle + LayerNorm: rows that fit a register tile (r*r*C up to 16K padded elements forward, 4K
backward, i.e. ViT-300M's C=1024 both ways) are read once; backward keeps the weight and bias
gradient partials in registers across the rows of a program. Wider rows use channel-chunked kernels
that re-read the row (from cache) and accumulate those partials in global memory.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels import _alloc


@triton.jit
def _source_rows(o, A2, B2, stride_xn, stride_xa, stride_xb, R: tl.constexpr, V2: tl.constexpr):
    """Input offset of the (q=0, k=0) run of output rows ``o`` (int64)."""
    n = o // (A2 * B2)
    rem = o % (A2 * B2)
    if V2:
        a = rem // B2
        b = rem % B2
    else:
        b = rem // A2
        a = rem % A2
    return n * stride_xn + (a * R) * stride_xa + (b * R) * stride_xb


@triton.jit
def _shuffle_kernel(x_ptr, y_ptr, ROWS, A2, B2, C, stride_xn, stride_xa, stride_xb,
                    R: tl.constexpr, V2: tl.constexpr, BACKWARD: tl.constexpr,
                    BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (o < ROWS)[:, None] & (c < C)[None, :]
    src = _source_rows(o, A2, B2, stride_xn, stride_xa, stride_xb, R, V2)
    for q in tl.static_range(R):
        for k in tl.static_range(R):
            x_off = (src + q * stride_xa + k * stride_xb)[:, None] + c[None, :]
            y_off = (o * (R * R * C) + (q * R + k) * C)[:, None] + c[None, :]
            if BACKWARD:
                tl.store(x_ptr + x_off, tl.load(y_ptr + y_off, mask=mask), mask=mask)
            else:
                tl.store(y_ptr + y_off, tl.load(x_ptr + x_off, mask=mask), mask=mask)


def _shuffle_config(c: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_C): a power-of-two channel block that divides C when possible, ~4K elements per run."""
    block_c = min(triton.next_power_of_2(c), 1024)
    while block_c > 128 and c % block_c:
        block_c //= 2
    return max(1, 4096 // block_c), block_c


def _out_shape(x_shape: torch.Size, r: int, v2: bool) -> tuple[int, int, int, int]:
    n, a, b, c = x_shape
    return (n, a // r, b // r, c * r * r) if v2 else (n, b // r, a // r, c * r * r)


def _launch_shuffle(x: torch.Tensor, y: torch.Tensor, r: int, v2: bool, backward: bool) -> None:
    n, a, b, c = x.shape
    rows = n * (a // r) * (b // r)
    if rows == 0 or c == 0:
        return
    block_rows, block_c = _shuffle_config(c)
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(c, block_c))
    _shuffle_kernel[grid](x, y, rows, a // r, b // r, c, x.stride(0), x.stride(1), x.stride(2),
                          R=r, V2=v2, BACKWARD=backward, BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=4)


class PixelShuffle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, r: int, v2: bool) -> torch.Tensor:
        if x.stride(-1) != 1:
            x = x.contiguous()
        y = _alloc.empty(_out_shape(x.shape, r, v2), x.dtype, x.device)
        _launch_shuffle(x, y, r, v2, backward=False)
        ctx.shape, ctx.r, ctx.v2 = x.shape, r, v2
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        gy = gy.contiguous()
        gx = _alloc.empty(ctx.shape, gy.dtype, gy.device)
        _launch_shuffle(gx, gy, ctx.r, ctx.v2, backward=True)
        return gx, None, None


def pixel_shuffle_triton(x: torch.Tensor, scale: float, version: str) -> torch.Tensor:
    return PixelShuffle.apply(x, round(1.0 / scale), version == "v2")


# ----------------------------------------------------------------------------- shuffle + LayerNorm


@triton.jit
def _shuffle_ln_fwd_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, A2, B2, C,
                           stride_xn, stride_xa, stride_xb, eps,
                           R: tl.constexpr, V2: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
    """One output row per program: mean, then variance, then normalise (the row stays in cache)."""
    o = tl.program_id(0).to(tl.int64)
    src = _source_rows(o, A2, B2, stride_xn, stride_xa, stride_xb, R, V2)
    D = R * R * C
    cols = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for q in tl.static_range(R):
        for k in tl.static_range(R):
            for c0 in range(0, C, BLOCK_C):
                c = c0 + cols
                acc += tl.load(x_ptr + src + q * stride_xa + k * stride_xb + c, mask=c < C, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / D
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for q in tl.static_range(R):
        for k in tl.static_range(R):
            for c0 in range(0, C, BLOCK_C):
                c = c0 + cols
                x = tl.load(x_ptr + src + q * stride_xa + k * stride_xb + c, mask=c < C, other=0.0).to(tl.float32)
                xc = tl.where(c < C, x - mean, 0.0)
                acc += xc * xc
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / D + eps)
    tl.store(mean_ptr + o, mean)
    tl.store(rstd_ptr + o, rstd)
    for q in tl.static_range(R):
        for k in tl.static_range(R):
            for c0 in range(0, C, BLOCK_C):
                c = c0 + cols
                m = c < C
                f = (q * R + k) * C + c
                x = tl.load(x_ptr + src + q * stride_xa + k * stride_xb + c, mask=m, other=0.0).to(tl.float32)
                y = (x - mean) * rstd * tl.load(w_ptr + f, mask=m, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    y += tl.load(b_ptr + f, mask=m, other=0.0).to(tl.float32)
                tl.store(y_ptr + o * D + f, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _shuffle_ln_bwd_kernel(x_ptr, dy_ptr, dx_ptr, w_ptr, mean_ptr, rstd_ptr, dw_ptr, db_ptr,
                           ROWS, ROWS_PER_PROG, A2, B2, C, stride_xn, stride_xa, stride_xb,
                           stride_dn, stride_da, stride_db,
                           R: tl.constexpr, V2: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows ``[pid*ROWS_PER_PROG, ...)``: dx per row, dweight/dbias accumulated into this program's partial row."""
    pid = tl.program_id(0)
    D = R * R * C
    cols = tl.arange(0, BLOCK_C)
    part = pid.to(tl.int64) * D
    start = pid * ROWS_PER_PROG
    end = tl.minimum(start + ROWS_PER_PROG, ROWS)
    for row in range(start, end):
        o = tl.zeros((), dtype=tl.int64) + row
        src = _source_rows(o, A2, B2, stride_xn, stride_xa, stride_xb, R, V2)
        dst = _source_rows(o, A2, B2, stride_dn, stride_da, stride_db, R, V2)
        mean = tl.load(mean_ptr + o)
        rstd = tl.load(rstd_ptr + o)
        acc1 = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for q in tl.static_range(R):
            for k in tl.static_range(R):
                for c0 in range(0, C, BLOCK_C):
                    c = c0 + cols
                    m = c < C
                    f = (q * R + k) * C + c
                    x = tl.load(x_ptr + src + q * stride_xa + k * stride_xb + c, mask=m, other=0.0).to(tl.float32)
                    g = tl.load(dy_ptr + o * D + f, mask=m, other=0.0).to(tl.float32)
                    g = g * tl.load(w_ptr + f, mask=m, other=0.0).to(tl.float32)
                    acc1 += g * (x - mean) * rstd
                    acc2 += g
        c1 = tl.sum(acc1, axis=0) / D
        c2 = tl.sum(acc2, axis=0) / D
        for q in tl.static_range(R):
            for k in tl.static_range(R):
                for c0 in range(0, C, BLOCK_C):
                    c = c0 + cols
                    m = c < C
                    f = (q * R + k) * C + c
                    x = tl.load(x_ptr + src + q * stride_xa + k * stride_xb + c, mask=m, other=0.0).to(tl.float32)
                    dy = tl.load(dy_ptr + o * D + f, mask=m, other=0.0).to(tl.float32)
                    xhat = (x - mean) * rstd
                    g = dy * tl.load(w_ptr + f, mask=m, other=0.0).to(tl.float32)
                    dx = (g - c2 - xhat * c1) * rstd
                    tl.store(dx_ptr + dst + q * stride_da + k * stride_db + c, dx.to(dx_ptr.dtype.element_ty), mask=m)
                    tl.store(dw_ptr + part + f, tl.load(dw_ptr + part + f, mask=m, other=0.0) + dy * xhat, mask=m)
                    tl.store(db_ptr + part + f, tl.load(db_ptr + part + f, mask=m, other=0.0) + dy, mask=m)


@triton.jit
def _row_tile(o, A2, B2, C, stride_n, stride_a, stride_b, R: tl.constexpr, V2: tl.constexpr,
              RR_PAD: tl.constexpr, BLOCK_C: tl.constexpr):
    """Output row ``o`` as a [RR_PAD, BLOCK_C] tile: offsets of its R*R runs in a tensor with the given
    strides, offsets in the row itself, and the mask of real elements."""
    j = tl.arange(0, RR_PAD)
    c = tl.arange(0, BLOCK_C)
    src = _source_rows(o, A2, B2, stride_n, stride_a, stride_b, R, V2)
    run = src + (j // R).to(tl.int64) * stride_a + (j % R).to(tl.int64) * stride_b
    mask = (j < R * R)[:, None] & (c < C)[None, :]
    return run[:, None] + c[None, :], j[:, None] * C + c[None, :], mask


@triton.jit
def _shuffle_ln_fwd_tile_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, A2, B2, C,
                                stride_xn, stride_xa, stride_xb, eps,
                                R: tl.constexpr, V2: tl.constexpr, HAS_BIAS: tl.constexpr,
                                RR_PAD: tl.constexpr, BLOCK_C: tl.constexpr):
    """One output row per program, read once into registers: statistics, normalise, store."""
    o = tl.program_id(0).to(tl.int64)
    D = R * R * C
    x_off, f, mask = _row_tile(o, A2, B2, C, stride_xn, stride_xa, stride_xb, R, V2, RR_PAD, BLOCK_C)
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(xc * xc, axis=1), axis=0) / D + eps)
    y = xc * rstd * tl.load(w_ptr + f, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + f, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + o * D + f, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + o, mean)
    tl.store(rstd_ptr + o, rstd)


@triton.jit
def _shuffle_ln_bwd_tile_kernel(x_ptr, dy_ptr, dx_ptr, w_ptr, mean_ptr, rstd_ptr, dw_ptr, db_ptr,
                                ROWS, A2, B2, C, stride_xn, stride_xa, stride_xb, stride_dn, stride_da, stride_db,
                                R: tl.constexpr, V2: tl.constexpr, RR_PAD: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows pid, pid + P, ...: each read once (x, dy) into registers; dweight/dbias accumulate in
    registers and are written once per program as a partial row."""
    pid = tl.program_id(0)
    D = R * R * C
    _off0, f, mask = _row_tile(tl.zeros((), dtype=tl.int64), A2, B2, C, stride_xn, stride_xa, stride_xb, R, V2,
                               RR_PAD, BLOCK_C)
    w = tl.load(w_ptr + f, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((RR_PAD, BLOCK_C), dtype=tl.float32)
    db = tl.zeros((RR_PAD, BLOCK_C), dtype=tl.float32)
    for row in range(pid, ROWS, tl.num_programs(0)):
        o = tl.cast(row, tl.int64)
        x_off, _f1, _m1 = _row_tile(o, A2, B2, C, stride_xn, stride_xa, stride_xb, R, V2, RR_PAD, BLOCK_C)
        dx_off, _f2, _m2 = _row_tile(o, A2, B2, C, stride_dn, stride_da, stride_db, R, V2, RR_PAD, BLOCK_C)
        x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + o * D + f, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - tl.load(mean_ptr + o)) * tl.load(rstd_ptr + o), 0.0)
        g = dy * w
        c1 = tl.sum(tl.sum(g * xhat, axis=1), axis=0) / D
        c2 = tl.sum(tl.sum(g, axis=1), axis=0) / D
        dx = (g - c2 - xhat * c1) * tl.load(rstd_ptr + o)
        tl.store(dx_ptr + dx_off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    part = pid.to(tl.int64) * D
    tl.store(dw_ptr + part + f, dw, mask=mask)
    tl.store(db_ptr + part + f, db, mask=mask)


# Whole-row tiles (elements, padded to powers of two) up to which the single-read kernels are used;
# wider rows take the channel-chunked kernels above. Backward holds five tiles in registers.
FWD_TILE_MAX = 16384
BWD_TILE_MAX = 4096


def _tile_shape(r: int, c: int) -> tuple[int, int]:
    """(RR_PAD, BLOCK_C) of a whole output row."""
    return triton.next_power_of_2(r * r), triton.next_power_of_2(c)


def _tile_warps(elements: int) -> int:
    """Forward: about 8 values per thread per tile (128-bit bf16 accesses), 4..16 warps."""
    return min(16, max(4, elements // 256))


def _tile_warps_bwd(elements: int) -> int:
    """Backward: 16 values per thread per tile, at most 8 warps, so that two or more programs share
    an SM and one's row reductions overlap another's loads."""
    return min(8, max(4, elements // 512))


def _ln_block_c(c: int) -> int:
    """Channel block of the LayerNorm kernels: up to 1024, the tail of C masked.

    At 4 warps a 1024 block gives each thread 8 contiguous values (128-bit accesses for bf16); a
    block that had to divide C (128 for ViT-6B's 3200) would leave one value per thread.
    """
    return min(triton.next_power_of_2(c), 1024)


def _num_programs(rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        return min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(rows, 4)


class PixelShuffleLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                r: int, v2: bool) -> torch.Tensor:
        if x.stride(-1) != 1:
            x = x.contiguous()
        weight = weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        n, a, b, c = x.shape
        rows = n * (a // r) * (b // r)
        y = _alloc.empty(_out_shape(x.shape, r, v2), x.dtype, x.device)
        mean = _alloc.empty((rows,), torch.float32, x.device)
        rstd = _alloc.empty((rows,), torch.float32, x.device)
        rr_pad, block_c = _tile_shape(r, c)
        if rows and rr_pad * block_c <= FWD_TILE_MAX:
            _shuffle_ln_fwd_tile_kernel[(rows,)](x, y, weight, bias if bias is not None else weight, mean, rstd,
                                                 a // r, b // r, c, x.stride(0), x.stride(1), x.stride(2), eps,
                                                 R=r, V2=v2, HAS_BIAS=bias is not None, RR_PAD=rr_pad,
                                                 BLOCK_C=block_c, num_warps=_tile_warps(rr_pad * block_c))
        elif rows:
            _shuffle_ln_fwd_kernel[(rows,)](x, y, weight, bias if bias is not None else weight, mean, rstd,
                                            a // r, b // r, c, x.stride(0), x.stride(1), x.stride(2), eps,
                                            R=r, V2=v2, HAS_BIAS=bias is not None, BLOCK_C=_ln_block_c(c),
                                            num_warps=4)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.r, ctx.v2, ctx.has_bias, ctx.bias_dtype = r, v2, bias is not None, None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        r, v2 = ctx.r, ctx.v2
        gy = gy.contiguous()
        n, a, b, c = x.shape
        rows, d = mean.numel(), c * r * r
        dx = _alloc.empty(x.shape, x.dtype, x.device)
        progs = max(1, _num_programs(rows, x.device))
        rr_pad, block_c = _tile_shape(r, c)
        if rows and rr_pad * block_c <= BWD_TILE_MAX:
            dw = _alloc.empty((progs, d), torch.float32, x.device)
            db = _alloc.empty((progs, d), torch.float32, x.device)
            _shuffle_ln_bwd_tile_kernel[(progs,)](x, gy, dx, weight, mean, rstd, dw, db, rows, a // r, b // r, c,
                                                  x.stride(0), x.stride(1), x.stride(2),
                                                  dx.stride(0), dx.stride(1), dx.stride(2),
                                                  R=r, V2=v2, RR_PAD=rr_pad, BLOCK_C=block_c,
                                                  num_warps=_tile_warps_bwd(rr_pad * block_c))
            dweight = dw.sum(0).to(weight.dtype)
            dbias = db.sum(0).to(ctx.bias_dtype) if ctx.has_bias else None
            return dx, dweight, dbias, None, None, None
        per = triton.cdiv(max(rows, 1), progs)
        progs = triton.cdiv(max(rows, 1), per)
        dw = torch.zeros((progs, d), dtype=torch.float32, device=x.device)
        db = torch.zeros((progs, d), dtype=torch.float32, device=x.device)
        if rows:
            _shuffle_ln_bwd_kernel[(progs,)](x, gy, dx, weight, mean, rstd, dw, db, rows, per, a // r, b // r, c,
                                             x.stride(0), x.stride(1), x.stride(2),
                                             dx.stride(0), dx.stride(1), dx.stride(2),
                                             R=r, V2=v2, BLOCK_C=_ln_block_c(c), num_warps=4)
        dweight = dw.sum(0).to(weight.dtype)
        dbias = db.sum(0).to(ctx.bias_dtype) if ctx.has_bias else None
        return dx, dweight, dbias, None, None, None


def pixel_shuffle_layernorm_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                                   scale: float, version: str) -> torch.Tensor:
    return PixelShuffleLayerNorm.apply(x, weight, bias, float(eps), round(1.0 / scale), version == "v2")
