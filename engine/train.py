"""``python -m engine.train --config examples/configs/tiny.yaml [--set key=value ...]``

The one entry point for every kind of run: pre-training, and SFT, MPO or PRM when the config has a
``posttrain:`` section (or ``--set posttrain.*``), whose ``posttrain.mode`` picks the objective.
The same command runs under ``torchrun``. The config is loaded and validated (for the world size
torchrun announces) before any process group or model exists. Exit status: 0 done, 2 bad config,
3 too many bad steps in a row, 4 (from the hang watchdog) a rank hung.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from engine.config import Config, ConfigError, load_config, read_yaml, validate_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see examples/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set train.steps=10 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def load_run_config(path: Optional[str], overrides: list[str]) -> tuple[Config, Optional[object]]:
    """(Config, the post-training config or None): a ``posttrain:`` section or a ``posttrain.*``
    override makes it a post-training run. Raises ConfigError."""
    posttrain = "posttrain" in read_yaml(path) or any(o.split("=", 1)[0].strip().split(".")[0] == "posttrain"
                                                      for o in overrides)
    if not posttrain:
        return load_config(path, overrides, validate=False), None
    from engine.posttrain.config import load_posttrain_config

    return load_posttrain_config(path, overrides, validate=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg, pt = load_run_config(args.config, args.overrides)
        validate_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        if pt is not None:
            from engine.posttrain.config import validate_posttrain

            validate_posttrain(pt, cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        from engine.config import config_to_dict

        out = config_to_dict(cfg)
        if pt is not None:
            from engine.posttrain.config import posttrain_to_dict

            out["posttrain"] = posttrain_to_dict(pt)
        print(yaml.safe_dump(out, sort_keys=False))
        return 0
    from engine.trainer import Trainer, TrainingHealthError

    if pt is None:
        trainer = Trainer(cfg)
    else:
        from engine.posttrain.trainer import PostTrainer

        trainer = PostTrainer(cfg, pt)
    try:
        trainer.train()
    except TrainingHealthError as e:
        import logging

        logging.getLogger("engine.trainer").error("stopping: %s; the last good checkpoint stays latest", e)
        return 3
    if trainer.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
