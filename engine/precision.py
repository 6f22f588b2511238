"""Parameter precision (``train.param_dtype``): float32, or Megatron-style bf16 with fp32 main grads.
The default, ``auto``, is bf16 on a GPU and float32 on a CPU (the path every parity test uses).

``float32`` changes nothing: fp32 parameters, ``.grad`` and AdamW state;
``train.dtype`` only picks the autocast dtype. With ``bfloat16`` (``apply_param_dtype``):
- the model's weight matrices (parameters of two or more dimensions) are stored in bf16 and used
  so in forward and backward; norm gains and biases stay fp32: a gain of ~1 in bf16 moves in steps of
  2^-8, so small updates to it never reach the forward (on the tiny preset, bf16 gains ended 11% above
  the fp32 loss after 100 steps, fp32 ones within 2%);
- every trainable bf16 parameter gets an fp32 ``main_grad`` buffer; a post-accumulate-grad hook adds
  each backward's bf16 ``.grad`` into it and frees ``.grad``, so microbatches accumulate in fp32;
- the optimizer owns fp32 master weights, steps them from the main grads and copies them back
  into the parameters (``engine.optim.MasterAdamW``; ``ZeroAdamW`` keeps master slices of its
  shard and all-gathers the updated slices in bf16).
Gradient consumers (data-parallel and model-parallel sums, the norm and clipping, ``zero_grad``)
go through ``grad_of`` / ``zero_grads``, so they read and write the main grad when there is one.
The model code never knows. ``full_state_dict`` (HF export) then holds the bf16 parameters.
Checkpoints store the masters as ``optim/master/<name>`` per parameter in global coordinates
(like the moments), so a bf16 run resumes exactly and reshards to any layout
(``engine.checkpoint.state``).
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch

log = logging.getLogger("engine.precision")

PARAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _accumulate(p: torch.Tensor) -> None:
    p.main_grad.add_(p.grad)
    p.grad = None


def resolve_param_dtype(name: str, device: torch.device) -> torch.dtype:
    """``train.param_dtype``: ``auto`` is bf16 on a GPU and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return PARAM_DTYPES[name]


def apply_param_dtype(model: torch.nn.Module, name: str, device: torch.device, announce: bool = True) -> torch.dtype:
    """Store ``model``'s floating-point parameters in ``train.param_dtype`` ``name`` (resolved for
    ``device``); below fp32, give each trainable one an fp32 ``main_grad`` and the hook that
    accumulates into it. Parameters keep their identity (and attributes such as ``shard_info``).
    Logs the mode when ``announce``; returns the dtype."""
    dtype = resolve_param_dtype(name, device)
    if dtype == torch.float32:
        if announce:
            log.info("precision: fp32 parameters, gradients and optimizer state")
        return dtype
    if announce:
        log.info("precision: %s parameters, fp32 main grads and master weights", str(dtype).replace("torch.", ""))
    for p in model.parameters():
        if not p.is_floating_point() or p.ndim < 2:
            continue  # norm gains and biases stay fp32 (their .grad accumulates in fp32)
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
        if p.requires_grad and not hasattr(p, "main_grad"):
            p.main_grad = torch.zeros_like(p, dtype=torch.float32)
            p.register_post_accumulate_grad_hook(_accumulate)
    return dtype


def autocast_for(param_dtype: torch.dtype, autocast_dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """The autocast dtype a runner uses: bf16 parameters always run under bf16 autocast (their fp32 norm
    gains and biases meet bf16 weights); fp32 ones under ``autocast_dtype`` (``train.dtype``)."""
    return autocast_dtype if param_dtype == torch.float32 else (autocast_dtype or torch.bfloat16)


def grad_of(p: torch.Tensor) -> Optional[torch.Tensor]:
    """The gradient to reduce, clip and step from: the fp32 main grad when ``p`` has one, else ``.grad``."""
    main = getattr(p, "main_grad", None)
    return main if main is not None else p.grad


def set_grad(p: torch.Tensor, value: torch.Tensor) -> None:
    """Replace the gradient ``grad_of(p)`` with ``value`` (in place for a main grad)."""
    if getattr(p, "main_grad", None) is not None:
        p.main_grad.copy_(value)
    else:
        p.grad = value


def zero_grads(params: Iterable[torch.Tensor], set_to_none: bool = True) -> None:
    """``Optimizer.zero_grad`` for ``params``: main grads are zeroed (their buffers stay), ``.grad`` freed or zeroed."""
    for p in params:
        main = getattr(p, "main_grad", None)
        if main is not None:
            main.zero_()
        if set_to_none:
            p.grad = None
        elif p.grad is not None:
            p.grad.zero_()


def has_masters(params: Iterable[torch.Tensor]) -> bool:
    """Whether an optimizer over ``params`` needs fp32 master weights (some parameter is below fp32)."""
    return any(p.is_floating_point() and p.dtype != torch.float32 for p in params)
