"""Per-rank set-up time and peak host memory of a real multi-process start, against each rank's
own parameter bytes (what sharded construction should cost).

    python tools/measure_setup.py --nproc 4 --config examples/configs/tiny.yaml \\
        --set model.preset=internvl3-1b --set parallel.llm.tp=2 --set parallel.llm.pp=2 \\
        --set parallel.llm.microbatches=2 --set parallel.vit.tp=2 [--set train.init_from=DIR] [--json]

Runs ``torchrun --standalone -m engine.train`` with ``train.steps=0`` (set-up only, nothing
trained or saved) and reads the trainer's "set-up: rank R" log lines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LINE = re.compile(r"set-up: rank (\d+) ([\d.]+) s, peak host memory ([\d.]+) GiB")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from engine.config import load_config
    from engine.planning.rehearse import rank_param_bytes

    run_dir = tempfile.mkdtemp(prefix="measure-setup-")
    overrides = args.overrides + ["train.steps=0", "train.save_interval=0", "train.progress=false",
                                  "train.tensorboard=false", f"run.dir={run_dir}", "train.resume=none"]
    cfg = load_config(args.config, overrides)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           "-m", "engine.train", "--config", args.config]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-4000:] + proc.stderr[-4000:], file=sys.stderr)
        return proc.returncode
    rows = []
    for m in LINE.finditer(proc.stdout + proc.stderr):
        rank, secs, peak = int(m.group(1)), float(m.group(2)), float(m.group(3))
        own = rank_param_bytes(cfg, args.nproc, rank) / 2**30
        rows.append({"rank": rank, "setup_s": secs, "peak_gib": peak, "own_param_gib": round(own, 3),
                     "peak_minus_own_gib": round(peak - own, 3)})
    rows.sort(key=lambda r: r["rank"])
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print("| rank | own parameters (GiB) | peak host memory (GiB) | peak - own (GiB) | set-up (s) |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['rank']} | {r['own_param_gib']:.2f} | {r['peak_gib']:.2f} | {r['peak_minus_own_gib']:.2f} "
                  f"| {r['setup_s']:.1f} |")
    return 0 if len(rows) == args.nproc else 1


if __name__ == "__main__":
    sys.exit(main())
