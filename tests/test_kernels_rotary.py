"""V2PE rotary kernel vs the float64-accurate reference: forward, backward, large positions."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import kernels
from kernels import reference
from conftest import DEVICE, gpu
from kernels.testing import poison_outputs



def _run_both(q, k, pos, theta=1e6, inv_freq=None):
    """(triton outputs, triton grads, reference outputs, reference grads) for random output grads."""
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    with poison_outputs():
        qo, ko = kernels.v2pe_rotary(q, k, pos, theta, inv_freq=inv_freq, mode="triton")
        gq, gk = torch.randn_like(qo), torch.randn_like(ko)
        grads = torch.autograd.grad([qo, ko], [q, k], [gq, gk])
    qr, kr = reference.v2pe_rotary_ref(q, k, pos, theta, inv_freq)
    grads_r = torch.autograd.grad([qr, kr], [q, k], [gq, gk])
    return (qo, ko), grads, (qr, kr), grads_r


@pytest.mark.parametrize("tokens,hq,hk,d", [(37, 28, 4, 16), (13, 3, 1, 80), (5, 2, 2, 8), (9, 4, 2, 96)])
def test_rotary_matches_reference(seed, tokens, hq, hk, d):
    q = torch.randn(tokens, hq, d, device=DEVICE)
    k = torch.randn(tokens, hk, d, device=DEVICE)
    # V2PE positions: fractional steps inside images, integers for text
    pos = torch.cumsum(torch.rand(tokens, device=DEVICE), 0) * 50
    out, grads, out_r, grads_r = _run_both(q, k, pos)
    for a, b in zip(out + grads, out_r + grads_r):
        assert not a.isnan().any()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)


def test_rotary_backward_is_inverse_rotation(seed):
    q = torch.randn(11, 4, 32, device=DEVICE)
    k = torch.randn(11, 2, 32, device=DEVICE)
    pos = torch.rand(11, device=DEVICE) * 1e4
    qv = q.clone().requires_grad_()
    kv = k.clone().requires_grad_()
    with poison_outputs():
        qo, ko = kernels.v2pe_rotary(qv, kv, pos, mode="triton")
        back_q, back_k = torch.autograd.grad([qo, ko], [qv, kv], [qo.detach(), ko.detach()])
    torch.testing.assert_close(back_q, q, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(back_k, k, rtol=1e-5, atol=2e-6)
    # rotation preserves the norm of each (x_i, x_{i+d/2}) pair
    torch.testing.assert_close(qo.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-5)


def _rotate_float64(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    inv = reference.rotary_inv_freq(x.shape[-1], theta, x.device)
    ang = pos.double()[:, None] * inv
    cos = torch.cat([ang, ang], -1).cos()[:, None, :]
    sin = torch.cat([ang, ang], -1).sin()[:, None, :]
    x = x.double()
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def test_rotary_large_positions_accurate(seed):
    """Positions 1e5..1e6 (fractional, float32): error ~1e-7 relative, where float32 angles give ~1e-2."""
    tokens, d, theta = 48, 128, 1e6
    q = torch.randn(tokens, 2, d, device=DEVICE)
    k = torch.randn(tokens, 1, d, device=DEVICE)
    pos = (1e5 + torch.rand(tokens, dtype=torch.float64, device=DEVICE) * 9e5)
    pos[::2] = pos[::2].floor() + torch.randint(0, 256, (tokens // 2,), device=DEVICE) / 256
    pos = pos.float()
    exact_q, exact_k = _rotate_float64(q, pos, theta), _rotate_float64(k, pos, theta)
    scale = exact_q.abs().max()
    with poison_outputs():
        qo, ko = kernels.v2pe_rotary(q, k, pos, theta, mode="triton")
    qr, kr = kernels.v2pe_rotary(q, k, pos, theta, mode="reference")
    for got, want in ((qo, exact_q), (ko, exact_k), (qr, exact_q), (kr, exact_k)):
        err = ((got.double() - want).abs().max() / scale).item()
        assert err < 1e-6, f"relative error {err:.2e} at positions up to 1e6"
    # the check is sensitive: plain float32 angles are far off at these positions
    inv32 = 1.0 / (theta ** (torch.arange(0, d, 2, device=DEVICE).float() / d))
    ang = pos[:, None] * inv32
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    x1, x2 = q.chunk(2, -1)
    naive = q * cos + torch.cat([-x2, x1], -1) * sin
    assert ((naive.double() - exact_q).abs().max() / scale).item() > 1e-3


def test_rotary_strided_inputs_and_leading_dims(seed):
    """q/k as views into a fused qkv tensor with [batch, seq] leading dims; int64 positions."""
    b, s, hq, hk, d = 2, 7, 4, 2, 16
    qkv = torch.randn(b, s, hq + 2 * hk, d, device=DEVICE)
    q, k = qkv[:, :, :hq], qkv[:, :, hq:hq + hk]
    pos = torch.randint(0, 5000, (b, s), device=DEVICE)
    out, grads, out_r, grads_r = _run_both(q, k, pos)
    assert out[0].shape == (b, s, hq, d) and out[1].shape == (b, s, hk, d)
    for a, r in zip(out + grads, out_r + grads_r):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=2e-6)


def test_rotary_inv_freq_override(seed):
    """An explicit inv_freq (e.g. transformers' float32 one) is used instead of theta."""
    d = 16
    inv = 1.0 / (1e4 ** (torch.arange(0, d, 2, device=DEVICE).float() / d))
    q = torch.randn(6, 2, d, device=DEVICE)
    k = torch.randn(6, 1, d, device=DEVICE)
    pos = torch.arange(6, device=DEVICE).float() * 3.25
    out, grads, out_r, grads_r = _run_both(q, k, pos, theta=123.0, inv_freq=inv)
    for a, r in zip(out + grads, out_r + grads_r):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=2e-6)
    ang = pos[:, None].double() * inv.double()
    want = q[:, :, 0] * ang[:, None, 0].cos().float() - q[:, :, d // 2] * ang[:, None, 0].sin().float()
    torch.testing.assert_close(out[0][:, :, 0], want, rtol=1e-5, atol=2e-6)


def test_rotary_empty_and_errors():
    q, k = torch.randn(0, 2, 8), torch.randn(0, 1, 8)
    qo, ko = kernels.v2pe_rotary(q, k, torch.zeros(0), mode="triton" if DEVICE == "cpu" else "auto")
    assert qo.shape == (0, 2, 8) and ko.shape == (0, 1, 8)
    with pytest.raises(ValueError, match="head_dim 7 must be even"):
        kernels.v2pe_rotary(torch.randn(3, 2, 7), torch.randn(3, 1, 7), torch.zeros(3))
    with pytest.raises(ValueError, match="token dims differ"):
        kernels.v2pe_rotary(torch.randn(3, 2, 8), torch.randn(4, 1, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="positions dtype torch.bfloat16"):
        kernels.v2pe_rotary(torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="inv_freq shape"):
        kernels.v2pe_rotary(torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.zeros(3), inv_freq=torch.ones(3))
    with pytest.raises(ValueError, match="mode 'fast'"):
        kernels.v2pe_rotary(torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.zeros(3), mode="fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter path")
def test_rotary_triton_on_cpu_needs_float32():
    with pytest.raises(ValueError, match="float32 only, got torch.float64"):
        kernels.v2pe_rotary(torch.randn(3, 2, 8, dtype=torch.float64), torch.randn(3, 1, 8, dtype=torch.float64),
                            torch.zeros(3), mode="triton")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hq,hk,d", [(28, 4, 128), (64, 8, 128), (16, 16, 80)])
def test_rotary_gpu(seed, dtype, hq, hk, d):
    tokens = 1023
    q = torch.randn(tokens, hq, d, device="cuda", dtype=dtype)
    k = torch.randn(tokens, hk, d, device="cuda", dtype=dtype)
    pos = torch.cumsum(torch.rand(tokens, device="cuda"), 0) * 300
    out, grads, out_r, grads_r = _run_both(q, k, pos)
    tol = dict(rtol=1e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    for a, r in zip(out + grads, out_r + grads_r):
        torch.testing.assert_close(a, r, **tol)
