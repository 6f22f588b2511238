"""Tensor parallelism: column/row-parallel linears, vocab-parallel embedding and cross entropy.

Every layer is built from the full single-process module: each rank keeps its shard, described
by a ``ShardInfo`` stored on the parameter (``param.shard_info``), from which the full tensor can
be gathered again (``gather_full``) for comparison, export or resharding.

Why not megatron-core's ColumnParallelLinear/RowParallelLinear: they run on CPU gloo with an
explicit ``tp_group`` only without sequence parallelism. Their sequence-parallel path reads
megatron's global memory buffer (global parallel state), allocates gradients on
``torch.cuda.current_device()`` and gathers along dim 0 of an ``[S, B, H]`` layout, while this
model is ``[B, S, C]``. They also return ``(output, bias)`` tuples where the model calls plain
linears. Its ``vocab_parallel_cross_entropy`` reads the global tensor-parallel group and has no
padded-vocabulary mask. The pieces here are small and use ``mappings`` with explicit groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.data.batch import IGNORE_INDEX
from engine.parallel.mappings import (Group, all_reduce_sum, copy_to_region, gather_from_sequence, group_rank,
                                      group_size, reduce_from_region, reduce_scatter_to_sequence)


@dataclass(frozen=True)
class ShardInfo:
    """How a local parameter relates to the full single-process one.

    ``dim`` is split over the grid's tp ranks (None: replicated over tp). Along ``dim`` the full
    tensor of size ``full`` is zero-padded at the end to ``padded`` and cut into
    ``tp // replicas`` equal shards; ``replicas`` consecutive tp ranks hold the same shard (GQA kv
    heads when kv_heads < tp). ``grad_sum`` names the grid group ("tp", "hp" or "tp_hp") over
    which each rank's gradient is a partial sum (model-parallel part only, data parallelism aside).
    """

    grid: str = "llm"
    dim: Optional[int] = None
    full: int = 0
    padded: int = 0
    replicas: int = 1
    grad_sum: Optional[str] = None

    def local_range(self, tp_rank: int, tp: int) -> tuple[int, int]:
        size = self.padded // (tp // self.replicas)
        start = (tp_rank // self.replicas) * size
        return start, start + size


def shard_tensor(full: torch.Tensor, info: ShardInfo, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's shard of ``full`` (zero padding included)."""
    if info.dim is None:
        return full.detach().clone()
    if full.shape[info.dim] != info.full:
        raise ValueError(f"tensor of shape {tuple(full.shape)} has {full.shape[info.dim]} entries along "
                         f"dim {info.dim}, shard info expects {info.full}")
    pad = [0, 0] * (full.dim() - 1 - info.dim) + [0, info.padded - info.full]
    padded = F.pad(full.detach(), pad)
    a, b = info.local_range(tp_rank, tp)
    return padded.narrow(info.dim, a, b - a).clone()


def gather_full(local: torch.Tensor, info: ShardInfo, tp_group: Group) -> torch.Tensor:
    """Inverse of ``shard_tensor``: all-gather over tp, drop replicas and padding."""
    if info.dim is None:
        return local.detach().clone()
    parts = [torch.empty_like(local) for _ in range(group_size(tp_group))]
    torch.distributed.all_gather(parts, local.detach().contiguous(), group=tp_group)
    return torch.cat(parts[:: info.replicas], info.dim).narrow(info.dim, 0, info.full).clone()


def make_param(full: torch.Tensor, info: ShardInfo, tp_group: Group) -> nn.Parameter:
    """Shard ``full`` into a parameter tagged with ``info``; gradients of zero padding are masked
    so that padded rows stay exactly zero in training."""
    tp_rank, tp = group_rank(tp_group), group_size(tp_group)
    p = nn.Parameter(shard_tensor(full, info, tp_rank, tp), requires_grad=full.requires_grad)
    p.shard_info = info  # type: ignore[attr-defined]
    mask_padding_grad(p, info, tp_rank, tp)
    return p


def mask_padding_grad(p: nn.Parameter, info: ShardInfo, tp_rank: int, tp: int) -> None:
    """Zero the gradient of this shard's zero-padding rows, so that they stay exactly zero."""
    if info.dim is not None and info.padded > info.full:
        a, b = info.local_range(tp_rank, tp)
        keep = (torch.arange(a, b) < info.full).to(torch.float32)
        if p.requires_grad and not bool(keep.all()):
            keep = keep.view([-1] + [1] * (p.dim() - 1 - info.dim))
            p.register_hook(lambda g, keep=keep: g * keep.to(g.device, g.dtype))


def tag(p: nn.Parameter, info: ShardInfo) -> None:
    p.shard_info = info  # type: ignore[attr-defined]


def shard_info(p: torch.Tensor) -> ShardInfo:
    return getattr(p, "shard_info", ShardInfo())


class _ReplicaGradSum(torch.autograd.Function):
    """Identity on a shard held by ``replicas`` consecutive tp ranks; its gradient is summed over
    those ranks (all-reduce over tp of a zero-filled stack holding one slot per distinct shard)."""

    @staticmethod
    def forward(ctx, w, group, replicas):
        ctx.group, ctx.replicas = group, replicas
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        slot = group_rank(ctx.group) // ctx.replicas
        stack = g.new_zeros((group_size(ctx.group) // ctx.replicas,) + g.shape)
        stack[slot] = g
        return all_reduce_sum(stack, ctx.group)[slot], None, None


class RegionEntry:
    """Forward hook on a norm whose output feeds column-parallel linears: enters the
    tensor-parallel region once for all of them (copy_to_region, or the sequence all-gather with
    sequence parallelism)."""

    def __init__(self, group: Group, sequence_parallel: bool):
        self.group, self.sp = group, sequence_parallel

    def __call__(self, module: nn.Module, inputs, out: torch.Tensor) -> torch.Tensor:
        return gather_from_sequence(out, self.group) if self.sp else copy_to_region(out, self.group)


class ColumnParallelLinear(nn.Module):
    """``y_local = x W_local^T + b_local``: output features split over tp. The input must already
    be inside the tp region (``RegionEntry`` on the producing norm) unless ``input_mode`` is
    "copy" (copy_to_region here) or "gather" (sequence all-gather here)."""

    def __init__(self, linear: nn.Linear, info: ShardInfo, group: Group, input_mode: str = "none"):
        super().__init__()
        if input_mode not in ("none", "copy", "gather"):
            raise ValueError(f"input_mode={input_mode!r} must be none, copy or gather")
        self.group, self.input_mode, self.replicas = group, input_mode, info.replicas
        self.weight = make_param(linear.weight, info, group)
        self.bias = None if linear.bias is None else make_param(linear.bias, info, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_mode == "copy":
            x = copy_to_region(x, self.group)
        elif self.input_mode == "gather":
            x = gather_from_sequence(x, self.group)
        w, b = self.weight, self.bias
        if self.replicas > 1:
            w = _ReplicaGradSum.apply(w, self.group, self.replicas)
            b = None if b is None else _ReplicaGradSum.apply(b, self.group, self.replicas)
        return F.linear(x, w, b)


class RowParallelLinear(nn.Module):
    """Input features split over tp; the partial products are summed over tp (all-reduce, or a
    reduce-scatter over tokens with sequence parallelism) and the bias is added once after."""

    def __init__(self, linear: nn.Linear, info: ShardInfo, bias_info: ShardInfo, group: Group,
                 sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sp = group, sequence_parallel
        self.weight = make_param(linear.weight, info, group)
        self.bias = None if linear.bias is None else make_param(linear.bias, bias_info, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sequence(y, self.group) if self.sp else reduce_from_region(y, self.group)
        return y if self.bias is None else y + self.bias


def padded_vocab(vocab_size: int, tp: int, multiple: int = 1) -> int:
    """Vocabulary rounded up so that each of ``tp`` shards is a multiple of ``multiple`` rows."""
    step = tp * multiple
    return -(-vocab_size // step) * step


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over tp; ``partial`` looks up the ids this rank owns (zeros for the
    others), ``forward`` sums the partial lookups over tp."""

    def __init__(self, emb: nn.Embedding, info: ShardInfo, group: Group):
        super().__init__()
        self.group = group
        self.vocab_size = info.full
        self.weight = make_param(emb.weight, info, group)
        self.vocab_start = info.local_range(group_rank(group), group_size(group))[0]

    def partial(self, ids: torch.Tensor) -> torch.Tensor:
        if bool(((ids < 0) | (ids >= self.vocab_size)).any()):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0].item()
            raise ValueError(f"token id {bad} outside the vocabulary of {self.vocab_size}")
        local = ids - self.vocab_start
        owned = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return out * owned.unsqueeze(-1).to(out.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return reduce_from_region(self.partial(ids), self.group)


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                                 vocab_size: int, group: Group) -> torch.Tensor:
    """Per-token cross entropy ``[T]`` from this rank's logits ``[T, V_local]`` (targets in the
    vocabulary); every tp rank gets the same values (``kernels.reference.vocab_parallel_cross_entropy``)."""
    from kernels.reference import vocab_parallel_cross_entropy as ce

    n_real = max(0, min(logits.shape[-1], vocab_size - vocab_start))
    return ce(logits, targets, torch.ones_like(targets, dtype=torch.bool), vocab_start, n_real, group)


class VocabParallelLoss:
    """Drop-in for ``InternVLModel.loss_fn`` with a vocab-parallel LM head:
    ``(hidden [T, H], lm_head_weight [V_local, H], targets [T], weights [T]) -> (sum(w*ce), sum(w))``,
    the fused LM head + weighted cross entropy of ``kernels`` with the tp group (``mode``: the
    ``kernels.loss`` setting: the Triton kernel on GPU, its reference on CPU). ``hidden`` must hold
    the same tokens on every tp rank (inside the tp region)."""

    def __init__(self, vocab_start: int, vocab_size: int, group: Group, mode: str = "auto"):
        self.vocab_start, self.vocab_size, self.group, self.mode = vocab_start, vocab_size, group, mode

    def __call__(self, hidden, weight, targets, weights):
        import kernels

        t = targets.reshape(-1)
        bad = (t != IGNORE_INDEX) & ((t < 0) | (t >= self.vocab_size))
        if bool(bad.any()):
            raise ValueError(f"target id {t[bad][0].item()} outside the vocabulary of {self.vocab_size}")
        if weight.dtype != hidden.dtype:  # under autocast, as F.linear would
            weight = weight.to(hidden.dtype)
        return kernels.weighted_linear_cross_entropy(hidden, weight, t, weights.reshape(-1).float(), IGNORE_INDEX,
                                                     tp_group=self.group, vocab_size=self.vocab_size, mode=self.mode)
