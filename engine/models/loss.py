"""Loss on text tokens only, with InternVL's per-token weights.

For a sub-sample with x supervised targets each of its tokens gets w = 1 (token), 1/x (sample)
or 1/sqrt(x) (square). loss = sum(w * ce) / sum(w); the caller may reduce sum(w) across
data-parallel ranks so the loss does not depend on how samples were split.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from engine.data.batch import IGNORE_INDEX, token_weight


def loss_weights(targets: torch.Tensor, cu_seqlens: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-token weights ``like(targets)`` (float32) for packed ``targets`` ``[B, S]``."""
    flat = targets.reshape(-1)
    w = torch.zeros(flat.shape, dtype=torch.float32)
    valid = flat != IGNORE_INDEX
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        n = int(valid[a:b].sum())
        if n:
            w[a:b] = valid[a:b].float() * token_weight(n, mode)
    return w.view_as(targets)


def weighted_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: (sum(w * ce), sum(w)) over ``[..., vocab]`` logits. Ignored targets count 0."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    t = targets.reshape(-1)
    w = weights.reshape(-1).float() * (t != IGNORE_INDEX)
    ce = F.cross_entropy(logits, t.clamp(min=0), reduction="none")
    return (w * ce).sum(), w.sum()
