"""Cost model of one training step, per module (ViT, LLM, embedding exchange).

All compute coefficients are GPU-seconds of forward plus backward for the whole module on one GPU;
a module split over ``g`` GPUs (tensor or pipeline parallel) is modelled as taking ``1/g`` of that.

- ViT: a fixed cost per 448x448 tile (every tile has the same 1025 tokens), plus a per-rank constant.
- LLM: per packed row, ``a * tokens + b * sum(len_i^2) + c + e * tokens^2``: linear layers scale with
  tokens, varlen attention (flash-attn) is quadratic in each sample's length; a dense attention backend
  with a block-diagonal mask (PyTorch SDPA, the CPU path) costs ``e * tokens^2`` over the whole row
  instead (``e = 0`` for varlen kernels; the calibration finds which applies).
- Exchange: moving a visual embedding costs ``bytes / bandwidth + latency`` per message.

The default coefficients are estimates, not measurements: InternVL3-8B (InternViT-300M + Qwen2.5-7B)
on a GPU sustaining 400 TFLOP/s in bf16, from FLOP counts (6 x params per token, plus attention):
ViT 2.17e12 FLOP per tile, LLM 4.56e10 FLOP per token and 6.0e5 FLOP per (sample length)^2
(6 x 28 layers x 3584 hidden, causal). ``tools/calibrate_cost.py`` replaces them with timings via
:func:`fit_vit`, :func:`fit_llm` and :func:`fit_exchange`.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class CostModel:
    """Coefficients of the step-time model (defaults are FLOP-based estimates, see module doc)."""

    vit_per_tile: float = 5.4e-3  # GPU-seconds per tile, fwd+bwd
    vit_fixed: float = 0.0  # seconds per ViT rank per step, independent of tiles
    llm_per_token: float = 1.14e-4  # GPU-seconds per token in a packed row
    llm_per_token_sq: float = 1.5e-9  # GPU-seconds per (sample length)^2
    llm_per_row: float = 0.0  # GPU-seconds per packed row
    llm_per_row_sq: float = 0.0  # GPU-seconds per (row tokens)^2: dense masked attention over a row
    exchange_bandwidth: float = 25e9  # bytes/s per GPU between data-parallel groups
    exchange_latency: float = 2e-5  # seconds per message
    exchange_bytes_per_token: int = 7168  # projected visual token: hidden 3584 x bf16

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"CostModel.{f.name}={value!r} must be a finite number")
            if value < 0:
                raise ValueError(f"CostModel.{f.name}={value!r} must be >= 0")
        if self.exchange_bandwidth <= 0:
            raise ValueError(f"CostModel.exchange_bandwidth={self.exchange_bandwidth!r} must be > 0")

    # ------------------------------------------------------------------ per-module costs

    def vit_time(self, tiles: int | np.ndarray, gpus: int = 1) -> float | np.ndarray:
        """Seconds for one ViT rank (``gpus`` GPUs in tensor parallel) to encode ``tiles`` tiles."""
        return self.vit_fixed + self.vit_per_tile * tiles / gpus

    def sample_cost(self, tokens: int | np.ndarray) -> float | np.ndarray:
        """GPU-seconds of one sample of ``tokens`` LLM tokens inside a packed row (row terms excluded)."""
        t = np.asarray(tokens, dtype=np.float64)
        cost = self.llm_per_token * t + self.llm_per_token_sq * t * t
        return float(cost) if cost.ndim == 0 else cost

    def row_cost(self, lengths: Sequence[int]) -> float:
        """GPU-seconds of one packed row holding samples of the given lengths."""
        t = np.asarray(lengths, dtype=np.float64)
        return float(self.llm_per_row + self.llm_per_token * t.sum() + self.llm_per_token_sq * (t * t).sum()
                     + self.llm_per_row_sq * t.sum() ** 2)

    def exchange_time(self, nbytes: float, messages: int = 1, gpus: int = 1) -> float:
        """Seconds to move ``nbytes`` in ``messages`` messages through ``gpus`` GPUs in parallel."""
        if nbytes <= 0 and messages <= 0:
            return 0.0
        return messages * self.exchange_latency + nbytes / (self.exchange_bandwidth * gpus)

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        if not isinstance(d, dict):
            raise ValueError(f"cost model must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown cost model key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from e


# ---------------------------------------------------------------------- fitting


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares ``min |a x - b|, x >= 0`` for a few columns (exact, by active sets)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n = a.shape[1]
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    a_s = a / scale
    best, best_res = np.zeros(n), float(np.sum(b * b))
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            x, *_ = np.linalg.lstsq(a_s[:, cols], b, rcond=None)
            if np.any(x < 0):
                continue
            res = float(np.sum((a_s[:, cols] @ x - b) ** 2))
            if res < best_res - 1e-15 * max(1.0, best_res):
                best = np.zeros(n)
                best[list(cols)] = x
                best_res = res
    return best / scale


def _check_seconds(seconds: float, i: int, what: str) -> float:
    s = float(seconds)
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"{what} measurement {i}: seconds={seconds!r} must be finite and >= 0")
    return s


def fit_llm(measurements: Sequence[tuple[Sequence[int], float]]) -> dict[str, float]:
    """Fit ``llm_per_token``, ``llm_per_token_sq``, ``llm_per_row``, ``llm_per_row_sq`` (all >= 0) to timed rows.

    Each measurement is ``(sample lengths in the row, seconds)``; seconds are GPU-seconds, i.e. the
    time measured on ``g`` GPUs times ``g``. Returns the fields to pass to ``dataclasses.replace``.
    """
    if len(measurements) == 0:
        raise ValueError("fit_llm needs at least one measurement")
    rows, y = [], []
    for i, (lengths, seconds) in enumerate(measurements):
        t = np.asarray(list(lengths), dtype=np.float64)
        if t.ndim != 1 or t.size == 0 or np.any(t <= 0):
            raise ValueError(f"LLM measurement {i}: sample lengths {list(lengths)!r} must be positive")
        rows.append([t.sum(), (t * t).sum(), 1.0, t.sum() ** 2])
        y.append(_check_seconds(seconds, i, "LLM"))
    x = nnls(np.array(rows), np.array(y))
    return {"llm_per_token": float(x[0]), "llm_per_token_sq": float(x[1]), "llm_per_row": float(x[2]),
            "llm_per_row_sq": float(x[3])}


def fit_vit(measurements: Sequence[tuple[int, float]]) -> dict[str, float]:
    """Fit ``vit_per_tile`` and ``vit_fixed`` (>= 0) to ``(tiles, GPU-seconds)`` timings."""
    if len(measurements) == 0:
        raise ValueError("fit_vit needs at least one measurement")
    rows, y = [], []
    for i, (tiles, seconds) in enumerate(measurements):
        if isinstance(tiles, bool) or int(tiles) != tiles or tiles <= 0:
            raise ValueError(f"ViT measurement {i}: tiles={tiles!r} must be a positive integer")
        rows.append([float(tiles), 1.0])
        y.append(_check_seconds(seconds, i, "ViT"))
    x = nnls(np.array(rows), np.array(y))
    return {"vit_per_tile": float(x[0]), "vit_fixed": float(x[1])}


def fit_exchange(measurements: Sequence[tuple[int, float]]) -> dict[str, float]:
    """Fit ``exchange_bandwidth`` and ``exchange_latency`` to ``(bytes in one message, seconds)``."""
    if len(measurements) == 0:
        raise ValueError("fit_exchange needs at least one measurement")
    rows, y = [], []
    for i, (nbytes, seconds) in enumerate(measurements):
        if float(nbytes) < 0:
            raise ValueError(f"exchange measurement {i}: bytes={nbytes!r} must be >= 0")
        rows.append([float(nbytes), 1.0])
        y.append(_check_seconds(seconds, i, "exchange"))
    x = nnls(np.array(rows), np.array(y))
    if x[0] <= 0:
        raise ValueError("exchange timings do not grow with bytes; cannot fit a bandwidth")
    return {"exchange_bandwidth": float(1.0 / x[0]), "exchange_latency": float(x[1])}
