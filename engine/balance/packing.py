"""Packing samples into rows of at most ``capacity`` tokens.

Attention stays inside each sample, so a row's cost (``CostModel.row_cost``) does not depend on which
samples share it; packing only decides the number of rows. First-fit decreasing uses at most
``11/9 OPT + 6/9`` rows; next-fit (in order) is what a loader without look-ahead does.
"""

from __future__ import annotations

from typing import Sequence


def _check(tokens: Sequence[int], items: Sequence[int], capacity: int) -> None:
    if capacity < 1:
        raise ValueError(f"capacity={capacity} must be >= 1")
    for i in items:
        if tokens[i] > capacity:
            raise ValueError(f"sample {i} has {tokens[i]} tokens, above the row capacity {capacity}")


def pack_first_fit_decreasing(items: Sequence[int], tokens: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows (lists of sample indices, ascending) packing ``items`` by first-fit decreasing token count."""
    _check(tokens, items, capacity)
    order = sorted(items, key=lambda i: (-tokens[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        t = tokens[i]
        for r, f in enumerate(free):
            if t <= f:
                rows[r].append(i)
                free[r] = f - t
                break
        else:
            rows.append([i])
            free.append(capacity - t)
    for row in rows:
        row.sort()
    return rows


def pack_next_fit(items: Sequence[int], tokens: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows packing ``items`` in the given order, opening a new row when the next one does not fit."""
    _check(tokens, items, capacity)
    rows: list[list[int]] = []
    used = capacity
    for i in items:
        t = tokens[i]
        if used + t > capacity:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += t
    return rows
