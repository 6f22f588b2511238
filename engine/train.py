"""``python -m engine.train --config examples/configs/tiny.yaml [--set key=value ...]``

The same entry point runs under ``torchrun``. The config is loaded and validated (for the
world size torchrun announces) before any process group or model exists.
"""

from __future__ import annotations

import argparse
import os
import sys

from engine.config import ConfigError, load_config, validate_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see examples/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set train.steps=10 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, validate=False)
        validate_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        from engine.config import config_to_dict

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    from engine.trainer import Trainer, TrainingHealthError

    trainer = Trainer(cfg)
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
