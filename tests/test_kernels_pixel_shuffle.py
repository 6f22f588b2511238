"""Pixel shuffle (and shuffle + LayerNorm) kernels vs InternVL's view/permute reference."""

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



def test_element_map_v2_and_v1():
    """The facts-file map: v2 out[n, p, j, q*2C + k*C + c] = x[n, 2p+q, 2j+k, c]; v1 swaps p and j."""
    n, a, b, c = 2, 4, 6, 3
    x = torch.arange(n * a * b * c, dtype=torch.float32).view(n, a, b, c)
    for mode in ("reference", "triton" if DEVICE == "cpu" else "auto"):
        v2 = kernels.pixel_shuffle(x.to(DEVICE), 0.5, "v2", mode=mode).cpu()
        v1 = kernels.pixel_shuffle(x.to(DEVICE), 0.5, "v1", mode=mode).cpu()
        assert v2.shape == (n, a // 2, b // 2, 4 * c) and v1.shape == (n, b // 2, a // 2, 4 * c)
        for p in range(a // 2):
            for j in range(b // 2):
                for q in range(2):
                    for k in range(2):
                        want = x[:, 2 * p + q, 2 * j + k, :]
                        assert torch.equal(v2[:, p, j, q * 2 * c + k * c: q * 2 * c + (k + 1) * c], want)
                        assert torch.equal(v1[:, j, p, q * 2 * c + k * c: q * 2 * c + (k + 1) * c], want)


@pytest.mark.parametrize("version", ["v2", "v1"])
@pytest.mark.parametrize("shape,scale", [((3, 6, 4, 5), 0.5), ((2, 4, 8, 130), 0.5), ((1, 6, 3, 7), 1 / 3),
                                         ((2, 2, 2, 9), 1.0)])
def test_pixel_shuffle_matches_reference(seed, shape, scale, version):
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    with poison_outputs():
        y = kernels.pixel_shuffle(x, scale, version, mode="triton")
        g = torch.randn_like(y)
        gx, = torch.autograd.grad(y, x, g)
    yr = reference.pixel_shuffle_ref(x, scale, version)
    gr, = torch.autograd.grad(yr, x, g)
    assert torch.equal(y, yr)
    assert torch.equal(gx, gr)


def test_pixel_shuffle_strided_input(seed):
    """ViT output without its CLS token: a non-contiguous [N, 32, 32, C]-style view."""
    n, side, c = 2, 4, 6
    vit = torch.randn(n, 1 + side * side, c, device=DEVICE, requires_grad=True)
    x = vit[:, 1:].reshape(n, side, side, c)
    assert not x.is_contiguous()
    with poison_outputs():
        y = kernels.pixel_shuffle(x, mode="triton")
        g = torch.randn_like(y)
        gv, = torch.autograd.grad(y, vit, g)
    yr = reference.pixel_shuffle_ref(x)
    gr, = torch.autograd.grad(yr, vit, g)
    assert torch.equal(y, yr) and torch.equal(gv, gr)
    assert torch.equal(gv[:, 0], torch.zeros_like(gv[:, 0]))


@pytest.mark.parametrize("version", ["v2", "v1"])
@pytest.mark.parametrize("shape,bias", [((3, 6, 4, 5), True), ((1, 2, 4, 130), True), ((2, 4, 2, 3), False)])
def test_pixel_shuffle_layernorm_matches_reference(seed, shape, bias, version):
    x = (torch.randn(shape, device=DEVICE) * 2 + 3).requires_grad_()
    d = shape[-1] * 4
    w = torch.randn(d, device=DEVICE, requires_grad=True)
    b = torch.randn(d, device=DEVICE, requires_grad=True) if bias else None
    params = (x, w, b) if bias else (x, w)
    with poison_outputs():
        y = kernels.pixel_shuffle_layernorm(x, w, b, 1e-5, 0.5, version, mode="triton")
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, params, g)
    yr = reference.pixel_shuffle_layernorm_ref(x, w, b, 1e-5, 0.5, version)
    grads_r = torch.autograd.grad(yr, params, g)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    for a, r in zip(grads, grads_r):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    # the reference is LayerNorm applied after the plain shuffle
    torch.testing.assert_close(yr, torch.nn.functional.layer_norm(reference.pixel_shuffle_ref(x, 0.5, version), (d,),
                                                                  w, b, 1e-5))


@pytest.mark.parametrize("path", ["whole_row", "chunked_backward", "chunked"])
def test_pixel_shuffle_layernorm_kernel_paths(seed, monkeypatch, path):
    """Rows read whole into registers, and the channel-chunked kernels wide rows fall back to."""
    import kernels._triton.pixel_shuffle as ps

    if path in ("chunked_backward", "chunked"):
        monkeypatch.setattr(ps, "BWD_TILE_MAX", 0)
    if path == "chunked":
        monkeypatch.setattr(ps, "FWD_TILE_MAX", 0)
    x = (torch.randn(2, 4, 6, 9, device=DEVICE) * 3 - 1).requires_grad_()
    w = torch.randn(36, device=DEVICE, requires_grad=True)
    b = torch.randn(36, device=DEVICE, requires_grad=True)
    with poison_outputs():
        y = kernels.pixel_shuffle_layernorm(x, w, b, 1e-5, 0.5, "v2", mode="triton")
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w, b), g)
    yr = reference.pixel_shuffle_layernorm_ref(x, w, b, 1e-5, 0.5, "v2")
    grads_r = torch.autograd.grad(yr, (x, w, b), g)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    for a, r in zip(grads, grads_r):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_pixel_shuffle_errors():
    x = torch.randn(2, 5, 4, 3)
    with pytest.raises(ValueError, match="spatial size 5x4"):
        kernels.pixel_shuffle(x)
    with pytest.raises(ValueError, match="version 'v3'"):
        kernels.pixel_shuffle(torch.randn(2, 4, 4, 3), version="v3")
    with pytest.raises(ValueError, match="scale 0.4"):
        kernels.pixel_shuffle(torch.randn(2, 4, 4, 3), scale=0.4)
    with pytest.raises(ValueError, match=r"must be \[N, H, W, C\]"):
        kernels.pixel_shuffle(torch.randn(4, 4, 3))
    with pytest.raises(ValueError, match=r"weight shape \(12,\) must be \(24,\)"):
        kernels.pixel_shuffle_layernorm(torch.randn(1, 4, 4, 6), torch.ones(12), None)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("c", [1024, 3200])
def test_pixel_shuffle_gpu(seed, dtype, c):
    x = torch.randn(3, 32, 32, c, device="cuda", dtype=dtype, requires_grad=True)
    with poison_outputs():
        y = kernels.pixel_shuffle(x, mode="triton")
        g = torch.randn_like(y)
        gx, = torch.autograd.grad(y, x, g)
    yr = reference.pixel_shuffle_ref(x)
    gr, = torch.autograd.grad(yr, x, g)
    assert torch.equal(y, yr) and torch.equal(gx, gr)
    w = torch.randn(4 * c, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(4 * c, device="cuda", dtype=dtype, requires_grad=True)
    with poison_outputs():
        y = kernels.pixel_shuffle_layernorm(x, w, b, mode="triton")
        grads = torch.autograd.grad(y, (x, w, b), g)
    yr = reference.pixel_shuffle_layernorm_ref(x, w, b)
    grads_r = torch.autograd.grad(yr, (x, w, b), g)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, yr, **tol)
    torch.testing.assert_close(grads[0], grads_r[0], **tol)
    # weight/bias grads sum over 3*256 rows
    torch.testing.assert_close(grads[1].float(), grads_r[1].float(), rtol=tol["rtol"], atol=tol["atol"] * 30)
    torch.testing.assert_close(grads[2].float(), grads_r[2].float(), rtol=tol["rtol"], atol=tol["atol"] * 30)
