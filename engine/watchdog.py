"""Hang watchdog: a thread per rank that ends the process when it stays in one phase too long.

The training loop and the runner name the phase a rank is in (``enter``: data, ViT forward, exchange,
pipeline send/recv with its peer, gradient reduction, checkpoint write, ...), marking the phases that
wait on other ranks as collective. A thread publishes the rank's step and phase to the job's
key-value store (the one ``torch.distributed`` rendezvoused with) every few seconds. When a phase has
lasted ``train.hang_timeout_s``, the thread logs what this rank is waiting on and every rank's last
report, names the ranks that did not arrive (an earlier step, a phase that is not a collective, or no
report for a while), and exits the process with status ``EXIT_HANG``: the main thread may be blocked
inside a collective that will never return, so nothing else can end it, and a non-zero exit lets
``srun --kill-on-bad-exit`` and the requeue logic restart the job. Every rank that can still act does
the same, each after its own timeout.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Optional

log = logging.getLogger("engine.watchdog")

EXIT_HANG = 4


class Watchdog:
    """``enter(phase, collective=False)`` marks progress; ``start()`` / ``stop()`` bracket the loop.
    ``timeout_s`` <= 0 disables it (``enter`` still records the phase)."""

    def __init__(self, timeout_s: float, rank: int = 0, world: int = 1, store: Any = None,
                 report_every_s: Optional[float] = None):
        self.timeout, self.rank, self.world, self.store = float(timeout_s), rank, world, store
        self.every = report_every_s or max(0.5, min(5.0, self.timeout / 8))
        self.step, self.phase, self.collective, self.since = 0, "start", False, time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def enter(self, phase: str, collective: bool = False, step: Optional[int] = None) -> None:
        if step is not None:
            self.step = step
        self.phase, self.collective, self.since = phase, collective, time.monotonic()

    def start(self) -> None:
        if self.timeout > 0 and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._watch, name="engine-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # ------------------------------------------------------------------ the thread
    def _report(self) -> dict:
        return {"step": self.step, "phase": self.phase, "collective": self.collective,
                "in_phase_s": round(time.monotonic() - self.since, 1), "time": time.time()}

    def _publish(self) -> None:
        if self.store is not None:
            try:
                self.store.set(f"watchdog/rank{self.rank}", json.dumps(self._report()))
            except Exception:  # the store's server may be gone with rank 0
                pass

    def _others(self) -> dict[int, dict]:
        out = {}
        for r in range(self.world):
            if r == self.rank or self.store is None:
                continue
            try:
                if self.store.check([f"watchdog/rank{r}"]):
                    out[r] = json.loads(self.store.get(f"watchdog/rank{r}"))
            except Exception:
                pass
        return out

    def _watch(self) -> None:
        while not self._stop.wait(self.every):
            self._publish()
            if time.monotonic() - self.since >= self.timeout:
                self._fire()

    def explain(self) -> list[str]:
        """Log every other rank's last report; the ranks that did not arrive where this one waits
        (an earlier step, a phase that is not a collective, or no recent report)."""
        me, others, now, late = self._report(), self._others(), time.time(), []
        for r in range(self.world):
            if r == self.rank:
                continue
            o = others.get(r)
            if o is None:
                late.append(f"rank {r} (no report)")
                continue
            age = now - o["time"]
            log.error("rank %d: last report of rank %d (%.0f s ago): step %d, phase '%s'%s for %.0f s", self.rank, r,
                      age, o["step"], o["phase"], " (collective)" if o["collective"] else "", o["in_phase_s"])
            if o["step"] < me["step"] or not o["collective"] or age > 3 * self.every + 5:
                late.append(f"rank {r} (step {o['step']}, '{o['phase']}')")
        log.error("rank %d: ranks that did not arrive: %s", self.rank, ", ".join(late) or "none found")
        return late

    def _fire(self) -> None:
        me = self._report()
        kind = "waiting on other ranks in" if self.collective else "in"
        log.error("rank %d: hang watchdog: step %d has been %s phase '%s' for %.0f s (train.hang_timeout_s=%g)",
                  self.rank, me["step"], kind, me["phase"], me["in_phase_s"], self.timeout)
        if self.collective:
            self.explain()
        log.error("rank %d: exiting with status %d so the job can be restarted", self.rank, EXIT_HANG)
        for h in logging.getLogger().handlers:
            try:
                h.flush()
            except Exception:
                pass
        os._exit(EXIT_HANG)


def job_store() -> Any:
    """The key-value store of the default process group (None without one)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:
        return None
