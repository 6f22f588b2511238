"""Modality-aware assignment of one global batch to ViT ranks and LLM data-parallel ranks.

ViT: tiles are independent, so every ViT rank gets ``floor`` or ``ceil`` of ``tiles / vit_ranks``;
tiles stay on a ViT rank of the LLM dp group that consumes them where its quota allows, and only the
surplus crosses groups (as contiguous tile ranges).

LLM: with per-sample cost ``c_i`` (``CostModel.sample_cost`` plus the sample's share of a full row's
per-row terms) a dp rank takes
``S_d + (pp - 1) * M_d`` (sum and largest of its microbatches, 1F1B). Samples are partitioned over dp
ranks by LPT plus move/swap refinement of the heaviest rank, then over each rank's microbatches the
same way, then (pipeline only) the heaviest rank trades samples with the others on that objective;
each microbatch is packed into rows by first-fit decreasing. Without a pipeline only a rank's sum
counts, so when it has at least as many rows as microbatches its samples are packed into rows first
(first-fit decreasing) and the rows, longest first, split into microbatches of equal row counts: rows
of a microbatch are padded to its longest, so similar rows together waste the least.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from engine.balance.assignment import Assignment, TileRange
from engine.balance.cost import CostModel
from engine.balance.layout import Layout, SampleShape, sample_arrays
from engine.balance.packing import pack_first_fit_decreasing, pack_next_fit
from engine.balance.partition import lpt, refine


def balance(samples: Sequence[SampleShape], layout: Layout, cost: CostModel | None = None, seed: int = 0,
            refine_iters: int = 64) -> Assignment:
    """Balanced assignment of ``samples`` (one global batch); deterministic for a given ``seed``."""
    cost = cost or CostModel()
    tiles, tokens = sample_arrays(samples, layout)
    dp, m = layout.llm_dp, layout.microbatches
    _check_count(len(samples), layout)
    c = np.asarray(cost.sample_cost(tokens), dtype=np.float64).reshape(-1)
    cap = layout.max_packed_tokens
    c = c + (cost.llm_per_row / cap + cost.llm_per_row_sq * cap) * tokens  # its share of a full row's terms
    key = np.random.default_rng(seed).random(len(c))
    order = np.lexsort((key, -c))  # heaviest first, ties in seeded random order

    dp_of = refine(c, lpt(c, dp, order, min_count=m), dp, min_count=m, max_iters=refine_iters)
    mb_of = np.empty(len(c), dtype=np.int64)
    grouped = order[np.argsort(dp_of[order], kind="stable")]
    bounds = np.concatenate([[0], np.cumsum(np.bincount(dp_of, minlength=dp))])
    tokens_l = tokens.tolist()
    llm: list[list[list[list[int]]]] = [[[] for _ in range(m)] for _ in range(dp)]
    by_rows = [False] * dp
    for d in range(dp):
        items = grouped[bounds[d]:bounds[d + 1]]  # heaviest first
        if layout.llm_pp == 1:  # only the rank's sum counts: microbatches of whole rows, little padding
            rows = pack_first_fit_decreasing(items.tolist(), tokens_l, layout.max_packed_tokens)
            if len(rows) >= m:
                llm[d] = _rows_to_microbatches(rows, tokens_l, m)
                by_rows[d] = True
                continue
        local = c[items]
        mb = refine(local, lpt(local, m, np.arange(items.size), min_count=1), m, min_count=1,
                    max_iters=refine_iters, tol=_microbatch_tol(layout))
        mb_of[items] = mb
    if layout.llm_pp > 1:
        _refine_pipeline(c, dp_of, mb_of, layout, refine_iters)

    members: list[list[list[int]]] = [[[] for _ in range(m)] for _ in range(dp)]
    for i, (d, k) in enumerate(zip(dp_of.tolist(), mb_of.tolist())):
        if not by_rows[d]:
            members[d][k].append(i)
    for d in range(dp):
        for k in range(m):
            if not by_rows[d]:
                llm[d][k] = pack_first_fit_decreasing(members[d][k], tokens_l, layout.max_packed_tokens)
    vit = _vit_balanced(llm, tiles, layout)
    return _predict("balanced", llm, vit, tiles, tokens, layout, cost)


def naive(samples: Sequence[SampleShape], layout: Layout, cost: CostModel | None = None) -> Assignment:
    """The usual split: loader order, contiguous equal sample counts per dp rank and per microbatch,
    rows packed in order; the ViT ranks on each dp group's GPUs encode its samples (whole, in order)."""
    cost = cost or CostModel()
    tiles, tokens = sample_arrays(samples, layout)
    dp, m = layout.llm_dp, layout.microbatches
    _check_count(len(samples), layout)
    tokens_l = tokens.tolist()
    llm = []
    for chunk in np.array_split(np.arange(len(samples)), dp):
        llm.append([pack_next_fit(part.tolist(), tokens_l, layout.max_packed_tokens)
                    for part in np.array_split(chunk, m)])
    serving: list[list[int]] = [[] for _ in range(dp)]  # ViT ranks with a GPU in each dp group
    for v in range(layout.vit_ranks):
        for d in sorted(layout.vit_groups(v)):
            serving[d].append(v)
    vit: list[list[TileRange]] = [[] for _ in range(layout.vit_ranks)]
    for d, ranks in enumerate(serving):
        mine = np.asarray([s for mb in llm[d] for row in mb for s in row], dtype=np.int64)
        for v, part in zip(ranks, np.array_split(mine, len(ranks))):
            vit[v] += [(int(s), 0, int(tiles[s])) for s in part if tiles[s] > 0]
    return _predict("naive", llm, vit, tiles, tokens, layout, cost)


def evaluate(method: str, llm: list[list[list[list[int]]]], vit: list[list[TileRange]],
             samples: Sequence[SampleShape], layout: Layout, cost: CostModel | None = None) -> Assignment:
    """Predicted times of a given placement (e.g. the one a runner made without the balancer)."""
    tiles, tokens = sample_arrays(samples, layout)
    a = _predict(method, llm, vit, tiles, tokens, layout, cost or CostModel())
    a.check(tiles, tokens, layout)
    return a


# ---------------------------------------------------------------------- helpers


def _rows_to_microbatches(rows: list[list[int]], tokens: list[int], m: int) -> list[list[list[int]]]:
    """``m`` microbatches of whole rows: rows longest first, in contiguous runs of equal counts, so rows
    of similar length share a microbatch (a microbatch is padded to its longest row)."""
    rows = sorted(rows, key=lambda r: (-sum(tokens[s] for s in r), r))
    sizes = [len(rows) // m + (1 if k < len(rows) % m else 0) for k in range(m)]
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    return [rows[starts[k]:starts[k + 1]] for k in range(m)]


def _check_count(n: int, layout: Layout) -> None:
    need = layout.llm_dp * layout.microbatches
    if n < need:
        raise ValueError(f"global batch of {n} samples cannot fill llm_dp*microbatches = "
                         f"{layout.llm_dp}*{layout.microbatches} = {need} microbatches")


def _microbatch_tol(layout: Layout, tol: float = 1e-3) -> float:
    """Tolerance on a rank's largest microbatch that moves its pipeline time by at most ``tol``.

    ``T = S + (pp-1) M`` and ``M >= S/m``: ``M <= (1 + tol (m + pp - 1) / (pp - 1)) S/m`` keeps ``T`` within
    ``tol`` of its floor. Without a pipeline ``M`` does not enter the time; 1% keeps memory even.
    """
    w = layout.llm_pp - 1
    return tol * (layout.microbatches + w) / w if w else 1e-2


def _home_ranks(layout: Layout) -> list[list[int]]:
    ranks: list[list[int]] = [[] for _ in range(layout.llm_dp)]
    for v in range(layout.vit_ranks):
        ranks[layout.vit_home(v)].append(v)
    return ranks


def _cut(stream: list[TileRange], sizes: list[int]) -> tuple[list[list[TileRange]], list[TileRange]]:
    """Split a stream of tile ranges into consecutive chunks of ``sizes`` tiles; returns chunks, rest."""
    chunks: list[list[TileRange]] = []
    k, off = 0, 0
    for size in sizes:
        chunk: list[TileRange] = []
        while size > 0:
            s, a, b = stream[k]
            start = a + off
            take = min(size, b - start)
            chunk.append((s, start, start + take))
            size -= take
            off += take
            if start + take == b:
                k, off = k + 1, 0
        chunks.append(chunk)
    rest = stream[k:]
    if rest and off:
        s, a, b = rest[0]
        rest[0] = (s, a + off, b)
    return chunks, rest


def _vit_balanced(llm: list[list[list[list[int]]]], tiles: np.ndarray, layout: Layout) -> list[list[TileRange]]:
    """Tile quotas of floor/ceil(total / ranks); each group's tiles fill its own ViT ranks first."""
    n_vit = layout.vit_ranks
    home = _home_ranks(layout)
    streams = [[(s, 0, int(tiles[s])) for mb in mbs for row in mb for s in row if tiles[s] > 0] for mbs in llm]
    demand = [sum(b for _, _, b in st) for st in streams]
    base, extra = divmod(int(tiles.sum()), n_vit)
    quota = [base] * n_vit
    excess = [demand[d] - base * len(home[d]) for d in range(len(llm))]
    for d in sorted(range(len(llm)), key=lambda d: -excess[d]):  # ceil quotas where tiles are
        give = min(extra, len(home[d]), max(0, excess[d]))
        for v in home[d][:give]:
            quota[v] += 1
        extra -= give
    for v in range(n_vit):
        if extra == 0:
            break
        if quota[v] == base:
            quota[v] += 1
            extra -= 1
    vit: list[list[TileRange]] = [[] for _ in range(n_vit)]
    overflow: list[TileRange] = []
    deficit: list[tuple[int, int]] = []
    for d, stream in enumerate(streams):
        left = demand[d]
        takes = []
        for v in home[d]:
            takes.append(min(quota[v], left))
            left -= takes[-1]
        chunks, rest = _cut(stream, takes)
        overflow.extend(rest)
        for v, take, chunk in zip(home[d], takes, chunks):
            vit[v] = chunk
            if take < quota[v]:
                deficit.append((v, quota[v] - take))
    chunks, rest = _cut(overflow, [need for _, need in deficit])
    assert not rest, "tile quotas do not add up"
    for (v, _), chunk in zip(deficit, chunks):
        vit[v].extend(chunk)
    return vit


def _refine_pipeline(c: np.ndarray, dp_of: np.ndarray, mb_of: np.ndarray, layout: Layout, iters: int,
                     tol: float = 1e-3, partners: int = 4) -> None:
    """Lower the slowest pipeline ``T_d = S_d + (pp-1) M_d`` by moving or swapping one of its samples
    with a microbatch of one of the ``partners`` fastest dp ranks; re-balances both ranks' microbatches.
    Updates ``dp_of`` and ``mb_of`` in place."""
    dp, m, w = layout.llm_dp, layout.microbatches, layout.llm_pp - 1
    for _ in range(iters):
        loads = np.zeros((dp, m))
        np.add.at(loads, (dp_of, mb_of), c)
        srt = np.sort(loads, axis=1)
        top1, top2 = srt[:, -1], (srt[:, -2] if m > 1 else np.zeros(dp))
        arg1 = loads.argmax(axis=1)
        t = loads.sum(axis=1) + w * top1
        d = int(t.argmax())
        if t[d] <= t.mean() * (1 + tol):
            return
        mine = np.flatnonzero(dp_of == d)
        if np.bincount(mb_of[mine], minlength=m).min() == 0:
            return
        x, k = c[mine], mb_of[mine]
        rest_d = np.where(k == arg1[d], top2[d], top1[d])  # largest other microbatch of d
        others = [int(e) for e in np.argsort(t, kind="stable") if e != d][:partners]
        # candidate targets: every microbatch (e, j) of the partner ranks, with y = 0 (move) or an item
        tgt_e = np.repeat(others, m)
        tgt_j = np.tile(np.arange(m), len(others))
        theirs = np.flatnonzero(np.isin(dp_of, others))
        cand_e = np.concatenate([tgt_e, dp_of[theirs]])
        cand_j = np.concatenate([tgt_j, mb_of[theirs]])
        cand_y = np.concatenate([np.zeros(tgt_e.size), c[theirs]])
        cand_i = np.concatenate([np.full(tgt_e.size, -1), theirs])
        alone = (np.bincount(mb_of[mine], minlength=m)[k] == 1)[:, None] & (cand_i[None, :] < 0)
        delta = x[:, None] - cand_y[None, :]  # leaves d, arrives at e
        new_d = (t[d] - w * top1[d] - delta) + w * np.maximum(loads[d, k][:, None] - delta, rest_d[:, None])
        rest_e = np.where(cand_j == arg1[cand_e], top2[cand_e], top1[cand_e])
        new_e = (t[cand_e] - w * top1[cand_e])[None, :] + delta \
            + w * np.maximum(loads[cand_e, cand_j][None, :] + delta, rest_e[None, :])
        val = np.where((delta > 0) & ~alone, np.maximum(new_d, new_e), np.inf)
        best = int(val.argmin())
        if not val.flat[best] < t[d] * (1 - 1e-9):
            return
        a, b = divmod(best, cand_e.size)
        i, e, j, y = int(mine[a]), int(cand_e[b]), int(cand_j[b]), int(cand_i[b])
        if y >= 0:
            dp_of[y], mb_of[y] = d, mb_of[i]
        dp_of[i], mb_of[i] = e, j
        for r in (d, e):  # lower the two ranks' largest microbatches again
            items = np.flatnonzero(dp_of == r)
            mb_of[items] = refine(c[items], mb_of[items], m, min_count=1, max_iters=iters,
                                  tol=_microbatch_tol(layout, tol))


def _predict(method: str, llm: list[list[list[list[int]]]], vit: list[list[TileRange]], tiles: np.ndarray,
             tokens: np.ndarray, layout: Layout, cost: CostModel) -> Assignment:
    """Attach predicted per-rank times and exchange volumes to an assignment."""
    gpus = layout.llm_tp * layout.llm_pp
    pp = layout.llm_pp
    sc = np.asarray(cost.sample_cost(tokens), dtype=np.float64).reshape(-1).tolist()
    tok = tokens.tolist()
    mb_time = [[(sum(sc[s] for row in mb for s in row) + cost.llm_per_row * len(mb)
                 + cost.llm_per_row_sq * sum(sum(tok[s] for s in row) ** 2 for row in mb)) / gpus for mb in mbs]
               for mbs in llm]
    llm_time = [sum(t) + (pp - 1) * max(t) for t in mb_time]
    vit_tiles = [sum(b - a for _, a, b in ranges) for ranges in vit]
    vit_time = [float(cost.vit_time(t, layout.vit_tp)) for t in vit_tiles]

    dp_of = np.empty(len(tiles), dtype=np.int64)
    for d, mbs in enumerate(llm):
        for mb in mbs:
            for row in mb:
                dp_of[row] = d
    per_tile = layout.num_image_token * cost.exchange_bytes_per_token
    send = [0] * layout.vit_ranks
    recv = [0] * layout.llm_dp
    send_peers: list[set[int]] = [set() for _ in range(layout.vit_ranks)]
    recv_peers: list[set[int]] = [set() for _ in range(layout.llm_dp)]
    for v, ranges in enumerate(vit):
        local = layout.vit_groups(v)
        for s, a, b in ranges:
            d = int(dp_of[s])
            if d not in local:
                send[v] += (b - a) * per_tile
                recv[d] += (b - a) * per_tile
                send_peers[v].add(d)
                recv_peers[d].add(v)
    out = max([cost.exchange_time(send[v], len(send_peers[v]), layout.vit_tp) for v in range(layout.vit_ranks)
               if send[v]], default=0.0)
    into = max([cost.exchange_time(recv[d], len(recv_peers[d]), layout.llm_tp) for d in range(layout.llm_dp)
                if recv[d]], default=0.0)
    return Assignment(method=method, llm=llm, vit=vit, vit_time=vit_time, microbatch_time=mb_time,
                      llm_time=llm_time, exchange_send_bytes=send, exchange_recv_bytes=recv,
                      exchange_time=2.0 * max(out, into))  # embeddings forward, gradients backward
