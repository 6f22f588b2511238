"""Packing samples into rows of at most ``capacity`` tokens.

Attention stays inside each sample, so a row's cost (``CostModel.row_cost``) does not depend on which
samples share it; packing only decides the number of rows. First-fit decreasing uses at most
``11/9 OPT + 6/9`` rows; next-fit (in order) is what a loader without look-ahead does. A batch of rows
is padded to its longest row, so ``tight_rows`` lowers the capacity as far as the row count allows.
"""

from __future__ import annotations

from typing import Callable, Sequence


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


def tight_rows(lengths: Sequence[int], capacity: int,
               pack_rows: Callable[[Sequence[int], int], list[list[int]]]) -> tuple[list[list[int]], int]:
    """Rows of ``pack_rows(lengths, c)`` and ``c``: the smallest capacity ``c <= capacity`` that needs no
    more rows than ``capacity`` does. Rows are padded to the longest, so this keeps the row count and
    trims the padding (e.g. 450+150+100 tokens in two rows: 450 | 250 instead of 512 | 188)."""
    if not lengths:
        return [], capacity
    best = pack_rows(lengths, capacity)
    lo = max(max(lengths), -(-sum(lengths) // len(best)))  # no fewer rows below this
    hi = max(sum(lengths[i] for i in row) for row in best)  # invariant: ``hi`` needs at most len(best) rows
    if len(pack_rows(lengths, hi)) > len(best):
        hi = capacity
    while lo < hi:
        mid = (lo + hi) // 2
        if len(pack_rows(lengths, mid)) <= len(best):
            hi = mid
        else:
            lo = mid + 1
    return (pack_rows(lengths, hi), hi) if hi < capacity else (best, capacity)
