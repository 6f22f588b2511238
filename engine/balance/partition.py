"""Multiway number partitioning: LPT greedy and move/swap local search on the heaviest bin."""

from __future__ import annotations

import heapq

import numpy as np

DENSE_PAIRS = 8192  # below this many (heaviest bin x other) item pairs, all swaps are tried at once


def lpt(costs: np.ndarray, bins: int, order: np.ndarray, min_count: int = 0) -> np.ndarray:
    """Longest-processing-time-first: items in ``order`` (heaviest first) go to the lightest bin.

    Every bin receives at least ``min_count`` items: once the remaining items are just enough to
    fill the bins still short, they go to the lightest of those. Returns the bin of each item.
    """
    n = len(costs)
    if n < bins * min_count:
        raise ValueError(f"{n} items cannot give each of {bins} bins {min_count} items")
    out = np.empty(n, dtype=np.int64)
    counts = [0] * bins
    heap = [(0.0, b) for b in range(bins)]
    need = bins * min_count
    c = costs.tolist()
    order_l = order.tolist()
    for k, i in enumerate(order_l):
        if n - k == need:  # the rest must fill the bins still short
            short = [(load, b) for load, b in heap if counts[b] < min_count]
            heapq.heapify(short)
            for i2 in order_l[k:]:
                load, b = heapq.heappop(short)
                out[i2] = b
                counts[b] += 1
                if counts[b] < min_count:
                    heapq.heappush(short, (load + c[i2], b))
            break
        load, b = heap[0]
        out[i] = b
        if counts[b] < min_count:
            need -= 1
        counts[b] += 1
        heapq.heapreplace(heap, (load + c[i], b))
    return out


def refine(costs: np.ndarray, assign: np.ndarray, bins: int, min_count: int = 0, max_iters: int = 64,
           tol: float = 1e-3, partners: int = 8) -> np.ndarray:
    """Lower the heaviest bin by moving one of its items, or swapping one with a lighter item, elsewhere.

    Each iteration takes the best move/swap between the heaviest bin and another bin (the one leaving the
    smaller heavier-of-the-two); stops when none improves, when the heaviest bin is within ``tol`` of the
    mean, or after ``max_iters``. Bins keep at least ``min_count`` items. For few items all pairs are
    tried; otherwise only the ``partners`` lightest bins, where for bin ``t`` the ideal difference is
    ``(top - load_t) / 2`` and the nearest pairs are found by binary search over its sorted costs.
    """
    assign = assign.copy()
    loads = np.bincount(assign, weights=costs, minlength=bins)
    counts = np.bincount(assign, minlength=bins)
    mean = loads.sum() / bins
    by_cost = np.argsort(costs, kind="stable")
    for _ in range(max_iters):
        b = int(np.argmax(loads))
        top = float(loads[b])
        if top <= mean * (1 + tol):
            break
        lighter = [int(t) for t in np.argsort(loads, kind="stable")[:partners + 1] if t != b][:partners]
        if counts[b] * (costs.size - counts[b]) <= DENSE_PAIRS:
            best = _best_dense(costs, assign, loads, b, top)
        else:
            best = _best_sorted(costs, assign, loads, counts, by_cost, b, top, lighter)
        if counts[b] > min_count:  # move: to the lightest bin is best
            mine = np.flatnonzero(assign == b)
            t = lighter[0]
            val = np.maximum(top - costs[mine], loads[t] + costs[mine])
            k = int(val.argmin())
            if val[k] < best[0]:
                best = (float(val[k]), int(mine[k]), t, -1)
        if best[1] < 0:
            break
        _, i, t, j = best
        assign[i] = t
        loads[b] -= costs[i]
        loads[t] += costs[i]
        if j < 0:
            counts[b] -= 1
            counts[t] += 1
        else:
            assign[j] = b
            loads[b] += costs[j]
            loads[t] -= costs[j]
    return assign


Move = tuple[float, int, int, int]  # (heavier bin afterwards, item, to bin, swapped item or -1)


def _best_dense(costs: np.ndarray, assign: np.ndarray, loads: np.ndarray, b: int, top: float) -> Move:
    """Best swap of an item of bin ``b`` with any lighter item of another bin."""
    mine = np.flatnonzero(assign == b)
    theirs = np.flatnonzero(assign != b)
    if theirs.size == 0:
        return (top * (1 - 1e-12), -1, -1, -1)
    d = costs[mine][:, None] - costs[theirs][None, :]
    val = np.where(d > 0, np.maximum(top - d, loads[assign[theirs]][None, :] + d), np.inf)
    k = int(val.argmin())
    i, j = divmod(k, theirs.size)
    if val.flat[k] < top * (1 - 1e-12):
        return (float(val.flat[k]), int(mine[i]), int(assign[theirs[j]]), int(theirs[j]))
    return (top * (1 - 1e-12), -1, -1, -1)


def _best_sorted(costs: np.ndarray, assign: np.ndarray, loads: np.ndarray, counts: np.ndarray,
                 by_cost: np.ndarray, b: int, top: float, lighter: list[int]) -> Move:
    """Best swap of an item of bin ``b`` with an item of one of the ``lighter`` bins (binary search)."""
    grouped = by_cost[np.argsort(assign[by_cost], kind="stable")]  # by bin, then by cost
    ends = np.cumsum(counts)
    starts = ends - counts
    mine = grouped[starts[b]:ends[b]]
    x = costs[mine]
    best: Move = (top * (1 - 1e-12), -1, -1, -1)
    for t in lighter:
        theirs = grouped[starts[t]:ends[t]]
        if theirs.size == 0:
            continue
        y = costs[theirs]
        pos = np.searchsorted(y, x - (top - loads[t]) / 2)
        p = np.concatenate([np.maximum(pos - 1, 0), np.minimum(pos, y.size - 1)])
        d = np.concatenate([x, x]) - y[p]
        val = np.where(d > 0, np.maximum(top - d, loads[t] + d), np.inf)
        k = int(val.argmin())
        if val[k] < best[0]:
            best = (float(val[k]), int(mine[k % x.size]), t, int(theirs[p[k]]))
    return best
