"""The balancer's decision for one step, with its predicted per-rank times."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.balance.layout import Layout

TileRange = tuple[int, int, int]  # (sample index, first tile, end tile exclusive)


def imbalance(loads: list[float] | np.ndarray) -> float:
    """max / mean of per-rank loads (1.0 is perfect; 1.0 for all-zero loads)."""
    a = np.asarray(loads, dtype=np.float64)
    mean = a.mean() if a.size else 0.0
    return float(a.max() / mean) if mean > 0 else 1.0


@dataclass
class Assignment:
    """Where every sample and tile of one global batch goes.

    ``llm[d][m][r]``: sample indices of packed row ``r`` of microbatch ``m`` on LLM dp rank ``d``.
    ``vit[v]``: tile ranges ``(sample, first, end)`` that ViT rank ``v`` encodes, in that order.
    Times are predicted seconds: ``vit_time[v]``, ``microbatch_time[d][m]`` (one pipeline stage),
    ``llm_time[d]`` (pipeline incl. bubble) and ``exchange_time``; exchange bytes are the visual
    embeddings (one way) that leave the LLM dp group in which they were encoded.
    """

    method: str
    llm: list[list[list[list[int]]]]
    vit: list[list[TileRange]]
    vit_time: list[float] = field(default_factory=list)
    microbatch_time: list[list[float]] = field(default_factory=list)
    llm_time: list[float] = field(default_factory=list)
    exchange_send_bytes: list[int] = field(default_factory=list)  # per ViT rank
    exchange_recv_bytes: list[int] = field(default_factory=list)  # per LLM dp rank
    exchange_time: float = 0.0

    # ------------------------------------------------------------------ summaries

    @property
    def exchange_bytes(self) -> int:
        return int(sum(self.exchange_send_bytes))

    @property
    def step_time(self) -> float:
        """Slowest ViT rank + exchange (forward and backward) + slowest LLM pipeline."""
        return max(self.vit_time, default=0.0) + self.exchange_time + max(self.llm_time, default=0.0)

    @property
    def vit_imbalance(self) -> float:
        return imbalance(self.vit_time)

    @property
    def llm_imbalance(self) -> float:
        return imbalance(self.llm_time)

    def vit_tiles(self, vit_rank: int) -> list[tuple[int, int]]:
        """``(sample, tile)`` pairs that ViT rank ``vit_rank`` encodes, in order."""
        return [(s, t) for s, a, b in self.vit[vit_rank] for t in range(a, b)]

    def dp_samples(self, dp_rank: int) -> list[int]:
        """Sample indices of LLM dp rank ``dp_rank`` in microbatch, row order."""
        return [s for mb in self.llm[dp_rank] for row in mb for s in row]

    def transfers(self) -> dict[tuple[int, int], list[TileRange]]:
        """``(ViT rank, LLM dp rank) -> tile ranges`` the ViT rank encodes for that dp rank, in order."""
        dp_of = {s: d for d, mbs in enumerate(self.llm) for mb in mbs for row in mb for s in row}
        out: dict[tuple[int, int], list[TileRange]] = {}
        for v, ranges in enumerate(self.vit):
            for r in ranges:
                out.setdefault((v, dp_of[r[0]]), []).append(r)
        return out

    def locations(self) -> dict[int, tuple[int, int, int]]:
        """sample index -> (dp rank, microbatch, row)."""
        return {s: (d, m, r) for d, mbs in enumerate(self.llm) for m, rows in enumerate(mbs)
                for r, row in enumerate(rows) for s in row}

    # ------------------------------------------------------------------ checks

    def check(self, tiles: list[int] | np.ndarray, tokens: list[int] | np.ndarray, layout: Layout) -> None:
        """Raise ValueError unless every sample and tile is placed exactly once and rows fit."""
        n = len(tiles)
        if len(self.llm) != layout.llm_dp:
            raise ValueError(f"{len(self.llm)} LLM dp ranks, layout has {layout.llm_dp}")
        if len(self.vit) != layout.vit_ranks:
            raise ValueError(f"{len(self.vit)} ViT ranks, layout has {layout.vit_ranks}")
        seen = np.zeros(n, dtype=np.int64)
        for d, mbs in enumerate(self.llm):
            if len(mbs) != layout.microbatches:
                raise ValueError(f"dp rank {d} has {len(mbs)} microbatches, layout has {layout.microbatches}")
            for m, rows in enumerate(mbs):
                for r, row in enumerate(rows):
                    used = int(sum(tokens[s] for s in row))
                    if used > layout.max_packed_tokens:
                        raise ValueError(f"row ({d}, {m}, {r}) holds {used} tokens > {layout.max_packed_tokens}")
                    for s in row:
                        seen[s] += 1
        bad = np.flatnonzero(seen != 1)
        if bad.size:
            raise ValueError(f"sample {int(bad[0])} placed {int(seen[bad[0]])} times in the LLM")
        covered = np.zeros(n, dtype=np.int64)
        for v, ranges in enumerate(self.vit):
            for s, a, b in ranges:
                if not 0 <= a < b <= tiles[s]:
                    raise ValueError(f"ViT rank {v}: tile range {a}..{b} outside sample {s} ({tiles[s]} tiles)")
                covered[s] += b - a
        by_sample: dict[int, list[tuple[int, int]]] = {}
        for ranges in self.vit:
            for s, a, b in ranges:
                by_sample.setdefault(s, []).append((a, b))
        for s, spans in by_sample.items():
            spans.sort()
            if any(spans[k][1] != spans[k + 1][0] for k in range(len(spans) - 1)):
                raise ValueError(f"tiles of sample {s} overlap or have gaps: {spans}")
        bad = np.flatnonzero(covered != np.asarray(tiles))
        if bad.size:
            s = int(bad[0])
            raise ValueError(f"sample {s}: {int(covered[s])} of {int(tiles[s])} tiles encoded")

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "llm": self.llm,
            "vit": [[list(r) for r in ranges] for ranges in self.vit],
            "vit_time": list(self.vit_time),
            "microbatch_time": [list(m) for m in self.microbatch_time],
            "llm_time": list(self.llm_time),
            "exchange_send_bytes": list(self.exchange_send_bytes),
            "exchange_recv_bytes": list(self.exchange_recv_bytes),
            "exchange_time": self.exchange_time,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Assignment":
        missing = [k for k in ("method", "llm", "vit") if k not in d]
        if missing:
            raise ValueError(f"assignment is missing key(s) {missing}")
        try:
            return cls(
                method=str(d["method"]),
                llm=[[[[int(s) for s in row] for row in mb] for mb in mbs] for mbs in d["llm"]],
                vit=[[(int(r[0]), int(r[1]), int(r[2])) for r in ranges] for ranges in d["vit"]],
                vit_time=[float(x) for x in d.get("vit_time", [])],
                microbatch_time=[[float(x) for x in m] for m in d.get("microbatch_time", [])],
                llm_time=[float(x) for x in d.get("llm_time", [])],
                exchange_send_bytes=[int(x) for x in d.get("exchange_send_bytes", [])],
                exchange_recv_bytes=[int(x) for x in d.get("exchange_recv_bytes", [])],
                exchange_time=float(d.get("exchange_time", 0.0)),
            )
        except (TypeError, IndexError, ValueError) as e:
            raise ValueError(f"malformed assignment: {e}") from e
