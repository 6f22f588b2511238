"""Per-token cross entropy and per-sequence log-probabilities of packed batches.

A sequence's log-probability is the sum of ``log p(target)`` over its supervised targets (the
response and its end token). Logits are formed in chunks of tokens and recomputed in backward,
so no ``[tokens, vocab]`` tensor outlives its chunk. With a vocab-parallel LM head (tensor
parallelism) the cross entropy is reduced over the tp ranks.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from engine.data.batch import IGNORE_INDEX
from engine.models.attention import segment_ids
from engine.parallel.mappings import Group, reduce_from_region
from engine.parallel.tensor_parallel import VocabParallelLoss, vocab_parallel_cross_entropy
from engine.parallel.ulysses import local_slice

CHUNK_TOKENS = 4096


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, loss_fn) -> torch.Tensor:
    logits = F.linear(hidden, weight)
    if isinstance(loss_fn, VocabParallelLoss):
        return vocab_parallel_cross_entropy(logits, targets, loss_fn.vocab_start, loss_fn.vocab_size, loss_fn.group)
    return F.cross_entropy(logits.float(), targets, reduction="none")


def token_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, loss_fn=None,
                        chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """``[T]`` float32 cross entropy of ``targets`` under ``hidden [T, H] @ weight.T``; 0 where the
    target is ignored. ``loss_fn`` is the model's or the layout's (vocab-parallel when tp > 1)."""
    t = targets.reshape(-1)
    valid = t != IGNORE_INDEX
    vocab = loss_fn.vocab_size if isinstance(loss_fn, VocabParallelLoss) else weight.shape[0]
    bad = valid & ((t < 0) | (t >= vocab))
    if bool(bad.any()):
        raise ValueError(f"target id {int(t[bad][0])} outside the vocabulary of {vocab}")
    safe = t.clamp(min=0)
    parts = []
    for a in range(0, t.numel(), chunk):
        h, y = hidden[a:a + chunk], safe[a:a + chunk]
        if torch.is_grad_enabled() and t.numel() > chunk:
            parts.append(checkpoint(_chunk_ce, h, weight, y, loss_fn, use_reentrant=False))
        else:
            parts.append(_chunk_ce(h, weight, y, loss_fn))
    ce = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    return ce.float() * valid


def sequence_sums(values: torch.Tensor, cu_seqlens: torch.Tensor, full_shape: tuple[int, int],
                  hp_group: Group = None) -> torch.Tensor:
    """Per-segment sums ``[segments]`` of per-token ``values`` (this rank's hp slice of the
    ``[B, S]`` tokens, flattened); partial sums are added over ``hp_group``."""
    B, S = full_shape
    seg = local_slice(segment_ids(cu_seqlens.long().to(values.device), B, S), hp_group).reshape(-1)
    sums = values.new_zeros(int(cu_seqlens.numel()) - 1).index_add(0, seg, values.reshape(-1))
    return reduce_from_region(sums, hp_group)


def head_logps(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor, lm_weights: torch.Tensor,
               cu_seqlens: torch.Tensor, full_shape: tuple[int, int], seq_segment: torch.Tensor, loss_fn=None,
               hp_group: Group = None) -> tuple[torch.Tensor, torch.Tensor]:
    """From final-norm hidden states: ``(log-probs [sequences], sum(lm_weights * ce))``."""
    ce = token_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), lm_head_weight, targets.reshape(-1), loss_fn)
    logps = -sequence_sums(ce, cu_seqlens, full_shape, hp_group)[seq_segment]
    lm_sum = reduce_from_region((lm_weights.reshape(-1).float() * ce).sum(), hp_group)
    return logps, lm_sum
