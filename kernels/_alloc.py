"""Output allocation for the Triton paths.

Every buffer a Triton kernel must fully overwrite is allocated through :func:`empty`, so a
test can poison it (NaN / extreme integers) and catch elements a kernel forgot to write.
"""

from __future__ import annotations

from typing import Sequence

import torch

_POISON: list[bool] = [False]


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, or a poisoned buffer while :func:`kernels.testing.poison_outputs` is active."""
    if not _POISON[0]:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.full(tuple(shape), torch.iinfo(dtype).max, dtype=dtype, device=device)
