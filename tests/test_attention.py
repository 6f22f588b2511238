"""Attention backends: the selection order, and every backend that exists on this machine against a
per-segment reference (packed segments, causal and not, grouped-query heads without copying k/v)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from conftest import gpu
from engine.models import attention as A


def reference(q, k, v, cu_seqlens, causal):
    """Each segment of the flattened rows on its own, k/v heads repeated for their query groups."""
    B, S, H, D = q.shape
    rep = H // k.shape[2]
    qf, kf, vf = (t.reshape(B * S, t.shape[2], D).float() for t in (q, k, v))
    out = torch.zeros(B * S, H, D)
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        qs, ks, vs = qf[a:b], kf[a:b].repeat_interleave(rep, 1), vf[a:b].repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / D ** 0.5
        if causal:
            scores = scores.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        out[a:b] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs)
    return out.view(B, S, H, D)


def inputs(device="cpu", dtype=torch.float32, H=4, Hkv=2):
    g = torch.Generator().manual_seed(0)
    B, S, D = 2, 24, 16
    q, k, v = (torch.randn(B, S, h, D, generator=g).to(device, dtype) for h in (H, Hkv, Hkv))
    cu = torch.tensor([0, 5, 17, 24, 31, 48], dtype=torch.int32)  # segments inside each row of 24
    return q, k, v, cu


def run(backend, device="cpu", dtype=torch.float32, causal=True, H=4, Hkv=2):
    q, k, v, cu = inputs(device, dtype, H, Hkv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention without torch.compile warns on CPU
        got = A.attention(q, k, v, cu.to(device), causal=causal, backend=backend)
    return got.float().cpu(), reference(q.cpu(), k.cpu(), v.cpu(), cu, causal)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_cpu_backends_match_the_reference(backend, causal, heads):
    if backend == "flex" and A._flex() is None:
        pytest.skip("this torch has no FlexAttention")
    got, want = run(backend, causal=causal, H=heads[0], Hkv=heads[1])
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_plain_rows_need_no_mask_and_the_mask_is_built_once():
    assert A.block_mask(torch.tensor([0, 24, 48]), 2, 24, True, "cpu") is None
    m = A.block_mask(torch.tensor([0, 5, 24, 48]), 2, 24, True, "cpu")
    assert m.dense() is m.dense() and m.dense().shape == (2, 1, 24, 24)
    assert bool(m.dense()[0, 0, 5, 4]) is False and bool(m.dense()[0, 0, 6, 5]) is True  # segments apart


def test_selection_order(monkeypatch):
    have = {"flash": True, "varlen": True, "flex": True}
    monkeypatch.setattr(A, "_flash_varlen", lambda: object() if have["flash"] else None)
    monkeypatch.setattr(A, "_torch_varlen", lambda: object() if have["varlen"] else None)
    monkeypatch.setattr(A, "_flex", lambda: object() if have["flex"] else None)
    assert A.available_backends("cpu", torch.float32) == ["sdpa"]
    assert A.available_backends("cpu", torch.bfloat16) == ["sdpa"]
    assert A.available_backends("cuda", torch.bfloat16) == ["flash", "varlen", "flex", "sdpa"]
    assert A.available_backends("cuda", torch.float32) == ["flex", "sdpa"]  # the varlen kernels need 16 bits
    have["flash"] = False
    assert A.available_backends("cuda", torch.bfloat16)[0] == "varlen"
    have["varlen"] = have["flex"] = False
    assert A.available_backends("cuda", torch.bfloat16) == ["sdpa"]


def test_varlen_arguments_follow_the_installed_signature(monkeypatch):
    def new(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):
        pass

    def old(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False):
        pass

    for fn, want, gqa_ok in ((new, {"window_size": (-1, 0)}, True), (old, {"is_causal": True}, False)):
        monkeypatch.setattr(A, "_torch_varlen", lambda fn=fn: fn)
        A._varlen_kwargs.cache_clear()
        assert A._varlen_kwargs(True, False) == want
        assert (A._varlen_kwargs(True, True) is not None) == gqa_ok
    A._varlen_kwargs.cache_clear()


def test_the_backend_in_use_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(A, "_REPORTED", set())
    q = torch.zeros(1, 4, 2, 8)
    with caplog.at_level(logging.INFO, logger="engine.models"):
        assert A.choose_backend(q) == "sdpa" and A.choose_backend(q) == "sdpa"
    assert [r.getMessage() for r in caplog.records] == ["attention backend on cpu float32: sdpa"]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "varlen", "flex", "sdpa"])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_backends_match_the_reference(backend, causal):
    if backend not in A.available_backends("cuda", torch.bfloat16):
        pytest.skip(f"{backend} is not available on this GPU machine")
    got, want = run(backend, "cuda", torch.bfloat16, causal)
    assert torch.allclose(got, want, atol=3e-2, rtol=3e-2), (got - want).abs().max()
