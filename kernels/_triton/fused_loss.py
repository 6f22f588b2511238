"""LM head + weighted cross entropy, chunked over tokens; the gradient is formed during the forward.

Per chunk of tokens: ``logits = hidden_c @ W.T`` (torch matmul into one reused buffer), then a
Triton kernel per row computes the online log-sum-exp, the weighted loss and overwrites the
logits with ``dlogits = w * (softmax - onehot)``; two more matmuls turn them into the hidden
gradient rows and add to the weight gradient. Backward only scales by the incoming gradient.
Peak extra memory: one ``[chunk, V_local]`` logits buffer plus the gradients themselves. The
weight gradient is accumulated across chunks in the weight's dtype. Tokens that cannot contribute
(label ``ignore_index`` or weight 0, e.g. image and prompt tokens) are dropped before the GEMMs;
finding them costs one host sync.

Vocab parallel: the row statistics (max, sum of exp, target logit) of each rank's vocab slice
are all-reduced over ``tp_group`` before the gradient pass. The hidden gradient returned is this
rank's partial sum ``dlogits_local @ W_local``; the caller all-reduces it over the group.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from kernels import _alloc, _checks

_NEG_BIG = tl.constexpr(-1.0e30)  # running max start: finite, so empty slices give exp(-big - m) = 0, not NaN


@triton.jit
def _row_stats(logits_ptr, row_off, VALID, V_LOCAL, BLOCK_V: tl.constexpr):
    """Online max and sum of exp over columns ``[0, VALID)`` of one row of ``V_LOCAL`` columns.

    Loads are masked by the row length (a multiple of 16 for a padded vocab, so they vectorise);
    the padding columns ``[VALID, V_LOCAL)`` are dropped afterwards.
    """
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), _NEG_BIG, tl.float32)
    s = tl.zeros((), dtype=tl.float32)
    for v0 in range(0, VALID, BLOCK_V):
        c = v0 + cols
        x = tl.load(logits_ptr + row_off + c, mask=c < V_LOCAL, other=float("-inf")).to(tl.float32)
        x = tl.where(c < VALID, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    return m, s


@triton.jit
def _ce_stats_kernel(logits_ptr, stride_row, labels_ptr, m_ptr, s_ptr, tgt_ptr, VOCAB_START, VALID, V_LOCAL,
                     ignore_index, BLOCK_V: tl.constexpr):
    """Local statistics of one row of a vocab slice: max, sum exp(x - max), target logit (0 if not here)."""
    row = tl.program_id(0).to(tl.int64)
    row_off = row * stride_row
    m, s = _row_stats(logits_ptr, row_off, VALID, V_LOCAL, BLOCK_V)
    label = tl.load(labels_ptr + row).to(tl.int64)
    local = label - VOCAB_START
    here = (label != ignore_index) & (local >= 0) & (local < VALID)
    tgt = tl.load(logits_ptr + row_off + tl.where(here, local, 0), mask=here, other=0.0).to(tl.float32)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(tgt_ptr + row, tgt)


@triton.jit
def _ce_kernel(logits_ptr, stride_row, labels_ptr, weights_ptr, lse_ptr, loss_ptr, VOCAB_START, VALID, V_LOCAL,
               ignore_index, HAS_LSE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row: (unless HAS_LSE) log-sum-exp and ``w * ce``; then (COMPUTE_GRAD) dlogits in place."""
    row = tl.program_id(0).to(tl.int64)
    row_off = row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    w = tl.where(valid, tl.load(weights_ptr + row).to(tl.float32), 0.0)
    local = label - VOCAB_START
    if HAS_LSE:
        lse = tl.load(lse_ptr + row)
    else:
        m, s = _row_stats(logits_ptr, row_off, VALID, V_LOCAL, BLOCK_V)
        lse = m + tl.log(s)
        here = valid & (local >= 0) & (local < VALID)
        tgt = tl.load(logits_ptr + row_off + tl.where(here, local, 0), mask=here, other=0.0).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, w * (lse - tgt), 0.0))
    if COMPUTE_GRAD:
        cols = tl.arange(0, BLOCK_V)
        for v0 in range(0, V_LOCAL, BLOCK_V):
            c = v0 + cols
            x = tl.load(logits_ptr + row_off + c, mask=c < V_LOCAL, other=0.0).to(tl.float32)
            p = tl.where(c < VALID, tl.exp(x - lse), 0.0)
            g = w * (p - tl.where(c == local, 1.0, 0.0))
            tl.store(logits_ptr + row_off + c, g.to(logits_ptr.dtype.element_ty), mask=c < V_LOCAL)


def default_chunk_size(tokens: int, vocab: int, hidden: int) -> int:
    """Logits chunk about twice the size of ``hidden``, at least 1024 rows (keeps the weight-grad GEMM compute-bound)."""
    return max(1024, 2 * triton.next_power_of_2(triton.cdiv(tokens * hidden, max(vocab, 1))))


def _block_v(v_local: int) -> int:
    return min(4096, triton.next_power_of_2(max(v_local, 16)))


def _chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor,
                  ignore_index: int, tp_group: Optional[dist.ProcessGroup], vocab_start: int, valid_local: int,
                  chunk: int, needs_h: bool, needs_w: bool
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``sum(w * ce)`` over the rows of contiguous ``hidden`` and, computed on the way, the gradients."""
    T, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    block_v = _block_v(V)
    loss_rows = _alloc.empty((T,), torch.float32, dev)
    grad_h = _alloc.empty((T, H), hidden.dtype, dev) if needs_h else None
    grad_w = _alloc.empty((V, H), weight.dtype, dev) if needs_w else None
    if grad_w is not None and T == 0:
        grad_w.zero_()
    buf = torch.empty((min(chunk, T), V), dtype=hidden.dtype, device=dev)
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        n = e - s
        hc = hidden[s:e]
        logits = buf[:n]
        torch.mm(hc, weight.t(), out=logits)
        lab, tw = labels[s:e], token_weights[s:e]
        if tp_group is None:
            _ce_kernel[(n,)](logits, logits.stride(0), lab, tw, loss_rows, loss_rows[s:e], vocab_start,
                             valid_local, V, ignore_index, HAS_LSE=False, COMPUTE_GRAD=needs_h or needs_w,
                             BLOCK_V=block_v, num_warps=8)
        else:
            m = _alloc.empty((n,), torch.float32, dev)
            sexp = _alloc.empty((n,), torch.float32, dev)
            tgt = _alloc.empty((n,), torch.float32, dev)
            _ce_stats_kernel[(n,)](logits, logits.stride(0), lab, m, sexp, tgt, vocab_start, valid_local, V,
                                   ignore_index, BLOCK_V=block_v, num_warps=8)
            m_global = m.clone()
            dist.all_reduce(m_global, op=dist.ReduceOp.MAX, group=tp_group)
            sums = torch.stack((sexp * torch.exp(m - m_global), tgt))
            dist.all_reduce(sums, group=tp_group)
            lse = m_global + torch.log(sums[0])
            valid = lab != ignore_index
            loss_rows[s:e] = torch.where(valid, tw.float() * (lse - sums[1]), torch.zeros_like(lse))
            if needs_h or needs_w:
                _ce_kernel[(n,)](logits, logits.stride(0), lab, tw, lse, loss_rows, vocab_start, valid_local, V,
                                 ignore_index, HAS_LSE=True, COMPUTE_GRAD=True, BLOCK_V=block_v, num_warps=8)
        if grad_h is not None:
            torch.mm(logits, weight, out=grad_h[s:e])
        if grad_w is not None:
            if s == 0:
                torch.mm(logits.t(), hc, out=grad_w)
            else:
                grad_w.addmm_(logits.t(), hc)
    return loss_rows.sum(), grad_h, grad_w


class FusedLinearWeightedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor,
                ignore_index: int, tp_group: Optional[dist.ProcessGroup], rank: int, chunk_size: Optional[int],
                vocab_size: int, grad_enabled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        needs_h = grad_enabled and ctx.needs_input_grad[0]
        needs_w = grad_enabled and ctx.needs_input_grad[1]
        weight = weight.contiguous()
        T, H = hidden.shape
        V = weight.shape[0]
        vocab_start = rank * V
        valid_local = max(0, min(V, vocab_size - vocab_start))
        supervised = labels != ignore_index
        wsum = (token_weights.float() * supervised).sum()
        # Rows that add nothing (ignored, or weight 0) skip the three GEMMs. Labels and weights are the
        # same on every tp rank, so every rank keeps the same rows and runs the same chunks.
        keep = supervised & (token_weights != 0)
        n_keep = int(keep.sum())
        idx = keep.nonzero()[:, 0] if n_keep < T else None
        if idx is None:
            h, lab, tw = hidden.contiguous(), labels.contiguous(), token_weights.contiguous()
        else:
            h, lab, tw = hidden.index_select(0, idx), labels.index_select(0, idx), token_weights.index_select(0, idx)
        chunk = chunk_size or default_chunk_size(n_keep, V, H)
        loss, grad_h, grad_w = _chunked_loss(h, weight, lab, tw, ignore_index, tp_group, vocab_start, valid_local,
                                             chunk, needs_h, needs_w)
        if grad_h is not None and idx is not None:
            grad_h = torch.zeros_like(hidden, memory_format=torch.contiguous_format).index_copy_(0, idx, grad_h)
        ctx.grads = (grad_h, grad_w)
        ctx.mark_non_differentiable(wsum)
        return loss, wsum

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_wsum: Optional[torch.Tensor]):
        if ctx.grads is None:
            raise RuntimeError("weighted_linear_cross_entropy: backward ran twice; the Triton path keeps its "
                               "gradients only for one backward")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        if grad_h is not None:
            grad_h.mul_(grad_loss)
        if grad_w is not None:
            grad_w.mul_(grad_loss)
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def weighted_linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                         token_weights: torch.Tensor, ignore_index: int,
                                         tp_group: Optional[dist.ProcessGroup], chunk_size: Optional[int],
                                         vocab_size: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    size = dist.get_world_size(tp_group) if tp_group is not None else 1
    vocab_size = _checks.check_loss(hidden, weight, labels, token_weights, ignore_index, rank, size, vocab_size)
    return FusedLinearWeightedCE.apply(hidden, weight, labels, token_weights, ignore_index, tp_group, rank,
                                       chunk_size, vocab_size, torch.is_grad_enabled())
