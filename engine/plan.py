"""``python -m engine.plan --config C --nodes N --gpus-per-node G [--gpu h100] [--set k=v ...] [--json]
[--rehearse-rank R [--init-from DIR]]``

Shows, before any GPU is booked, what every rank of a layout holds (parameters of the ViT,
projector and LLM shards, built on the meta device; weights, gradients, optimizer state and
activations), whether it fits the GPU's memory, and a roofline estimate of the step time and
MFU. ``--rehearse-rank R`` also builds, on this CPU, exactly the shards rank R would hold (real
initial values, or the real slices of ``--init-from``) and reports ``rehearsal``: its parameter
count and bytes, peak host memory and seconds. Exit status 0: the layout works; 1: it does not
(one message says why); 2: bad config.
"""

from __future__ import annotations

import argparse
import json
import sys

from engine.config import ConfigError, load_config
from engine.planning.hardware import GPUS, get_gpu


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see examples/configs/)")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="GPU model (datasheet figures)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override (repeatable)")
    p.add_argument("--margin", type=float, default=0.1, help="share of GPU memory kept free (default 0.1)")
    p.add_argument("--visual-share", type=float, default=None,
                   help="share of microbatch tokens that are image tokens (default 0.9 x (1 - data.lm_ratio))")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--rehearse-rank", type=int, default=None, metavar="R",
                   help="build rank R's shards on this machine and measure time and host memory")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="with --rehearse-rank: read rank R's slices of this transformers checkpoint "
                        "(default: train.init_from, else the initialisation)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from engine.planning.planner import make_plan
    from engine.planning.report import plan_dict, plan_text

    try:
        plan = make_plan(cfg, args.nodes, args.gpus_per_node, get_gpu(args.gpu), args.margin, args.visual_share)
    except ValueError as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    out = plan_dict(plan)
    if args.rehearse_rank is not None and plan.ok:
        from engine.planning.rehearse import rehearse

        try:
            out["rehearsal"] = rehearse(cfg, plan.world, args.rehearse_rank, args.init_from)
        except (ValueError, KeyError, FileNotFoundError) as e:
            print(f"rehearsal: {e.args[0] if e.args else e}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(plan_text(plan))
        if "rehearsal" in out:
            r = out["rehearsal"]
            print(f"Rehearsal of rank {r['rank']} (LLM stage {r['llm_stage']}, from {r['source']}): "
                  f"{r['params']:,} parameters, {r['param_bytes'] / 2**30:.2f} GiB, built in {r['seconds']:.1f} s, "
                  f"peak host memory {r['peak_rss_gib']:.2f} GiB")
    if not plan.ok:
        print(plan.message(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
