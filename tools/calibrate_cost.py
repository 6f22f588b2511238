#!/usr/bin/env python
"""Fit the load balancer's cost model by timing the real ViT and LLM of a config on this device.

    python tools/calibrate_cost.py --config CONFIG [--set key=value ...] [--out cost.json] [--repeats N]

ViT: forward + backward of ``extract_feature`` (ViT, pixel shuffle, projector) on 1 .. ``--max-tiles``
random tiles -> ``vit_per_tile``, ``vit_fixed``. LLM: forward + backward of the model's loss on one
packed row of text samples, for totals of ``--max-tokens`` (default ``data.max_packed_tokens``) and
smaller, each split into 1 .. 16 equal samples (attention stays inside each sample) ->
``llm_per_token``, ``llm_per_token_sq``, ``llm_per_row``, ``llm_per_row_sq``. Each row ends in one
padding token, as packed rows in training almost always do, so a dense attention backend takes the
masked path it takes in training. Each point is the median of ``--repeats``
timed runs after one warm-up run; fits are non-negative least squares (``engine.balance.cost``).
Under ``torchrun`` with two or more processes, ranks 0 and 1 also time point-to-point messages of
64 KiB .. 16 MiB -> ``exchange_bandwidth``, ``exchange_latency``; otherwise these keep their defaults.
``exchange_bytes_per_token`` is the LLM hidden size times the bytes of the training dtype.

Times are seconds on one device (GPU-seconds, as ``CostModel`` expects); the device and dtype follow
``train.device`` and ``train.dtype``. On a CPU the thread count matters: ``--threads`` should match
what each training process uses (torchrun sets OMP_NUM_THREADS=1). Point ``balance.cost_file`` at
the output to use it in training, or ``tools/simulate_balance.py --cost`` to simulate with it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from typing import Callable, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from engine.balance.cost import CostModel, fit_exchange, fit_llm, fit_vit  # noqa: E402
from engine.config import ConfigError, load_config  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults, tiny preset)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override (repeatable)")
    p.add_argument("--out", default="cost.json", help="output JSON for balance.cost_file (default cost.json)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per point, median taken (default 5)")
    p.add_argument("--max-tiles", type=int, default=16, help="largest ViT batch in tiles (default 16)")
    p.add_argument("--max-tokens", type=int, default=0, help="longest LLM row (default data.max_packed_tokens)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: unchanged)")
    return p.parse_args(argv)


def _ladder(top: int, low: int = 1) -> list[int]:
    """``top, top/2, top/4, ...`` down to ``low``, plus 3/4 points between, ascending."""
    out = set()
    x = top
    while x >= low:
        out.add(x)
        if x * 3 // 4 >= low:
            out.add(x * 3 // 4)
        x //= 2
    return sorted(out)


def _timer(device: torch.device, repeats: int) -> Callable[[Callable[[], None]], float]:
    def measure(fn: Callable[[], None]) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return measure


def time_vit(model, cfg, device: torch.device, autocast, measure, max_tiles: int) -> list[tuple[int, float]]:
    """``(tiles, seconds)`` of ViT + projector forward and backward."""
    side = cfg.model.vision.image_size
    gen = torch.Generator().manual_seed(0)
    out = []
    for n in _ladder(max_tiles):
        pixels = torch.randn(n, 3, side, side, generator=gen).to(device)

        def step() -> None:
            model.zero_grad(set_to_none=True)
            with autocast():
                y = model.extract_feature(pixels)
            y.float().backward(torch.ones_like(y, dtype=torch.float32))

        out.append((n, measure(step)))
    return out


def llm_rows(max_tokens: int, min_len: int = 16) -> list[list[int]]:
    """Sample lengths of the timed rows: totals ``max_tokens``, /2, /4, /8, each as 1..16 equal samples."""
    rows = []
    total = max_tokens
    while total >= min_len and len(rows) < 24:
        k = 1
        while k <= 16 and total // k >= min_len:
            rows.append([total // k] * k)
            k *= 2
        total //= 2
    return rows


def time_llm(model, cfg, device: torch.device, autocast, measure, max_tokens: int) -> list[tuple[list[int], float]]:
    """``(sample lengths, seconds)`` of the loss forward and backward on one packed row."""
    from engine.data.batch import Sample
    from engine.data.packing import pack

    m = cfg.model
    special = min(m.img_start_token_id, m.img_end_token_id, m.img_context_token_id)
    high = special if special > 32 else m.llm.vocab_size  # plain-text ids only
    low = 8 if special > 32 else max(m.img_start_token_id, m.img_end_token_id, m.img_context_token_id) + 1
    gen = torch.Generator().manual_seed(1)
    out = []
    for lengths in llm_rows(max_tokens):
        samples = []
        for k, n in enumerate(lengths):
            ids = torch.randint(low, high, (n,), generator=gen)
            samples.append(Sample(input_ids=ids, labels=ids.clone(), kind="text", index=k))
        batch = pack(samples, cfg, pad_to_multiple=sum(lengths) + 1).to(device)  # one padding token
        if batch.input_ids.shape[0] != 1:
            raise RuntimeError(f"lengths {lengths} did not pack into one row of {max_tokens} tokens")

        def step() -> None:
            model.zero_grad(set_to_none=True)
            with autocast():
                loss_sum, weight = model.loss_terms(batch)
            (loss_sum / weight).backward()

        out.append((lengths, measure(step)))
    return out


def time_exchange(device: torch.device, measure) -> list[tuple[int, float]]:
    """``(bytes, seconds)`` of one message between ranks 0 and 1 (half a ping-pong); collective."""
    import torch.distributed as dist

    rank = dist.get_rank()
    out = []
    for nbytes in [1 << k for k in range(16, 25, 2)]:
        buf = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)

        def ping() -> None:
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            elif rank == 1:
                dist.recv(buf, 0)
                dist.send(buf, 0)

        seconds = measure(ping) / 2
        out.append((nbytes, seconds))
    return out


def _relative_errors(points: list[tuple], predict: Callable) -> list[float]:
    return [abs(predict(x) - y) / y if y > 0 else 0.0 for x, y in points]


def calibrate(args: argparse.Namespace) -> CostModel:
    from engine.models.layers import autocast_context
    from engine.trainer import build_model, resolve_device, resolve_dtype

    if args.repeats < 1 or args.max_tiles < 1 or args.max_tokens < 0:
        raise ConfigError(f"--repeats={args.repeats}, --max-tiles={args.max_tiles} must be >= 1 and "
                          f"--max-tokens={args.max_tokens} >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides, validate=False)
    max_tokens = args.max_tokens or cfg.data.max_packed_tokens
    if max_tokens < 16:
        raise ConfigError(f"--max-tokens={max_tokens} must be >= 16")
    cfg.data.max_packed_tokens = max_tokens
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    dtype = resolve_dtype(cfg.train.dtype, device)
    autocast = lambda: autocast_context(device, dtype)  # noqa: E731
    measure = _timer(device, args.repeats)
    cost = CostModel(exchange_bytes_per_token=cfg.model.llm.hidden_size * (dtype or torch.float32).itemsize)

    if distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        pings = _timer(device, max(args.repeats, 7))  # cheap; medians of several resist scheduling noise
        cost = replace(cost, **fit_exchange(time_exchange(device, pings)))
        dist.barrier()
        if rank != 0:
            return cost  # rank 0 times the modules alone (no contention) and writes the file

    model = build_model(cfg).to(device)
    model.train()
    vit = time_vit(model, cfg, device, autocast, measure, args.max_tiles)
    llm = time_llm(model, cfg, device, autocast, measure, max_tokens)
    cost = replace(cost, **fit_vit(vit), **fit_llm(llm))
    cost.save(args.out)

    print(f"device {device}, dtype {dtype or torch.float32}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print("ViT  tiles -> ms: " + ", ".join(f"{n}:{s * 1e3:.2f}" for n, s in vit))
    vit_err = _relative_errors(vit, lambda n: cost.vit_time(n))
    llm_err = _relative_errors(llm, lambda lengths: cost.row_cost(lengths))
    print("LLM  row -> ms: " + ", ".join(f"{len(x)}x{x[0]}:{s * 1e3:.2f}" for x, s in llm))
    print(f"fit: vit_per_tile={cost.vit_per_tile:.4g} s, vit_fixed={cost.vit_fixed:.4g} s "
          f"(max rel. error {max(vit_err):.1%}); llm_per_token={cost.llm_per_token:.4g} s, "
          f"llm_per_token_sq={cost.llm_per_token_sq:.4g} s, llm_per_row={cost.llm_per_row:.4g} s, "
          f"llm_per_row_sq={cost.llm_per_row_sq:.4g} s "
          f"(max rel. error {max(llm_err):.1%})")
    if cost.vit_per_tile == 0 or cost.llm_per_token + cost.llm_per_token_sq + cost.llm_per_row_sq == 0:
        print("warning: a per-tile or per-token coefficient fitted to 0: the timings do not grow with the work; "
              "raise --max-tiles / --max-tokens or --repeats, or calibrate on a quieter machine", file=sys.stderr)
    if distributed:
        print(f"exchange: bandwidth {cost.exchange_bandwidth / 1e9:.3g} GB/s, latency {cost.exchange_latency * 1e6:.3g} us")
    else:
        print("exchange: defaults kept (run under torchrun with 2+ processes to time it)")
    print(f"wrote {args.out}")
    return cost


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        calibrate(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # a fit that the timings cannot support
        print(f"calibration failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
