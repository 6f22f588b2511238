"""Step loader: the samples of global step k are indices [k*G, (k+1)*G) of the global order.

Skipped samples are absent from a step and counted by reason. ``state_dict`` holds the step and
the skip counters, so a resumed run returns exactly the steps the original run would have.
A rank that loads only its share passes those indices to ``next_step``.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional, Sequence

from engine.data.batch import Sample
from engine.data.dataset import InternVLDataset, LoadResult


class StepLoader:
    """``next_step()`` -> the loaded samples of the next global step, in index order.

    ``num_workers`` threads load the samples of a step; ``prefetch`` loads the next full step in
    the background while the current one is used (only for steps loaded in full).
    """

    def __init__(self, dataset: InternVLDataset, global_batch: int, step: int = 0, num_workers: int = 0,
                 prefetch: bool = False) -> None:
        if global_batch < 1:
            raise ValueError(f"global_batch={global_batch} must be >= 1")
        self.dataset = dataset
        self.global_batch = int(global_batch)
        self.step = int(step)
        self.stats: dict[str, int] = {}
        self.last_indices: list[int] = []  # global indices of the samples last returned
        self.last_skips: dict[str, int] = {}  # skips of the last step, by reason
        self.num_workers = int(num_workers)
        self.prefetch = bool(prefetch)
        self._pool: Optional[ThreadPoolExecutor] = None
        self._ahead: Optional[tuple[int, Future]] = None

    def step_indices(self, k: Optional[int] = None) -> range:
        """Global sample indices of step ``k`` (default: the next step)."""
        k = self.step if k is None else int(k)
        return range(k * self.global_batch, (k + 1) * self.global_batch)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=max(1, self.num_workers) + (1 if self.prefetch else 0))
        return self._pool

    def _load_all(self, indices: Sequence[int]) -> list[LoadResult]:
        if self.num_workers > 0 and len(indices) > 1:
            return list(self._executor().map(self.dataset.try_load, indices))
        return [self.dataset.try_load(i) for i in indices]

    def next_step(self, indices: Optional[Sequence[int]] = None) -> list[Sample]:
        """Samples of the next step (all of it, or only ``indices``, a subset of ``step_indices()``)."""
        full = self.step_indices()
        if indices is None:
            if self._ahead is not None and self._ahead[0] == self.step:
                results = self._ahead[1].result()
            else:
                results = self._load_all(full)
        else:
            bad = [i for i in indices if i not in full]
            if bad:
                raise ValueError(f"indices {bad[:5]} are not in step {self.step} ({full.start}..{full.stop - 1})")
            results = self._load_all(list(indices))
        self._ahead = None
        self.step += 1
        if indices is None and self.prefetch:
            nxt = list(self.step_indices())
            self._ahead = (self.step, self._executor().submit(self._load_all, nxt))
        out: list[Sample] = []
        self.last_indices = []
        self.last_skips = {}
        for r in results:
            if r.sample is None:
                self.dataset.record_skip(r, self.stats)
                self.last_skips[r.reason] = self.last_skips.get(r.reason, 0) + 1
            else:
                out.append(r.sample)
                self.last_indices.append(r.index)
        return out

    @property
    def skipped(self) -> int:
        return int(sum(self.stats.values()))

    def skipped_total(self) -> int:
        """Samples skipped by this loader since the start of the run (resumes included)."""
        return self.skipped

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "global_batch": self.global_batch, "seed": self.dataset.seed,
                "stats": dict(self.stats), "text_share": self.dataset.text_share}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("step", "global_batch", "seed", "stats"):
            if key not in state:
                raise ValueError(f"data loader state lacks '{key}'")
        if int(state["global_batch"]) != self.global_batch:
            raise ValueError(f"cannot resume data order: checkpoint has global_batch={state['global_batch']}, "
                             f"now train.global_batch={self.global_batch}")
        if int(state["seed"]) != self.dataset.seed:
            raise ValueError(f"cannot resume data order: checkpoint has seed={state['seed']}, "
                             f"now train.seed={self.dataset.seed}")
        share = state.get("text_share")
        if share is not None and abs(float(share) - self.dataset.text_share) > 1e-9:
            raise ValueError(f"cannot resume data order: text share was {share}, now {self.dataset.text_share} "
                             f"(data files, tokenizer or data.lm_ratio changed)")
        self.step = int(state["step"])
        self.stats = {str(k): int(v) for k, v in state["stats"].items()}
        self._ahead = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._ahead = None
