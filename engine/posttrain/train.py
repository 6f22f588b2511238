"""``python -m engine.posttrain.train --config examples/configs/mpo_tiny.yaml [--set key=value ...]``

SFT, MPO or PRM training (``posttrain.mode``); runs as one process or under ``torchrun``. The
config (engine sections plus ``posttrain:``) is validated before any process group or model exists.
"""

from __future__ import annotations

import argparse
import os
import sys

from engine.config import ConfigError, validate_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.posttrain.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config with a posttrain: section (see examples/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set posttrain.mpo.beta=0.1 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from engine.posttrain.config import load_posttrain_config, posttrain_to_dict, validate_posttrain

    args = parse_args(argv)
    try:
        cfg, pt = load_posttrain_config(args.config, args.overrides, validate=False)
        validate_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        validate_posttrain(pt, cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        from engine.config import config_to_dict

        print(yaml.safe_dump({**config_to_dict(cfg), "posttrain": posttrain_to_dict(pt)}, sort_keys=False))
        return 0
    from engine.posttrain.trainer import run

    run(cfg, pt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
