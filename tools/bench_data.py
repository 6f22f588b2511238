#!/usr/bin/env python
"""Throughput of the step loader: what one rank loads of each step, and how fast, per worker count.

    python tools/bench_data.py --config examples/configs/tiny.yaml [--world 4 --rank 0] --steps 20 \\
        [--workers 0 2] [--rounds 3] [--warmup 1] [--step-time S] [--json] [key=value ...]

Builds the data set once (its shape index is built or read from the cache then: "index" seconds,
not part of any timing), then for each ``--workers`` count runs a fresh ``StepLoader`` from step 0
as the trainer does (with workers, each step's share is requested as the step before it is handed
out, so the workers never wait for the training process), loads ``--warmup`` steps untimed (they
start the worker processes) and times the next ``--steps`` back to back: the loader's throughput. Each step loads this rank's share only, as in
training: the step is placed from its shapes (``place_step``; ``balance.enabled`` picks the
balancer or the naive split) for ``--world`` ranks, and rank ``--rank`` loads the tokens of its LLM
replica's samples and the pixels of its ViT rank's tiles; with ``--world 1`` it loads everything.
Placing is timed too: the trainer does it in the training process.

Figures per worker count:
  samples/s, tiles/s   samples tokenised and tiles decoded by this rank, over the timed wall seconds
  loader s/step        mean (wall seconds / steps) and max of ``next_batch()`` + ``batch.load(share)``
  share                of each step, what this rank loaded: samples tokenised / samples of the step,
                       images decoded / images of the step, tiles decoded / tiles of the step (mean
                       over steps; images over the steps that have images)
  speed-up             samples/s over that of the first worker count (measured in this run)

``--rounds`` R runs every worker count R times, interleaved (0, 2, 0, 2, ...), so that a slow spell of
a shared machine hits every count alike; each figure is the median over the rounds (``rounds`` in
the JSON lists each round's samples/s).
  loader / step        mean loader seconds over the step time the loader must hide under: ``--step-time``,
                       else the cost model's predicted step time of the placement (mean over steps)

The runs share the machine's page cache: the first worker count reads the files cold unless an
earlier run (or the warm-up) read them. Extra ``key=value`` arguments override the config.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.balance.layout import Layout  # noqa: E402
from engine.config import ConfigError, load_config, validate_config  # noqa: E402
from engine.data.dataset import build_dataset  # noqa: E402
from engine.data.loader import StepBatch, StepLoader, Want  # noqa: E402
from engine.parallel.data_share import place_step, rank_share, share_coords  # noqa: E402
from engine.parallel.runner import load_cost_model  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="engine config (YAML)")
    p.add_argument("--world", type=int, default=1, help="ranks the step is shared over (default 1)")
    p.add_argument("--rank", type=int, default=0, help="the rank whose share is loaded (default 0)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per worker count (default 20)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader worker counts (default 0 2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats of every worker count (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing (default 1)")
    p.add_argument("--step-time", type=float, default=None,
                   help="seconds per training step (default: the cost model's prediction)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p.parse_intermixed_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the bad argument."""
    if args.world < 1:
        raise ValueError(f"--world={args.world} must be >= 1")
    if not 0 <= args.rank < args.world:
        raise ValueError(f"--rank={args.rank} must be in [0, --world={args.world})")
    if args.steps < 1:
        raise ValueError(f"--steps={args.steps} must be >= 1")
    if args.rounds < 1:
        raise ValueError(f"--rounds={args.rounds} must be >= 1")
    if args.warmup < 0:
        raise ValueError(f"--warmup={args.warmup} must be >= 0")
    if any(k < 0 for k in args.workers) or len(set(args.workers)) < len(args.workers):
        raise ValueError(f"--workers={args.workers}: worker counts must be distinct and >= 0")
    if args.step_time is not None and args.step_time <= 0:
        raise ValueError(f"--step-time={args.step_time} must be positive")


class Share:
    """This rank's share of a step: from the step's placement for (world, rank); everything at W=1."""

    def __init__(self, cfg: Any, world: int, rank: int) -> None:
        self.cfg, self.world = cfg, world
        self.layout = Layout.from_config(cfg, world)
        self.cost = load_cost_model(cfg)
        self.replica, self.vit_rank = share_coords(self.layout, rank)

    def __call__(self, batch: StepBatch) -> tuple[Want, Optional[float]]:
        """(what to load, the cost model's predicted step time of the placement or None)."""
        placement, _ = place_step(batch, self.layout, self.cost, self.cfg.balance.enabled, self.cfg.train.seed)
        predicted = placement.predicted.step_time if placement.predicted is not None else None
        if self.world == 1:
            return {pos: None for pos in range(len(batch))}, predicted
        return rank_share(placement, self.replica, self.vit_rank), predicted


def _ratio(a: int, b: int) -> Optional[float]:
    return a / b if b else None


def run(dataset: Any, cfg: Any, share: Share, workers: int, steps: int, warmup: int) -> tuple[dict, Optional[float]]:
    """Time ``steps`` steps after ``warmup`` with ``workers`` loader processes; (figures, the mean
    predicted step time of their placements)."""
    loader = StepLoader(dataset, cfg.train.global_batch, num_workers=workers, prefetch=True)
    loader.request = lambda batch: share(batch)[0]
    seconds: list[float] = []
    shares: dict[str, list[float]] = {"samples": [], "images": [], "tiles": []}
    loaded = {"samples_tokenised": 0, "images_decoded": 0, "tiles_decoded": 0}
    predicted: list[float] = []
    start = 0.0
    try:
        for k in range(warmup + steps):
            if k == warmup:
                start = time.perf_counter()
            t0 = time.perf_counter()
            batch = loader.next_batch()
            want, step_time = share(batch)
            batch.load(want)
            if k < warmup:
                continue
            seconds.append(time.perf_counter() - t0)
            c = batch.counters
            for key in loaded:
                loaded[key] += int(c[key])
            for key, got, total in (("samples", c["samples_tokenised"], len(batch)),
                                    ("images", c["images_decoded"], sum(len(t) for t in batch.image_tiles)),
                                    ("tiles", c["tiles_decoded"], sum(batch.num_tiles))):
                r = _ratio(got, total)
                if r is not None:
                    shares[key].append(r)
            if step_time is not None:
                predicted.append(step_time)
        total = time.perf_counter() - start
    finally:
        loader.close()
    return {"workers": workers,
            "samples_per_s": loaded["samples_tokenised"] / total if total > 0 else None,
            "tiles_per_s": loaded["tiles_decoded"] / total if total > 0 else None,
            "loader_seconds_mean": total / len(seconds), "loader_seconds_max": max(seconds),
            "share": {k: statistics.fmean(v) if v else None for k, v in shares.items()},
            **loaded}, (statistics.fmean(predicted) if predicted else None)


def setup(args: argparse.Namespace) -> tuple[Any, Share, Any, float]:
    """(config, share, data set, seconds to build the data set and its shape index); ``ValueError``
    (``ConfigError``, ``DataError``) or ``OSError`` for bad arguments, config or data."""
    check_args(args)
    cfg = load_config(args.config, args.overrides)
    validate_config(cfg, args.world)
    share = Share(cfg, args.world, args.rank)
    t0 = time.perf_counter()
    dataset = build_dataset(cfg)
    return cfg, share, dataset, time.perf_counter() - t0


def median_run(rounds: list[dict]) -> dict:
    """The round with the median samples/s (its figures), with every round's samples/s."""
    ordered = sorted(rounds, key=lambda r: r["samples_per_s"] or 0.0)
    return {**ordered[(len(ordered) - 1) // 2], "rounds": [r["samples_per_s"] for r in rounds]}


def bench(args: argparse.Namespace, cfg: Any, share: Share, dataset: Any, index_seconds: float) -> dict:
    """Run every worker count; the JSON-ready result."""
    measured: dict[int, list[dict]] = {k: [] for k in args.workers}
    predicted = None  # every run places the same steps
    for _ in range(args.rounds):
        for k in args.workers:
            figures, predicted = run(dataset, cfg, share, k, args.steps, args.warmup)
            measured[k].append(figures)
    runs = [median_run(measured[k]) for k in args.workers]
    if args.step_time is not None:
        step_time, source = args.step_time, "--step-time"
    else:
        step_time, source = predicted, "predicted by the cost model, mean over steps"
    base = runs[0]["samples_per_s"]
    for r in runs:
        r["loader_over_step_time"] = r["loader_seconds_mean"] / step_time if step_time else None
    speedup = {str(r["workers"]): (r["samples_per_s"] / base if base and r["samples_per_s"] else None) for r in runs}
    return {"config": args.config, "world": args.world, "rank": args.rank, "steps": args.steps, "rounds": args.rounds,
            "warmup": args.warmup, "global_batch": cfg.train.global_batch, "index_seconds": index_seconds,
            "runs": runs, "speedup": speedup, "step_time": step_time, "step_time_source": source}


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(res: dict) -> str:
    lines = [f"{res['config']}: world {res['world']}, rank {res['rank']}, global batch {res['global_batch']}, "
             f"{res['steps']} timed steps after {res['warmup']} warm-up, median of {res['rounds']} interleaved rounds",
             f"data set + shape index (build or read): {res['index_seconds']:.2f} s",
             f"step time: {_fmt(res['step_time'], '.4g')} s ({res['step_time_source']})", "",
             "| workers | samples/s | tiles/s | loader s/step (mean) | (max) | share samples | images | tiles "
             "| speed-up | loader / step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        s = r["share"]
        lines.append(f"| {r['workers']} | {_fmt(r['samples_per_s'], '.1f')} | {_fmt(r['tiles_per_s'], '.1f')} "
                     f"| {r['loader_seconds_mean']:.4f} | {r['loader_seconds_max']:.4f} "
                     f"| {_fmt(s['samples'], '.3f')} | {_fmt(s['images'], '.3f')} | {_fmt(s['tiles'], '.3f')} "
                     f"| {_fmt(res['speedup'][str(r['workers'])], '.2f')}x "
                     f"| {_fmt(r['loader_over_step_time'], '.3g')} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg, share, dataset, index_seconds = setup(args)
    except (ValueError, OSError) as e:
        kind = "config error" if isinstance(e, ConfigError) else "error"
        print(f"bench_data: {kind}: {e}", file=sys.stderr)
        return 2
    res = bench(args, cfg, share, dataset, index_seconds)
    print(json.dumps(res, indent=1) if args.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
