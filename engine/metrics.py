"""What a run shows: a progress bar, ``metrics.jsonl`` (one object per step) and TensorBoard."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Optional


def peak_rss_mib() -> float:
    """This process's peak resident memory: ``VmHWM`` of its own address space (``ru_maxrss``
    would include the parent's peak, which Linux carries across fork and exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


log = logging.getLogger("engine")


def setup_logging(rank: int = 0) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    root.setLevel(level)


class MetricsLogger:
    """Writes on rank 0 only. ``log(step, metrics)`` appends one JSON line and TensorBoard scalars."""

    def __init__(self, run_dir: str, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.writer = None
        self.bar = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if start_step == 0 and os.path.exists(self.path):
            os.remove(self.path)
        elif start_step > 0 and os.path.exists(self.path):
            self._truncate_after(start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_step or None)
            except Exception as e:  # tensorboard missing or broken: keep training, say so
                log.warning("TensorBoard disabled: %s", e)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            disable=None, file=sys.stderr)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps that will be recomputed."""
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(keep)

    def log(self, step: int, metrics: dict, eta_s: Optional[float] = None) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            post = {"loss": f"{row.get('loss', float('nan')):.4f}"}
            if "tokens_per_s" in row:
                post["tok/s"] = f"{row['tokens_per_s']:.0f}"
            if row.get("skipped_samples"):
                post["skipped"] = row["skipped_samples"]
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(run_dir_or_file: str) -> list[dict]:
    path = run_dir_or_file
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
