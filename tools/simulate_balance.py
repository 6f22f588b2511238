#!/usr/bin/env python
"""Simulate naive vs balanced assignment of InternVL3-like global batches to ViT and LLM ranks.

Workload (synthetic, per step ``--global-batch`` samples): text-only documents (log-normal length,
median ``--text-median`` tokens) make up ``--lm-ratio`` of all tokens (default 1:3 language:multimodal;
``--text-only-share`` sets the share of samples instead). Multimodal samples (log-normal text, median
``--mm-text-median``) are single images, 2-4 images or videos in the ratio
``--single-image:--multi-image:--video``. Images take InternVL dynamic tiling over realistic aspect
ratios: the grid (i, j) with i*j in [1, max_num] closest to the image's aspect ratio, plus a thumbnail
when more than one tile (max_num = ``--max-dynamic-patch``, divided by the image count for
multi-image samples); videos have 8-32 frames of one tile. Each tile is ``--num-image-token`` (256)
LLM tokens. ``--samples FILE.jsonl`` replaces the synthetic mix: one ``{"tiles": int, "text_tokens": int,
"images": [tiles per image] (optional)}`` per line, consumed in order (cycled) per step; malformed or
over-long lines are reported with their line number, skipped and counted.

Model of a step: ViT time of the slowest ViT rank (world / vit_tp ranks) + exchange of visual
embeddings between LLM dp groups (forward and backward) + LLM time of the slowest dp rank
(world / (llm_tp * llm_pp) ranks) as a 1F1B pipeline: sum of its microbatch stage times plus
(pp - 1) times its largest one. Costs from ``engine.balance.CostModel`` (``--cost FILE.json``).
Imbalance is max/mean over ranks of each module's predicted time, averaged over steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.balance import Assignment, CostModel, Layout, SampleShape, balance, naive  # noqa: E402
from engine.balance.workload import WorkloadConfig, draw_workload, read_samples, text_only_share  # noqa: E402

METRICS = ("vit_imbalance", "llm_imbalance", "step_time", "vit_time", "exchange_time", "llm_time", "exchange_mb")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("layout")
    g.add_argument("--world", type=int, default=64, help="GPUs (default 64)")
    g.add_argument("--vit-tp", type=int, default=1, help="ViT tensor parallel degree (default 1)")
    g.add_argument("--llm-tp", type=int, default=8, help="LLM tensor parallel degree (default 8)")
    g.add_argument("--llm-pp", type=int, default=1, help="LLM pipeline stages (default 1)")
    g.add_argument("--microbatches", type=int, default=4, help="microbatches per LLM dp rank (default 4)")
    g.add_argument("--global-batch", type=int, default=128, help="samples per step (default 128)")
    g.add_argument("--max-packed-tokens", type=int, default=16384, help="tokens per packed row (default 16384)")
    g.add_argument("--num-image-token", type=int, default=256, help="LLM tokens per tile (default 256)")
    g = p.add_argument_group("run")
    g.add_argument("--steps", type=int, default=20, help="simulated steps (default 20)")
    g.add_argument("--seed", type=int, default=0, help="workload and balancer seed (default 0)")
    g.add_argument("--cost", type=str, default="", help="cost model JSON (default: built-in estimates)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    g.add_argument("--plot", type=str, default="", help="write a PNG histogram of per-rank loads")
    g = p.add_argument_group("workload")
    g.add_argument("--samples", type=str, default="", help="JSONL workload instead of the synthetic mix")
    g.add_argument("--lm-ratio", type=float, default=0.25, help="text-only share of tokens (default 0.25)")
    g.add_argument("--text-only-share", type=float, default=None, help="text-only share of samples (overrides)")
    g.add_argument("--single-image", type=float, default=0.6, help="weight of single-image samples (0.6)")
    g.add_argument("--multi-image", type=float, default=0.2, help="weight of 2-4 image samples (0.2)")
    g.add_argument("--video", type=float, default=0.2, help="weight of 8-32 frame videos (0.2)")
    g.add_argument("--max-dynamic-patch", type=int, default=12, help="max tiles per image (default 12)")
    g.add_argument("--text-median", type=float, default=1500.0, help="median text-only tokens (1500)")
    g.add_argument("--mm-text-median", type=float, default=300.0, help="median text tokens of multimodal (300)")
    g.add_argument("--text-sigma", type=float, default=0.8, help="log-normal sigma of text lengths (0.8)")
    return p.parse_args(argv)


def _workload(args: argparse.Namespace) -> tuple[list[list[SampleShape]], dict]:
    """Samples of each step and a description of the workload."""
    n, steps = args.global_batch, args.steps
    if args.samples:
        pool, bad = read_samples(args.samples, args.max_packed_tokens, args.num_image_token)
        for msg in bad[:10]:
            print(f"skipped {msg}", file=sys.stderr)
        if len(bad) > 10:
            print(f"... {len(bad) - 10} more lines skipped", file=sys.stderr)
        if len(pool) < n:
            raise SystemExit(f"{args.samples}: {len(pool)} usable samples, fewer than --global-batch={n}")
        batches = [[pool[(k * n + i) % len(pool)] for i in range(n)] for k in range(steps)]
        info = {"source": args.samples, "samples_read": len(pool), "skipped_lines": len(bad)}
    else:
        cfg = WorkloadConfig(lm_ratio=args.lm_ratio, text_only_share=args.text_only_share,
                             single_image=args.single_image, multi_image=args.multi_image, video=args.video,
                             max_dynamic_patch=args.max_dynamic_patch, text_median=args.text_median,
                             mm_text_median=args.mm_text_median, text_sigma=args.text_sigma,
                             mm_text_sigma=args.text_sigma, num_image_token=args.num_image_token,
                             max_tokens=args.max_packed_tokens)
        rng = np.random.default_rng(args.seed)
        batches = [draw_workload(n, cfg, rng) for _ in range(steps)]
        info = {"source": "synthetic", "text_only_share_target": text_only_share(cfg), "skipped_lines": 0}
    flat = [s for b in batches for s in b]
    tokens = np.array([s.llm_tokens(args.num_image_token) for s in flat], dtype=np.float64)
    text_only = np.array([s.tiles == 0 for s in flat])
    info.update({
        "text_only_samples": float(text_only.mean()),
        "text_only_tokens": float(tokens[text_only].sum() / tokens.sum()),
        "tiles_per_step": float(sum(s.tiles for s in flat) / steps),
        "tokens_per_step": float(tokens.sum() / steps),
    })
    return batches, info


def _metrics(a: Assignment, cost: CostModel) -> dict[str, float]:
    return {"vit_imbalance": a.vit_imbalance, "llm_imbalance": a.llm_imbalance, "step_time": a.step_time,
            "vit_time": max(a.vit_time), "exchange_time": a.exchange_time, "llm_time": max(a.llm_time),
            "exchange_mb": a.exchange_bytes / 1e6}


def simulate(args: argparse.Namespace) -> dict:
    """Run the comparison; returns the JSON-ready result (plus per-rank loads under ``_loads``)."""
    if args.steps < 1:
        raise SystemExit(f"--steps={args.steps} must be >= 1")
    layout = Layout(world=args.world, llm_tp=args.llm_tp, llm_pp=args.llm_pp, vit_tp=args.vit_tp,
                    microbatches=args.microbatches, max_packed_tokens=args.max_packed_tokens,
                    num_image_token=args.num_image_token)
    cost = CostModel.load(args.cost) if args.cost else CostModel()
    batches, info = _workload(args)
    rows: dict[str, list[dict[str, float]]] = {"naive": [], "balanced": []}
    loads: dict[str, dict[str, list[float]]] = {k: {"vit": [], "llm": []} for k in rows}
    ms = []
    for step, samples in enumerate(batches):
        plans = {"naive": naive(samples, layout, cost)}
        t0 = time.perf_counter()
        plans["balanced"] = balance(samples, layout, cost, seed=args.seed + step)
        ms.append((time.perf_counter() - t0) * 1e3)
        for k, a in plans.items():
            rows[k].append(_metrics(a, cost))
            loads[k]["vit"] += (np.array(a.vit_time) / np.mean(a.vit_time)).tolist()
            loads[k]["llm"] += (np.array(a.llm_time) / np.mean(a.llm_time)).tolist()
    out: dict = {"config": {k: getattr(args, k) for k in ("world", "vit_tp", "llm_tp", "llm_pp", "microbatches",
                                                          "global_batch", "max_packed_tokens", "steps", "seed")},
                 "layout": {"vit_ranks": layout.vit_ranks, "llm_dp": layout.llm_dp}, "workload": info}
    for k, r in rows.items():
        out[k] = {m: float(np.mean([x[m] for x in r])) for m in METRICS}
        out[k]["vit_imbalance_worst"] = float(max(x["vit_imbalance"] for x in r))
        out[k]["llm_imbalance_worst"] = float(max(x["llm_imbalance"] for x in r))
    out["speedup"] = out["naive"]["step_time"] / out["balanced"]["step_time"]
    out["balancer_ms"] = float(np.mean(ms))
    out["balancer_ms_max"] = float(np.max(ms))
    out["_loads"] = loads
    return out


def table(res: dict) -> str:
    c, lay, w = res["config"], res["layout"], res["workload"]
    lines = [
        f"layout: world {c['world']}, ViT ranks {lay['vit_ranks']} (tp {c['vit_tp']}), LLM tp {c['llm_tp']} "
        f"pp {c['llm_pp']} dp {lay['llm_dp']}, {c['microbatches']} microbatches, rows <= {c['max_packed_tokens']}",
        f"workload: {w['source']}, {c['global_batch']} samples/step x {c['steps']} steps; text-only "
        f"{w['text_only_samples']:.0%} of samples, {w['text_only_tokens']:.0%} of tokens; "
        f"{w['tiles_per_step']:.0f} tiles, {w['tokens_per_step'] / 1e3:.0f}k tokens per step"
        + (f"; {w['skipped_lines']} lines skipped" if w["skipped_lines"] else ""),
        "",
        f"{'':28s}{'naive':>10s}{'balanced':>10s}",
    ]
    names = [("vit_imbalance", "ViT imbalance (max/mean)", "{:10.3f}"),
             ("vit_imbalance_worst", "  worst step", "{:10.3f}"),
             ("llm_imbalance", "LLM imbalance (max/mean)", "{:10.3f}"),
             ("llm_imbalance_worst", "  worst step", "{:10.3f}"),
             ("vit_time", "ViT time, slowest rank (s)", "{:10.3f}"),
             ("exchange_time", "exchange time (s)", "{:10.4f}"),
             ("llm_time", "LLM time, slowest rank (s)", "{:10.3f}"),
             ("step_time", "step time (s)", "{:10.3f}"),
             ("exchange_mb", "exchange (MB/step)", "{:10.1f}")]
    for key, label, fmt in names:
        lines.append(f"{label:28s}" + fmt.format(res["naive"][key]) + fmt.format(res["balanced"][key]))
    lines += ["", f"speed-up: {res['speedup']:.3f}x   balancer: {res['balancer_ms']:.2f} ms/step "
                  f"(max {res['balancer_ms_max']:.2f})"]
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, module in zip(axes, ("vit", "llm")):
        both = res["_loads"]["naive"][module] + res["_loads"]["balanced"][module]
        bins = np.linspace(min(both), max(both), 40)
        for k, color in (("naive", "tab:red"), ("balanced", "tab:blue")):
            ax.hist(res["_loads"][k][module], bins=bins, alpha=0.6, color=color, label=k)
        ax.set_title(f"{'ViT' if module == 'vit' else 'LLM'} per-rank load")
        ax.set_xlabel("load / mean load")
        ax.set_ylabel("ranks x steps")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        res = simulate(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    if args.plot:
        plot(res, args.plot)
    res.pop("_loads")
    if args.json:
        print(json.dumps(res))
    else:
        print(table(res))
        if args.plot:
            print(f"histogram: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
