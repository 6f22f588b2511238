"""Communication as autograd functions (Megatron "mappings"), each over an explicit process group.

Hidden states are ``[B, S, C]``: the token dimension is 1, the feature dimension is last.
A ``group`` of None means a group of one rank: every mapping is then the identity.

Name                          forward                        backward
copy_to_region                identity                       all-reduce
reduce_from_region            all-reduce                     identity
scatter_to_region             keep own slice (last dim)      all-gather (last dim)
gather_from_region            all-gather (last dim)          keep own slice
scatter_to_sequence           keep own slice (tokens)        all-gather (tokens)
split_to_sequence             keep own slice (tokens)        own slice, zeros elsewhere
gather_from_sequence          all-gather (tokens)            reduce-scatter, or keep own slice
reduce_scatter_to_sequence    reduce-scatter (tokens)        all-gather (tokens)
all_to_all                    split one dim, gather another  the reverse exchange
all_reduce_stat               all-reduce                     all-reduce

Gloo on CPU implements all_reduce, all_gather, reduce_scatter and all_to_all, so no collective
is emulated here.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

Group = Optional[dist.ProcessGroup]


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


# ----------------------------------------------------------------------------- raw collectives


def all_reduce_sum(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum over the group, outside autograd (a new tensor)."""
    y = x.contiguous().clone()
    dist.all_reduce(y, group=group)
    return y


def _split(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    n = group_size(group)
    if x.shape[dim] % n:
        raise ValueError(f"cannot split dimension {dim} of size {x.shape[dim]} over {n} ranks")
    return x.chunk(n, dim)[group_rank(group)].contiguous()


def _gather(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim)


def _reduce_scatter(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    n = group_size(group)
    if x.shape[dim] % n:
        raise ValueError(f"cannot reduce-scatter dimension {dim} of size {x.shape[dim]} over {n} ranks")
    parts = [p.contiguous() for p in x.chunk(n, dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


def _pad_to_full(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """Own slice of a zero tensor ``group_size`` times longer along ``dim``."""
    parts = [torch.zeros_like(x) for _ in range(group_size(group))]
    parts[group_rank(group)] = x
    return torch.cat(parts, dim)


def _all_to_all(x: torch.Tensor, group: Group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    n = group_size(group)
    if x.shape[scatter_dim] % n:
        raise ValueError(f"all-to-all: dimension {scatter_dim} of size {x.shape[scatter_dim]} "
                         f"does not split over {n} ranks")
    send = [p.contiguous() for p in x.chunk(n, scatter_dim)]
    recv = [torch.empty_like(send[0]) for _ in range(n)]
    dist.all_to_all(recv, send, group=group)
    return torch.cat(recv, gather_dim)


# ----------------------------------------------------------------------------- autograd functions


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return all_reduce_sum(g, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, group, -1)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.group, -1), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, group, -1)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.group, -1), None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, zero_grad_elsewhere):
        ctx.group, ctx.dim, ctx.zero = group, dim, zero_grad_elsewhere
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        full = _pad_to_full(g, ctx.group, ctx.dim) if ctx.zero else _gather(g, ctx.group, ctx.dim)
        return full, None, None, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, reduce_grads):
        ctx.group, ctx.dim, ctx.reduce = group, dim, reduce_grads
        return _gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        out = _reduce_scatter(g, ctx.group, ctx.dim) if ctx.reduce else _split(g, ctx.group, ctx.dim)
        return out, None, None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.group, ctx.dim), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, g):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(g, ctx.group, gather_dim, scatter_dim), None, None, None


class _AllReduceStat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx, g):
        # Every rank's output is the global sum, so d(sum of all ranks' losses)/d(local term)
        # is the sum of the upstream gradients of all ranks.
        return all_reduce_sum(g, ctx.group), None


# ----------------------------------------------------------------------------- public functions


def copy_to_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Enter a tensor-parallel region: identity forward, all-reduce of the gradient."""
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum partial results of the ranks: all-reduce forward, identity backward."""
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Keep this rank's slice of the last dimension."""
    return x if group_size(group) == 1 else _ScatterToRegion.apply(x, group)


def gather_from_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Concatenate the ranks' slices along the last dimension."""
    return x if group_size(group) == 1 else _GatherFromRegion.apply(x, group)


def scatter_to_sequence(x: torch.Tensor, group: Group, dim: int = 1) -> torch.Tensor:
    """Keep this rank's token slice; the gradient is all-gathered, so every rank receives the
    gradient of the whole input (use where the input is computed identically on all ranks and
    its consumers expect the full gradient)."""
    return x if group_size(group) == 1 else _ScatterToSequence.apply(x, group, dim, False)


def split_to_sequence(x: torch.Tensor, group: Group, dim: int = 1) -> torch.Tensor:
    """Keep this rank's token slice; the gradient is this rank's slice with zeros elsewhere, so
    parameters upstream get partial gradients to be summed over ``group``."""
    return x if group_size(group) == 1 else _ScatterToSequence.apply(x, group, dim, True)


def gather_from_sequence(x: torch.Tensor, group: Group, dim: int = 1, reduce_grads: bool = True) -> torch.Tensor:
    """All-gather the token slices. Backward: reduce-scatter (the consumers' gradients are
    partial per rank, as in a tensor-parallel region) or, with ``reduce_grads=False``, keep the
    own slice (the consumers computed the same gradient on every rank)."""
    return x if group_size(group) == 1 else _GatherFromSequence.apply(x, group, dim, reduce_grads)


def reduce_scatter_to_sequence(x: torch.Tensor, group: Group, dim: int = 1) -> torch.Tensor:
    """Sum partial results and keep this rank's token slice; backward all-gathers."""
    return x if group_size(group) == 1 else _ReduceScatterToSequence.apply(x, group, dim)


def all_to_all(x: torch.Tensor, group: Group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``scatter_dim`` over the ranks and concatenate what arrives along ``gather_dim``
    (rank order). Its gradient is the reverse exchange."""
    return x if group_size(group) == 1 else _AllToAll.apply(x, group, scatter_dim, gather_dim)


def all_reduce_stat(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum a statistic (e.g. a sum of squares over a sharded dimension) over the ranks; the
    gradient is summed too, since every rank's output depends on every rank's input."""
    return x if group_size(group) == 1 else _AllReduceStat.apply(x, group)
