"""Fused LM head + weighted cross entropy vs F.linear + F.cross_entropy, single process and vocab parallel."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.distributed as dist

import kernels
from kernels import reference
from conftest import DEVICE, gpu
from dist_utils import run_distributed
from kernels.testing import poison_outputs



def _inputs(tokens: int, hidden: int, vocab_rows: int, vocab_size: int, device=DEVICE, dtype=torch.float32,
            ignore_every: int = 3):
    h = torch.randn(tokens, hidden, device=device, dtype=dtype)
    w = (torch.randn(vocab_rows, hidden, device=device) / hidden ** 0.5 * 4).to(dtype)
    w[vocab_size:] = 0  # padded rows are zero-initialised in the engine
    labels = torch.randint(0, vocab_size, (tokens,), device=device)
    labels[::ignore_every] = -100
    tw = torch.rand(tokens, device=device)
    return h, w, labels, tw


def _loss_and_grads(mode, h, w, labels, tw, scale=1.0, **kw):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    with poison_outputs():
        loss, wsum = kernels.weighted_linear_cross_entropy(h, w, labels, tw, mode=mode, **kw)
        gh, gw = torch.autograd.grad(loss * scale, (h, w))
    return loss, wsum, gh, gw


@pytest.mark.parametrize("tokens,hidden,rows,vocab,chunk", [
    (37, 16, 50, 50, 16),      # chunks not dividing the tokens
    (20, 8, 64, 61, 7),        # padded vocab: columns 61..63 must never win
    (9, 12, 5000, 4993, None),  # several vocab blocks per row, last one partial
    (6, 8, 33, 33, 100),       # one chunk larger than the input
])
def test_loss_matches_reference(seed, tokens, hidden, rows, vocab, chunk):
    h, w, labels, tw = _inputs(tokens, hidden, rows, vocab)
    kw = dict(chunk_size=chunk, vocab_size=vocab)
    loss, wsum, gh, gw = _loss_and_grads("triton", h, w, labels, tw, scale=1.7, **kw)
    loss_r, wsum_r, gh_r, gw_r = _loss_and_grads("reference", h, w, labels, tw, scale=1.7, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and wsum.dim() == 0
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wsum, wsum_r, rtol=1e-6, atol=0)
    torch.testing.assert_close(wsum, (tw * (labels != -100)).sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(gh, gh_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw_r, rtol=1e-5, atol=1e-5)
    assert torch.equal(gw[vocab:], torch.zeros_like(gw[vocab:]))


@pytest.mark.parametrize("pattern", ["none_dropped", "zero_weights", "mixed"])
def test_loss_rows_that_cannot_contribute(seed, pattern):
    """Ignored and zero-weight tokens are dropped before the GEMMs: same sums, zero hidden-grad rows."""
    tokens, hidden, vocab = 19, 8, 40
    h = torch.randn(tokens, hidden, device=DEVICE)
    w = torch.randn(vocab, hidden, device=DEVICE) / hidden ** 0.5 * 4
    labels = torch.randint(0, vocab, (tokens,), device=DEVICE)
    tw = torch.rand(tokens, device=DEVICE) + 0.1
    dropped = torch.zeros(tokens, dtype=torch.bool, device=DEVICE)
    if pattern in ("zero_weights", "mixed"):
        tw[1::4] = 0
        dropped[1::4] = True
    if pattern == "mixed":
        labels[2::5] = -100
        dropped[2::5] = True
    loss, wsum, gh, gw = _loss_and_grads("triton", h, w, labels, tw, scale=0.7, chunk_size=4)
    loss_r, wsum_r, gh_r, gw_r = _loss_and_grads("reference", h, w, labels, tw, scale=0.7)
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wsum, wsum_r, rtol=1e-6, atol=0)
    torch.testing.assert_close(gh, gh_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw_r, rtol=1e-5, atol=1e-5)
    assert torch.equal(gh[dropped], torch.zeros_like(gh[dropped]))
    assert not (gh[~dropped] == 0).all(dim=1).any()


def test_reference_is_weighted_cross_entropy(seed):
    """The reference itself: sum(w * ce) over supervised tokens, padded columns excluded."""
    h, w, labels, tw = _inputs(11, 8, 20, 17)
    loss, wsum = reference.weighted_linear_cross_entropy_ref(h, w, labels, tw, vocab_size=17)
    logits = (h @ w.t())[:, :17]
    keep = labels != -100
    ce = torch.logsumexp(logits, -1) - logits.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    torch.testing.assert_close(loss, (tw * ce)[keep].sum())
    torch.testing.assert_close(wsum, tw[keep].sum())


def test_loss_normalised_and_frozen_head(seed):
    """loss / wsum backward; a frozen lm_head gets no gradient; int32 labels."""
    h, w, labels, tw = _inputs(13, 8, 24, 24)
    labels = labels.int()
    outs = []
    for mode in ("triton", "reference"):
        hv = h.clone().requires_grad_()
        with poison_outputs():
            loss, wsum = kernels.weighted_linear_cross_entropy(hv, w, labels, tw, chunk_size=5, mode=mode)
            (loss / wsum).backward()
        assert not wsum.requires_grad
        outs.append((loss / wsum, hv.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)


def test_loss_all_ignored_and_no_grad(seed):
    h, w, labels, tw = _inputs(7, 8, 16, 16)
    loss, wsum, gh, gw = _loss_and_grads("triton", h, w, torch.full_like(labels, -100), tw)
    assert loss.item() == 0.0 and wsum.item() == 0.0
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))
    with torch.no_grad(), poison_outputs():
        loss, wsum = kernels.weighted_linear_cross_entropy(h.requires_grad_(), w, labels, tw, mode="triton")
    loss_r, wsum_r = reference.weighted_linear_cross_entropy_ref(h, w, labels, tw)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-5)


def test_loss_backward_twice_is_an_error(seed):
    h, w, labels, tw = _inputs(5, 8, 16, 16)
    h.requires_grad_()
    loss, _ = kernels.weighted_linear_cross_entropy(h, w, labels, tw, mode="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_loss_errors():
    h, w, labels, tw = _inputs(5, 8, 16, 12, device="cpu")
    bad = labels.clone()
    bad[2] = 13
    with pytest.raises(ValueError, match=r"labels\[2\] = 13 is outside \[0, 12\)"):
        kernels.weighted_linear_cross_entropy(h, w, bad, tw, vocab_size=12)
    with pytest.raises(ValueError, match="vocab_size 17 must be in"):
        kernels.weighted_linear_cross_entropy(h, w, labels, tw, vocab_size=17)
    with pytest.raises(ValueError, match=r"labels \(4,\) and token_weights \(5,\)"):
        kernels.weighted_linear_cross_entropy(h, w, labels[:4], tw)
    with pytest.raises(ValueError, match="hidden size 8 != lm_head_weight.shape"):
        kernels.weighted_linear_cross_entropy(h, w[:, :4], labels, tw)
    with pytest.raises(ValueError, match="chunk_size 0"):
        kernels.weighted_linear_cross_entropy(h, w, labels, tw, chunk_size=0)


# ----------------------------------------------------------------------------- vocab parallel (2 gloo ranks)


def _tp_worker(rank: int, world: int, seed: int) -> None:
    group = dist.new_group(list(range(world)))
    for case, (tokens, hidden, local, vocab) in enumerate([(23, 12, 40, 75), (10, 8, 24, 48), (9, 8, 20, 18)]):
        torch.manual_seed(seed + case)
        h, w, labels, tw = _inputs(tokens, hidden, local * world, vocab, device="cpu")
        loss_f, wsum_f, gh_f, gw_f = _loss_and_grads("reference", h, w, labels, tw, scale=1.3, vocab_size=vocab)
        w_local = w[rank * local:(rank + 1) * local]
        for mode in ("reference", "triton"):
            loss, wsum, gh, gw = _loss_and_grads(mode, h, w_local, labels, tw, scale=1.3, tp_group=group,
                                                 vocab_size=vocab, chunk_size=6)
            msg = f"rank {rank} case {case} mode {mode}"
            torch.testing.assert_close(loss, loss_f, rtol=1e-5, atol=1e-5, msg=msg)
            torch.testing.assert_close(wsum, wsum_f, rtol=1e-6, atol=0, msg=msg)
            torch.testing.assert_close(gw, gw_f[rank * local:(rank + 1) * local], rtol=1e-5, atol=1e-5, msg=msg)
            # the hidden gradient is a partial sum (unless the other rank holds only padding);
            # the caller all-reduces it over tp
            if vocab > local:
                assert not torch.allclose(gh, gh_f, rtol=1e-3, atol=1e-4), msg
            dist.all_reduce(gh, group=group)
            torch.testing.assert_close(gh, gh_f, rtol=1e-5, atol=1e-5, msg=msg)


def test_loss_vocab_parallel_two_ranks(seed):
    """2 gloo ranks, contiguous vocab slices (one case with a rank holding only padding) vs one process."""
    run_distributed(_tp_worker, 2, seed)


# ----------------------------------------------------------------------------- GPU


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_loss_gpu(seed, dtype):
    tokens, hidden, rows, vocab = 1500, 256, 151680, 151674
    h, w, labels, tw = _inputs(tokens, hidden, rows, vocab, device="cuda", dtype=dtype)
    kw = dict(vocab_size=vocab, chunk_size=512)
    loss, wsum, gh, gw = _loss_and_grads("triton", h, w, labels, tw, **kw)
    loss_r, wsum_r, gh_r, gw_r = _loss_and_grads("reference", h, w, labels, tw, **kw)
    if dtype == torch.float32:
        tol = dict(rtol=1e-4, atol=1e-4)
    else:  # bf16 logits from differently tiled GEMMs; weight grad accumulated over 3 chunks in bf16
        tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss, loss_r, rtol=tol["rtol"] / 10, atol=0)
    torch.testing.assert_close(wsum, wsum_r)
    torch.testing.assert_close(gh.float(), gh_r.float(), **tol)
    torch.testing.assert_close(gw.float(), gw_r.float(), **tol)
    assert torch.equal(gw[vocab:], torch.zeros_like(gw[vocab:]))
