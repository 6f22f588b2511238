"""Draw a run's loss, learning rate, grad norm and throughput curves to a PNG.

    python tools/plot_metrics.py runs/tiny [--out runs/tiny/metrics.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run directory holding metrics.jsonl")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/metrics.png)")
    args = p.parse_args(argv)
    path = os.path.join(args.run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        print(f"no metrics.jsonl in {args.run_dir}", file=sys.stderr)
        return 1
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        print(f"{path} is empty", file=sys.stderr)
        return 1
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    panels = [("loss", "loss"), ("grad_norm", "grad norm"), ("lr", "learning rate"), ("tokens_per_s", "tokens / s")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (key, title) in zip(axes.flat, panels):
        ys = [r.get(key) for r in rows]
        pts = [(s, y) for s, y in zip(steps, ys) if isinstance(y, (int, float))]
        if pts:
            ax.plot(*zip(*pts), lw=1.2, label="train" if key == "loss" else None)
        if key == "loss":  # held-out evaluation, when the run has it
            ev = [(s, r["eval_loss"]) for s, r in zip(steps, rows) if isinstance(r.get("eval_loss"), (int, float))]
            if ev:
                ax.plot(*zip(*ev), "o-", lw=1.2, ms=3, label="held-out")
                ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    first, last = rows[0].get("loss"), rows[-1].get("loss")
    fig.suptitle(f"{args.run_dir}: loss {first:.3f} -> {last:.3f} over {len(rows)} steps")
    fig.tight_layout()
    out = args.out or os.path.join(args.run_dir, "metrics.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
