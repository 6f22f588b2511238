"""Give a rank's meta-device shards their values, directly on the training device.

The model is built on the meta device (shapes only), parallelised and cut to this rank's
pipeline stage while still on meta; then each parameter receives exactly the slice the parallel
plan assigns to this rank: its initial values (``engine.models.init``: the same numbers one
process builds) or that slice of a transformers checkpoint (``train.init_from``), read without
reading the rest. Nothing but the rank's own shards and one bounded block is ever allocated.
"""

from __future__ import annotations

import logging
from typing import Mapping, Optional, Protocol

import torch
import torch.nn as nn

from engine.models.init import block_rows, fill_slice, scratch_buffer
from engine.parallel.plan import ParallelPlan, ParamPlan, local_slice

log = logging.getLogger("engine.parallel")


class SliceSource(Protocol):
    def read(self, engine_name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor: ...


def fill_local(out: torch.Tensor, p: ParamPlan, tp_rank: int, tp: int, seed: int,
               source: Optional[SliceSource] = None, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Write into ``out`` (this rank's local tensor of ``p``, padding included) its values
    (``scratch``: see ``engine.models.init.scratch_buffer``)."""
    dim, start, stop = local_slice(p, tp_rank, tp)
    real = out
    if p.info.dim is not None:
        if stop - start < out.shape[dim]:
            out.zero_()  # padded vocabulary rows / ViT zero heads
        real = out.narrow(dim, 0, stop - start)
    if stop <= start:
        return out
    if source is not None:  # in blocks along dim: no full-size temporary
        step = block_rows(p.shape, dim)
        for a in range(start, stop, step):
            b = min(a + step, stop)
            real.narrow(dim, a - start, b - a).copy_(source.read(p.name, dim, a, b, dtype=out.dtype))
    else:
        fill_slice(real, p.init, p.name, p.shape, seed, dim, start, scratch)
    return out


def is_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in model.parameters())


@torch.no_grad()
def materialize(model: nn.Module, plan: ParallelPlan, tp_coords: Mapping[str, tuple[int, int]],
                device: torch.device, seed: int, source: Optional[SliceSource] = None) -> nn.Module:
    """Replace ``model``'s meta parameters by real ones on ``device`` holding their values.
    ``tp_coords[grid]`` is this rank's ``(tp rank, tp size)`` in the ``vit`` and ``llm`` grids. Each new
    parameter keeps the old one's ``requires_grad`` and ``shard_info`` and gets its padding gradient mask."""
    from engine.parallel.tensor_parallel import mask_padding_grad, shard_info

    prefixes = {id(m): prefix for prefix, m in model.named_modules()}
    scratch = scratch_buffer()
    for module in model.modules():
        for pname, old in list(module._parameters.items()):
            if old is None or not old.is_meta:
                continue
            name = f"{prefixes[id(module)]}.{pname}".lstrip(".")
            p = plan[name]
            tp_rank, tp = tp_coords[p.grid]
            if tuple(old.shape) != p.local_shape(tp):
                raise RuntimeError(f"{name}: local shape {tuple(old.shape)} differs from the plan's {p.local_shape(tp)}")
            values = fill_local(torch.empty(old.shape, dtype=old.dtype, device=device), p, tp_rank, tp, seed, source,
                                scratch)
            new = nn.Parameter(values, requires_grad=old.requires_grad)
            if hasattr(old, "shard_info"):
                new.shard_info = old.shard_info  # type: ignore[attr-defined]
                mask_padding_grad(new, shard_info(new), tp_rank, tp)
            module._parameters[pname] = new
    return model


def materialize_for(model: nn.Module, cfg, plan: ParallelPlan, tp_coords: Mapping[str, tuple[int, int]],
                    device: torch.device) -> nn.Module:
    """``materialize`` with ``train.seed``, or the slices of ``train.init_from`` when it is set (a
    transformers ``internvl`` / ``internvl_chat`` directory; problems name the tensor and the file)."""
    from engine.config import ConfigError

    path = cfg.train.init_from
    if not path:
        return materialize(model, plan, tp_coords, device, cfg.train.seed)
    from engine.models.hf_slices import CheckpointSliceReader

    try:
        with CheckpointSliceReader(path, cfg.model, keep_open=False) as reader:
            materialize(model, plan, tp_coords, device, cfg.train.seed, reader)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ConfigError(f"train.init_from={path}: {e.args[0] if e.args else e}") from None
    log.info("initial weights: this rank's slices of %s", path)
    return model

