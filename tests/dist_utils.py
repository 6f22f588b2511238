"""Run a function in N gloo processes from pytest.

``run_distributed(fn, world_size, *args, timeout=...)`` spawns one process per rank, calls
``fn(rank, world_size, *args)`` after ``init_process_group("gloo")`` and returns the ranks'
return values in rank order. A rank that raises makes the call raise ``DistributedError`` with
the rank and its traceback; a run that exceeds ``timeout`` seconds is killed and raises
``TimeoutError``. ``fn`` must be a module-level function; return values are pickled.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import shutil
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class DistributedError(RuntimeError):
    """A rank of a ``run_distributed`` call raised."""


def _worker(rank: int, world: int, store: str, timeout: float, fn: Callable, args: tuple, results) -> None:
    torch.set_num_threads(1)
    try:
        # A file rendezvous: no port to pick, so no race with other processes for a free one.
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        out = fn(rank, world, *args)
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(5)


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store_dir = tempfile.mkdtemp(prefix="dist-store-")
    store = os.path.join(store_dir, "store")
    # not daemonic: a rank may start data loader worker processes, as under torchrun; ``_stop`` ends them all
    procs = [ctx.Process(target=_worker, args=(r, world_size, store, timeout, fn, args, results), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    done: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(done) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(done))
                raise TimeoutError(f"ranks {missing} of {world_size} did not finish within {timeout:.0f} s")
            try:
                rank, ok, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode is not None]
                if dead:
                    try:  # a result may still be in flight from a rank that just exited
                        rank, ok, payload = results.get(timeout=2.0)
                    except queue.Empty:
                        raise DistributedError(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} "
                                               "without a result") from None
                else:
                    continue
            if not ok:
                raise DistributedError(f"rank {rank} of {world_size} failed:\n{payload}")
            done[rank] = pickle.loads(payload)
        for p in procs:  # let finished ranks tear down their process group
            p.join(10)
    finally:
        _stop(procs)
        shutil.rmtree(store_dir, ignore_errors=True)
    return [done[r] for r in range(world_size)]


def run_jobs(rank: int, world: int, jobs: dict) -> dict:
    """Worker body for ``run_distributed``: run every ``name: (fn, args)`` job as
    ``fn(rank, world, *args)``; a failing job returns ``{"error": traceback}`` instead of stopping the rest."""
    import traceback

    out = {}
    for name, (fn, args) in jobs.items():
        try:
            out[name] = fn(rank, world, *args)
        except Exception:
            out[name] = {"error": traceback.format_exc()}
    return out
