"""Convert checkpoints between transformers and the engine, in one CPU process, tensor by tensor.

    # transformers `internvl` or remote-code `internvl_chat` -> engine checkpoint for a layout
    python tools/convert_checkpoint.py --input OpenGVLab/InternVL3-2B-hf --output ckpt/init \\
        --to engine [--config examples/configs/x.yaml] --set parallel.llm.tp=2 --set parallel.llm.pp=2

    # engine checkpoint (any layout; a run's checkpoints/ root follows `latest`) -> transformers
    python tools/convert_checkpoint.py --input runs/x/checkpoints --output out/hf --to hf \\
        [--dtype bf16] [--max-shard-size 5GB]

The source format is detected. ``--dry-run`` prints the plan (tensors, shapes, dtypes, target
pieces per rank file, bytes) and writes nothing. Train from a converted checkpoint with
``--set train.resume=ckpt/init`` (any layout: the engine reshards on load). Prints the tensors
and bytes written, the time taken, the throughput and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from engine.checkpoint.convert import ENGINE, detect_format, parse_dtype, to_engine, to_hf  # noqa: E402
from engine.checkpoint.manager import CheckpointError  # noqa: E402
from engine.config import ConfigError, load_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/convert_checkpoint.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="transformers directory or engine checkpoint")
    p.add_argument("--output", required=True, help="directory to create (must not exist or be empty)")
    p.add_argument("--to", required=True, choices=("engine", "hf"), help="output format")
    p.add_argument("--config", help="engine YAML config: its parallel section is the target layout; its model "
                                    "section must match the checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set parallel.llm.tp=2 (repeatable)")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks of the target layout (default: the smallest that holds its model-parallel groups)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="cast floating-point tensors")
    p.add_argument("--max-shard-size", default="5GB", help="largest transformers shard file (--to hf)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        fmt = detect_format(args.input)
        dtype = parse_dtype(args.dtype)
        if args.to == "engine":
            if fmt == ENGINE:
                raise CheckpointError(f"{args.input} is already an engine checkpoint; every layout loads it as is")
            model_keys = bool(args.config) or any(o.startswith("model.") for o in args.overrides)
            cfg = load_config(args.config, args.overrides, validate=False)
            to_engine(args.input, args.output, cfg, args.world_size, dtype, args.dry_run, model_keys)
        else:
            if fmt != ENGINE:
                raise CheckpointError(f"{args.input} is a {fmt} directory, not an engine checkpoint")
            if args.config or args.overrides:
                raise ConfigError("--config/--set apply to --to engine only")
            to_hf(args.input, args.output, dtype, args.max_shard_size, args.dry_run)
    except (CheckpointError, ConfigError, FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
