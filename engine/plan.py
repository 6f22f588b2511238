"""``python -m engine.plan --config C --nodes N --gpus-per-node G [--gpu h100] [--set k=v ...] [--json]``

Shows, before any GPU is booked, what every rank of a layout holds (parameters of the ViT,
projector and LLM shards, built on the meta device; weights, gradients, optimizer state and
activations), whether it fits the GPU's memory, and a roofline estimate of the step time and
MFU. Exit status 0: the layout works; 1: it does not (one message says why); 2: bad config.
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
    if args.json:
        print(json.dumps(plan_dict(plan), indent=1))
    else:
        print(plan_text(plan))
    if not plan.ok:
        print(plan.message(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
