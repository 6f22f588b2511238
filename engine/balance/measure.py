"""Measured compute time per rank: named spans of one step, and imbalance over groups of ranks.

On the host a span is ``time.perf_counter`` around the work (``seconds``), and also the process's CPU
time (``cpu_seconds``, ``time.process_time``): on a CPU shared by more processes than cores, wall time
includes the time a rank waits for a core, CPU time only the work. On a GPU the work is asynchronous,
so a span is a pair of CUDA events on the current stream, read after the step (``seconds``); a span
that waits for a collective then includes the stream's wait, which callers subtract as their own span.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np
import torch

from engine.balance.assignment import imbalance


class ComputeClock:
    """Sums the durations of named spans since the last ``reset``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self._host: dict[str, float] = defaultdict(float)
        self._cpu: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def span(self, key: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((key, start, end))
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                yield
            finally:
                self._host[key] += time.perf_counter() - t0
                self._cpu[key] += time.process_time() - c0

    def cpu_seconds(self, key: str) -> float:
        """Process CPU time of the host spans ``key`` (0 for GPU spans)."""
        return self._cpu.get(key, 0.0)

    def seconds(self, key: str) -> float:
        total = self._host.get(key, 0.0)
        for k, start, end in self._events:
            if k == key:
                end.synchronize()
                total += start.elapsed_time(end) / 1e3
        return total


def group_imbalance(values: Sequence[float], group_of: Sequence[int]) -> float:
    """max / mean over groups of the mean value of each group's members (``group_of[rank]``)."""
    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(group_of, dtype=np.int64)
    if v.shape != g.shape:
        raise ValueError(f"{v.size} values for {g.size} group indices")
    sums = np.bincount(g, weights=v)
    counts = np.bincount(g)
    return imbalance(sums[counts > 0] / counts[counts > 0])
