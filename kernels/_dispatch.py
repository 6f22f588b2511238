"""Choosing between the Triton and reference implementations."""

from __future__ import annotations

import functools
import os
from typing import Sequence

import torch

MODES = ("auto", "triton", "reference")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(name: str, mode: str, tensors: Sequence[torch.Tensor]) -> bool:
    """``auto``: Triton on CUDA tensors, reference elsewhere. ``triton`` on CPU needs TRITON_INTERPRET=1 and float32."""
    if mode not in MODES:
        raise ValueError(f"kernels.{name}: mode {mode!r} must be one of {', '.join(MODES)}")
    if mode == "reference":
        return False
    device = tensors[0].device
    if mode == "auto":
        return device.type == "cuda" and triton_available()
    if not triton_available():
        raise RuntimeError(f"kernels.{name}: mode 'triton' but triton is not installed")
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        raise ValueError(f"kernels.{name}: mode 'triton' does not support device {device}")
    if not interpreting():
        raise RuntimeError(f"kernels.{name}: mode 'triton' on CPU needs TRITON_INTERPRET=1 set before triton is imported")
    for t in tensors:
        if t.dtype != torch.float32:
            raise ValueError(f"kernels.{name}: the Triton interpreter path supports float32 only, got {t.dtype}")
    return True
