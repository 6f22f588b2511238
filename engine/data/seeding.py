"""Per-sample randomness that depends only on (seed, global sample index, stream name).

Neither the rank that loads a sample nor the order of loads changes what it draws, so every
parallel layout sees identical data.
"""

from __future__ import annotations

import hashlib
import random

import torch


def sample_seed(seed: int, index: int, stream: str) -> int:
    """A 63-bit seed from ``(seed, index, stream)``."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(index)}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_random(seed: int, index: int, stream: str) -> random.Random:
    return random.Random(sample_seed(seed, index, stream))


def sample_generator(seed: int, index: int, stream: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(sample_seed(seed, index, stream))
    return g
