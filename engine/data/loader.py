"""Step loader: the samples of global step k are indices [k*G, (k+1)*G) of the global order.

``next_batch()`` hands out a step as a ``StepBatch``: the shapes of its samples from the shape index
(samples the index marks bad are left out, counted and logged), with nothing loaded yet. The runner
places the step from those shapes and asks the batch for its own share only: the tokens of the
samples its LLM replica trains on and the pixels of the tiles its ViT rank encodes. ``next_step()``
loads a whole step (post-training, tools). Skipped samples are counted by reason; ``state_dict``
holds the step and the counters, so a resumed run returns exactly the steps the original would have.

Loading runs in ``num_workers`` worker processes (forked, as torch's DataLoader does; 0: in this
process); workers hand pixels over through shared-memory slots (``engine.data.shm``), a ``Sample``'s
through ``sample_to_wire`` and another item's (a preference pair's) through its ``to_wire``. With
``prefetch`` the share of the next step is requested as soon as a step is handed out, so it loads
while the step computes. Per step the batch counts its work: samples tokenised, images and
tiles decoded, and the seconds the step waited for data.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import time
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from engine.data import shm
from engine.data.batch import Sample
from engine.data.dataset import LoadResult, build_dataset
from engine.data.tokenizer import Tokenizer

log = logging.getLogger("engine.data")

Want = dict[int, Optional[tuple[int, ...]]]  # batch position -> tile numbers to decode (None: all; (): none)
Request = Callable[["StepBatch"], Want]

_DATASET: Any = None  # the worker process's dataset (inherited from the loader that forked it)
_SLOTS: Optional[shm.SlotRing] = None  # in a worker: where it makes pixels


def _worker_init(dataset: Any, owner: str) -> None:
    global _DATASET, _SLOTS
    _DATASET = dataset
    if shm.available():
        _SLOTS = shm.SlotRing(owner)
        dataset.allocate = _SLOTS.allocate
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # the trainer's handlers are the parent's business
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent, even when it is killed outright
        # keep freed image buffers for reuse: glibc otherwise maps and unmaps each multi-MB tile buffer,
        # and faulting its pages in again costs a third of a worker's time
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (its maximum)
        libc.mallopt(-1, 2 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass
    torch.set_num_threads(1)


def _load(dataset: Any, index: int, tiles: Optional[tuple[int, ...]]) -> LoadResult:
    return dataset.try_load(index) if tiles is None else dataset.try_load(index, tiles)


def sample_to_wire(s: Sample, pixels: Callable[[np.ndarray], Any]) -> tuple:
    """A ``Sample`` as plain arrays for a worker's pipe; ``pixels(array)``: what travels for its pixels."""
    return (s.input_ids.numpy(), s.labels.numpy(), None if s.pixel_values is None else pixels(s.pixel_values.numpy()),
            s.image_tiles, s.source, s.kind, s.index, s.tile_ids)


def sample_from_wire(wire: tuple, take: Callable[[Any], torch.Tensor]) -> Sample:
    """The ``Sample`` of ``sample_to_wire``; ``take`` turns what travelled for its pixels into a tensor."""
    ids, labels, px, tiles, source, kind, index, tile_ids = wire
    return Sample(torch.from_numpy(ids), torch.from_numpy(labels), None if px is None else take(px), tiles, source,
                  kind, index, tile_ids)


class _Wired(NamedTuple):
    """A loaded item on its way from a worker: a ``Sample`` (``kind`` None) or an item of class ``kind``
    with ``to_wire(pixels)`` and ``kind.from_wire(payload, take)`` (a preference pair)."""

    kind: Optional[type]
    payload: tuple


def _worker_load(jobs: list[tuple[int, Optional[tuple[int, ...]]]]) -> list[LoadResult]:
    """In a worker: load a chunk of items, their tensors as arrays and their pixels through the slots (an
    item of another kind without ``to_wire`` is pickled by value)."""
    out = []
    for index, tiles in jobs:
        r = _load(_DATASET, index, tiles)
        if isinstance(r.sample, Sample):
            r.sample = _Wired(None, sample_to_wire(r.sample, _wire))
        elif hasattr(r.sample, "to_wire"):
            r.sample = _Wired(type(r.sample), r.sample.to_wire(_wire))
        if _SLOTS is not None:
            _SLOTS.release_unsent()
        out.append(r)
    return out


def _wire(a: np.ndarray) -> Any:
    return a if _SLOTS is None else _SLOTS.wire(a)


def _from_worker(r: LoadResult, reader: shm.SlotReader) -> LoadResult:
    w = r.sample
    if isinstance(w, _Wired):
        r.sample = sample_from_wire(w.payload, reader.take) if w.kind is None else w.kind.from_wire(w.payload,
                                                                                                     reader.take)
    return r


def _settle(futures: list[Future], reader: shm.SlotReader, chunk: Future) -> None:
    """Hand the results of a worker's chunk to the futures of its samples."""
    if chunk.exception() is not None:
        for f in futures:
            f.set_exception(chunk.exception())
        return
    for f, r in zip(futures, chunk.result()):
        f.set_result(_from_worker(r, reader))


def _covers(sample: Sample, tiles: Optional[tuple[int, ...]]) -> bool:
    """Whether ``sample`` holds the pixels of ``tiles``."""
    if sample.tile_ids is None:
        return True
    return tiles is not None and set(tiles) <= set(sample.tile_ids)


def _union(a: Optional[tuple[int, ...]], b: Optional[tuple[int, ...]]) -> Optional[tuple[int, ...]]:
    return None if a is None or b is None else tuple(sorted(set(a) | set(b)))


class StepBatch:
    """One global step: its samples' global indices, token counts, tiles per image and sources (from
    the shape index, in index order), and whatever of it has been loaded on this rank. Positions
    ``0..len-1`` number its samples; ``drop`` removes samples found bad while loading."""

    def __init__(self, step: int, indices: Sequence[int], num_tokens: Sequence[int],
                 image_tiles: Sequence[Sequence[int]], sources: Sequence[str], loader: Optional["StepLoader"] = None):
        self.step, self.loader = step, loader
        self.indices, self.num_tokens = list(indices), list(num_tokens)
        self.image_tiles, self.sources = [list(t) for t in image_tiles], list(sources)
        self.loaded: dict[int, Sample] = {}  # global index -> sample (its tokens, some or all pixels)
        self.bad: dict[int, LoadResult] = {}  # global index -> why loading it failed here
        self.pending: dict[int, tuple[Optional[tuple[int, ...]], Future]] = {}
        self.counters = {"samples_tokenised": 0, "images_decoded": 0, "tiles_decoded": 0, "wait_seconds": 0.0}
        self.memo: dict = {}  # the runner's placement of these samples

    @classmethod
    def from_samples(cls, samples: Sequence[Sample], step: int = -1) -> "StepBatch":
        """A batch of samples already in memory (evaluation, tests)."""
        b = cls(step, [s.index for s in samples], [s.num_tokens for s in samples], [s.image_tiles for s in samples],
                [s.source for s in samples])
        b.loaded = {s.index: s for s in samples}
        if len(b.loaded) != len(samples):
            raise ValueError("samples of a batch need distinct indices")
        return b

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def num_tiles(self) -> list[int]:
        return [sum(t) for t in self.image_tiles]

    def submit(self, want: Want) -> None:
        """Start loading ``want`` (in the loader's workers) without waiting."""
        jobs: list[tuple[int, Optional[tuple[int, ...]]]] = []
        for pos, tiles in sorted(want.items()):
            i = self.indices[pos]
            have = self.loaded.get(i)
            if i in self.bad or (have is not None and _covers(have, tiles)):
                continue
            if i in self.pending:
                asked = self.pending[i][0]
                if asked is None or (tiles is not None and set(tiles) <= set(asked)):
                    continue
                tiles = _union(asked, tiles)
            if have is not None:
                tiles = _union(tuple(have.tile_ids), tiles)
            jobs.append((i, tiles))
        if jobs and self.loader is None:
            raise RuntimeError(f"samples {[i for i, _ in jobs][:8]} of this batch are not loaded and it has no loader")
        for (i, tiles), fut in zip(jobs, self.loader.submit(jobs) if jobs else []):
            self.pending[i] = (tiles, fut)

    def load(self, want: Want) -> dict[int, LoadResult]:
        """Load ``want`` (what is not loaded yet) and wait for it; returns ``{position: result}`` of the
        samples found bad here (skip reason and message)."""
        t0 = time.perf_counter()
        self.submit(want)
        for pos in sorted(want):
            i = self.indices[pos]
            if i in self.pending:
                _, fut = self.pending.pop(i)
                r = fut.result()
                self.counters["samples_tokenised"] += 1
                self.counters["images_decoded"] += r.images_decoded
                self.counters["tiles_decoded"] += r.tiles_decoded
                if r.sample is None:
                    self.bad[i] = r
                else:
                    self.loaded[i] = r.sample
        self.counters["wait_seconds"] += time.perf_counter() - t0
        return {pos: self.bad[self.indices[pos]] for pos in want if self.indices[pos] in self.bad}

    def data_stats(self, counters: Optional[dict] = None) -> dict:
        """The step's ``data/*`` metrics: ``data/<counter>_max`` from ``counters`` (the busiest rank's
        of each, gathered by a parallel runner; default this rank's) and the step's ``data/images``."""
        c = self.counters if counters is None else counters
        return {**{f"data/{k}_max": float(v) for k, v in c.items()},
                "data/images": sum(len(t) for t in self.image_tiles)}

    def samples(self) -> list[Optional[Sample]]:
        """The loaded sample at each position (None where this rank loaded nothing)."""
        return [self.loaded.get(i) for i in self.indices]

    def drop(self, positions: Sequence[int]) -> list[int]:
        """Remove the samples at ``positions``; returns their global indices."""
        gone = set(positions)
        out = [self.indices[p] for p in sorted(gone)]
        keep = [p for p in range(len(self)) if p not in gone]
        for name in ("indices", "num_tokens", "image_tiles", "sources"):
            setattr(self, name, [getattr(self, name)[p] for p in keep])
        for i in out:
            self.loaded.pop(i, None)
            self.pending.pop(i, None)
        self.memo.clear()
        return out


class StepLoader:
    """Serves global steps of ``dataset``: ``next_batch()`` (shapes, loaded on demand) or
    ``next_step()`` (all samples loaded). ``request(batch)`` (set by the runner) says what this rank
    loads of a step: it is asked as a step is handed out, and for the next step when prefetching."""

    def __init__(self, dataset: Any, global_batch: int, step: int = 0, num_workers: int = 0,
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
        self.request: Optional[Request] = None
        self._pool: Optional[ProcessPoolExecutor] = None
        self._slots = shm.SlotReader(shm.owner_tag(self))
        self._ahead: Optional[StepBatch] = None  # the next step, its share already requested
        self._ahead_full: Optional[tuple[int, list[Future]]] = None  # the next whole step (``next_step``)

    def step_indices(self, k: Optional[int] = None) -> range:
        """Global sample indices of step ``k`` (default: the next step)."""
        k = self.step if k is None else int(k)
        return range(k * self.global_batch, (k + 1) * self.global_batch)

    # ------------------------------------------------------------------ loading
    def submit(self, jobs: Sequence[tuple[int, Optional[tuple[int, ...]]]]) -> list[Future]:
        """Load samples ``(index, tiles)`` (``tiles``: see ``InternVLDataset.try_load``) in the workers,
        a few chunks per worker, or here and now without workers; one future per sample."""
        futures: list[Future] = [Future() for _ in jobs]
        if self.num_workers <= 0:
            for fut, (index, tiles) in zip(futures, jobs):
                fut.set_result(_load(self.dataset, index, tiles))
            return futures
        if self._pool is None:
            shm.remove_orphans()
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            self._pool = ProcessPoolExecutor(self.num_workers, mp_context=multiprocessing.get_context(method),
                                             initializer=_worker_init, initargs=(self.dataset, self._slots.owner))
            log.info("data: %d loader worker processes (pid %d)", self.num_workers, os.getpid())
        size = max(1, -(-len(jobs) // (2 * self.num_workers)))
        for a in range(0, len(jobs), size):
            chunk = self._pool.submit(_worker_load, list(jobs[a:a + size]))
            chunk.add_done_callback(functools.partial(_settle, futures[a:a + size], self._slots))
        return futures

    def _record(self, r: LoadResult, log_it: bool = True) -> None:
        if log_it:
            self.dataset.record_skip(r, self.stats)
        else:
            self.stats[r.reason] = self.stats.get(r.reason, 0) + 1
        self.last_skips[r.reason] = self.last_skips.get(r.reason, 0) + 1

    def _batch(self, k: int) -> tuple[StepBatch, list[LoadResult]]:
        """Step ``k`` from the shape index, and the samples the index says to skip."""
        ds, keep, skips = self.dataset, [], []
        for i in self.step_indices(k):
            reason, message, n, tiles = ds.shape(i)
            if reason:
                skips.append(LoadResult(i, None, ds.source(i), reason, message))
            else:
                keep.append((i, n, tiles, ds.source(i)))
        return StepBatch(k, [x[0] for x in keep], [x[1] for x in keep], [x[2] for x in keep],
                         [x[3] for x in keep], self), skips

    def next_batch(self) -> StepBatch:
        """The next step, placed by the runner and loaded share by share (``StepBatch.load``)."""
        if self._ahead is not None and self._ahead.step == self.step:
            batch, skips = self._ahead, self._ahead.memo.pop("index_skips")
        else:
            batch, skips = self._batch(self.step)
            if self.request is not None and self.num_workers > 0:
                batch.submit(self.request(batch))
        self._ahead = None
        self.last_skips = {}
        for r in skips:
            self._record(r)
        self.step += 1
        if self.prefetch and self.request is not None and self.num_workers > 0:
            ahead, ahead_skips = self._batch(self.step)
            ahead.memo["index_skips"] = ahead_skips
            ahead.submit(self.request(ahead))
            self._ahead = ahead
        self.last_indices = list(batch.indices)
        return batch

    def record_load_skips(self, batch: StepBatch, bad: dict[int, tuple[str, str]]) -> None:
        """Count the samples at positions ``bad`` (``{position: (reason, message)}``, agreed by every
        rank) as skipped, log those this rank found bad itself, and drop them from ``batch``."""
        for pos, (reason, message) in sorted(bad.items()):
            i = batch.indices[pos]
            mine = batch.bad.get(i)
            self._record(mine if mine is not None else LoadResult(i, None, batch.sources[pos], reason, message),
                         log_it=mine is not None)
        batch.drop(list(bad))
        self.last_indices = list(batch.indices)

    def next_step(self, indices: Optional[Sequence[int]] = None) -> list:
        """Samples of the next step, all loaded (all of it, or only ``indices``, a subset of ``step_indices()``)."""
        full = self.step_indices()
        if indices is not None:
            bad = [i for i in indices if i not in full]
            if bad:
                raise ValueError(f"indices {bad[:5]} are not in step {self.step} ({full.start}..{full.stop - 1})")
        if self._ahead_full is not None and self._ahead_full[0] == self.step and indices is None:
            futures = self._ahead_full[1]
        else:
            futures = self.submit([(i, None) for i in (full if indices is None else indices)])
        self._ahead_full = None
        self.step += 1
        if indices is None and self.prefetch and self.num_workers > 0:
            self._ahead_full = (self.step, self.submit([(i, None) for i in self.step_indices()]))
        out: list = []
        self.last_indices = []
        self.last_skips = {}
        for r in (f.result() for f in futures):
            if r.sample is None:
                self._record(r)
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
        self._ahead = self._ahead_full = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._slots.close()
        self._ahead = self._ahead_full = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def build_step_loader(cfg: Any, tokenizer: Optional[Tokenizer] = None) -> StepLoader:
    """``StepLoader`` over ``build_dataset(cfg)`` with ``cfg.train.global_batch`` samples per step;
    ``data.num_workers`` > 0 loads in that many worker processes, prefetching the next step unless
    ``data.prefetch`` is false."""
    workers = int(cfg.data.num_workers)
    return StepLoader(build_dataset(cfg, tokenizer), cfg.train.global_batch, num_workers=workers,
                      prefetch=workers > 0 and cfg.data.prefetch)
