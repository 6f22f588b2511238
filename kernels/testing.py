"""Test support: poison every Triton output buffer before the kernel runs."""

from __future__ import annotations

import contextlib
from typing import Iterator

from kernels import _alloc


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Inside this context Triton outputs start as NaN, so unwritten elements show up."""
    old = _alloc._POISON[0]
    _alloc._POISON[0] = True
    try:
        yield
    finally:
        _alloc._POISON[0] = old
