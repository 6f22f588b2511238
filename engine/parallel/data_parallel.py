"""Data parallelism: bucketed gradient sums, a ZeRO-1 AdamW, and the global gradient norm.

The loss of a step is already divided by the global token weight, so gradients are *summed*
over the data-parallel group (never averaged). Each module is reduced over its own grid's
``dp_hp`` group: the LLM's replicas and the ViT's replicas need not be the same ranks.

ZeRO-1: the optimizer state is split across the data-parallel group. Each parameter group is
flattened into one fp32 vector, zero-padded to a multiple of the group size; rank ``i`` owns the
``i``-th contiguous slice, runs AdamW on it and all-gathers the updated slices into the
parameters. Gradients arrive already summed (the same bucketed all-reduce as without ZeRO; gloo
has no reduce-scatter of flat buffers that is cheaper), so gradient clipping sees full gradients.

With bf16 parameters (``engine.precision``) the gradients summed, clipped and stepped from are the
fp32 main grads (``grad_of``), the masters stay fp32, and the updated slices are all-gathered in
bf16 (the parameters' dtype). ``state_dict`` then carries this rank's master slices under
``"masters"`` and ``load_state_dict`` restores them exactly; in fp32 the masters are re-read from
the parameters, as they equal them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from engine.config import TrainConfig
from engine.optim import param_groups
from engine.precision import grad_of, has_masters, set_grad, zero_grads

Group = Optional[dist.ProcessGroup]


def _group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


# ----------------------------------------------------------------------------- gradient sums


def _grad_dtype(p: torch.nn.Parameter) -> torch.dtype:
    g = grad_of(p)
    return p.dtype if g is None else g.dtype


def make_buckets(params: Sequence[torch.nn.Parameter], bucket_mb: float) -> list[list[torch.nn.Parameter]]:
    """Consecutive parameters of one gradient dtype (the fp32 main grad's when there is one), at
    most ``bucket_mb`` MiB of gradients per bucket (a larger parameter gets a bucket of its own)."""
    limit = max(1, int(bucket_mb * 2**20))
    buckets: list[list[torch.nn.Parameter]] = []
    size, dtype = 0, None
    for p in params:
        g_dtype = _grad_dtype(p)
        nbytes = p.numel() * g_dtype.itemsize
        if not buckets or g_dtype != dtype or size + nbytes > limit:
            buckets.append([])
            size, dtype = 0, g_dtype
        buckets[-1].append(p)
        size += nbytes
    return buckets


class GradReducer:
    """Sums the gradients (``grad_of``) of ``params`` over ``group`` in flat buckets. Every rank of
    the group must hold the same parameter shapes in the same order; a missing gradient counts as zero."""

    def __init__(self, params: Iterable[torch.nn.Parameter], group: Group, bucket_mb: float):
        self.params = [p for p in params if p.requires_grad]
        self.group = group
        self.buckets = make_buckets(self.params, bucket_mb)

    def reduce(self) -> None:
        if _group_size(self.group) == 1:
            return
        for bucket in self.buckets:
            grads = [grad_of(p) for p in bucket]
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, bucket)])
            dist.all_reduce(flat, group=self.group)
            offset = 0
            for p in bucket:
                n = p.numel()
                set_grad(p, flat[offset:offset + n].view_as(p).clone())
                offset += n


# ----------------------------------------------------------------------------- ZeRO-1


@dataclass
class FlatShard:
    """One parameter group flattened: ``params`` in order, padded length, this rank's slice.
    Updated slices are all-gathered in the parameters' dtype (bf16 when they are bf16)."""

    params: list[torch.nn.Parameter]
    group: Group
    numel: int
    padded: int
    start: int
    end: int

    @classmethod
    def build(cls, params: list[torch.nn.Parameter], group: Group) -> "FlatShard":
        n, ranks = sum(p.numel() for p in params), _group_size(group)
        padded = math.ceil(n / ranks) * ranks
        chunk = padded // ranks
        start = _group_rank(group) * chunk
        return cls(params, group, n, padded, start, start + chunk)

    def flatten(self, tensors: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        parts = [(t if t is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                 for t, p in zip(tensors, self.params)]
        flat = torch.cat(parts) if parts else torch.zeros(0)
        return torch.nn.functional.pad(flat, (0, self.padded - self.numel))

    def owned(self, tensors: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        return self.flatten(tensors)[self.start:self.end].clone()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype parameters are communicated in: theirs when they share one, else fp32."""
        dtypes = {p.dtype for p in self.params}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's ``local`` slice cast to ``dtype``, concatenated (collective over ``group``)."""
        send = local.detach().to(self.dtype).contiguous()
        if _group_size(self.group) == 1:
            return send
        parts = [torch.empty_like(send) for _ in range(_group_size(self.group))]
        dist.all_gather(parts, send, group=self.group)
        return torch.cat(parts)

    def all_gather_into_params(self, local: torch.Tensor) -> None:
        flat = self.gather(local)
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                p.copy_(flat[offset:offset + n].view_as(p).to(p.dtype))
                offset += n


class ZeroAdamW(torch.optim.AdamW):
    """AdamW whose state covers only this rank's slice of each flattened parameter group.

    ``groups``: dicts with ``params``, ``weight_decay`` and ``dp_group`` (the group over which
    the parameters are replicated). ``param_groups`` hold one fp32 master slice each and carry
    ``lr`` as usual (so ``LambdaLR`` works); ``state_dict`` is this rank's shard (with its master
    slices under ``"masters"`` when the parameters are below fp32)."""

    def __init__(self, groups: Sequence[dict], lr: float, betas: tuple[float, float], eps: float):
        self.shards: list[FlatShard] = []
        inner = []
        for g in groups:
            params = [p for p in g["params"] if p.requires_grad]
            if not params:
                continue
            shard = FlatShard.build(params, g["dp_group"])
            master = torch.nn.Parameter(shard.owned([p.data for p in params]))
            self.shards.append(shard)
            inner.append({"params": [master], "weight_decay": g["weight_decay"]})
        if not inner:
            raise ValueError("ZeroAdamW got no trainable parameters")
        super().__init__(inner, lr=lr, betas=betas, eps=eps)

    def _masters(self) -> list[torch.nn.Parameter]:
        return [g["params"][0] for g in self.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for shard in self.shards:
            zero_grads(shard.params, set_to_none)
        super().zero_grad(set_to_none)

    @property
    def keeps_masters(self) -> bool:
        """Whether the masters hold more than the parameters (parameters below fp32)."""
        return has_masters(p for shard in self.shards for p in shard.params)

    @torch.no_grad()
    def step(self, closure=None):
        for shard, master in zip(self.shards, self._masters()):
            master.grad = shard.owned([grad_of(p) for p in shard.params])
        loss = super().step(closure)
        for shard, master in zip(self.shards, self._masters()):
            shard.all_gather_into_params(master.data)
        return loss

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.keeps_masters:
            state["masters"] = [m.detach().clone() for m in self._masters()]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads this rank's moments and hyper-parameters, and its master slices when the state
        has them (then the parameters follow the masters: collective); otherwise the masters are
        re-read from the parameters (load the model first)."""
        state_dict = dict(state_dict)
        masters = state_dict.pop("masters", None)
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for shard, master, saved in zip(self.shards, self._masters(), masters or [None] * len(self.shards),
                                            strict=True):
                if saved is None:
                    master.copy_(shard.owned([p.data for p in shard.params]))
                else:
                    master.copy_(saved)
                    shard.all_gather_into_params(master)


def build_zero_optimizer(named_groups: Sequence[tuple[Iterable[tuple[str, torch.nn.Parameter]], Group]],
                         cfg: TrainConfig) -> ZeroAdamW:
    """ZeRO-1 AdamW over several modules, each ``(named_parameters, dp_group)``; weight decay
    groups as in ``engine.optim.param_groups`` (matrices only)."""
    groups = []
    for named, dp_group in named_groups:
        for g in param_groups(named, cfg.weight_decay):
            for dtype in sorted({p.dtype for p in g["params"]}, key=str):  # one dtype per flat group (bf16 gathers)
                params = [p for p in g["params"] if p.dtype == dtype]
                groups.append({"params": params, "weight_decay": g["weight_decay"], "dp_group": dp_group})
    return ZeroAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
