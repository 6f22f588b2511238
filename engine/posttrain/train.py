"""``python -m engine.posttrain.train``: the same entry point as ``python -m engine.train`` (kept for
existing scripts); a config's ``posttrain:`` section selects SFT, MPO or PRM."""

from __future__ import annotations

import sys

from engine.train import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
