"""Synthetic InternVL3-like workloads for the balance simulator and tests.

A sample is text-only (a document, log-normal length) or multimodal with log-normal text and
- a single image: dynamic tiling to 1..``max_dynamic_patch`` tiles + a thumbnail when more than one,
- 2-4 images: each tiled with ``max(1, max_dynamic_patch // images)`` tiles (+ thumbnail),
- a video: 8-32 frames of one tile each.
Images get a realistic aspect ratio (photos, documents, screenshots, banners) and a log-normal size;
the grid follows InternVL's rule: among grids ``(i, j)`` with ``i*j`` in ``[1, max_num]`` take the one
whose ratio ``i/j`` is closest to the image's; on equal distance a larger grid wins if the image area
exceeds half of the grid's area in 448x448 tiles. The text-only share is set so that text-only samples
carry ``lm_ratio`` of all tokens (1:3 language:multimodal), unless given directly.
Samples over ``max_tokens`` have their text truncated (documents) or are drawn again (multimodal).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.balance.layout import SampleShape

# (width / height, weight): photos, documents, screenshots, charts and banners.
ASPECT_RATIOS = ((4 / 3, 0.20), (3 / 4, 0.10), (16 / 9, 0.12), (9 / 16, 0.05), (1.0, 0.15), (3 / 2, 0.08),
                 (2 / 3, 0.05), (1 / 1.414, 0.10), (1.414, 0.03), (1 / 2, 0.05), (1 / 3, 0.04), (3.0, 0.03))
TILE = 448


@dataclass(frozen=True)
class WorkloadConfig:
    lm_ratio: float = 0.25  # share of all tokens in text-only samples
    text_only_share: float | None = None  # share of samples; None: derived from lm_ratio
    single_image: float = 0.6  # relative shares of the multimodal kinds
    multi_image: float = 0.2
    video: float = 0.2
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    images: tuple[int, int] = (2, 4)
    frames: tuple[int, int] = (8, 32)
    text_median: float = 1500.0  # text-only samples: log-normal tokens
    text_sigma: float = 0.8
    mm_text_median: float = 300.0  # text of multimodal samples
    mm_text_sigma: float = 0.8
    image_side_median: float = 1000.0  # longer image side, pixels, log-normal
    image_side_sigma: float = 0.5
    num_image_token: int = 256
    max_tokens: int = 16384

    def __post_init__(self) -> None:
        if not 0.0 <= self.lm_ratio < 1.0:
            raise ValueError(f"lm_ratio={self.lm_ratio} must be in [0, 1)")
        if self.text_only_share is not None and not 0.0 <= self.text_only_share < 1.0:
            raise ValueError(f"text_only_share={self.text_only_share} must be in [0, 1)")
        shares = (self.single_image, self.multi_image, self.video)
        if min(shares) < 0 or sum(shares) <= 0:
            raise ValueError(f"single_image/multi_image/video shares {shares} must be >= 0 with a positive sum")
        if not 1 <= self.images[0] <= self.images[1] or not 1 <= self.frames[0] <= self.frames[1]:
            raise ValueError(f"images={self.images} / frames={self.frames} must be (min, max) with 1 <= min <= max")
        if self.max_dynamic_patch < 1:
            raise ValueError(f"max_dynamic_patch={self.max_dynamic_patch} must be >= 1")
        if self.frames[1] * self.num_image_token >= self.max_tokens:
            raise ValueError(f"videos of {self.frames[1]} frames x {self.num_image_token} tokens do not fit "
                             f"max_tokens={self.max_tokens}")


@functools.lru_cache(maxsize=None)
def _grids(max_num: int) -> tuple[np.ndarray, np.ndarray]:
    pairs = sorted({(i, j) for i in range(1, max_num + 1) for j in range(1, max_num + 1) if i * j <= max_num},
                   key=lambda p: (p[0] * p[1], p))
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def tile_grid(width: np.ndarray, height: np.ndarray, max_num: int) -> tuple[np.ndarray, np.ndarray]:
    """InternVL's dynamic-tiling grid ``(columns, rows)`` for images of the given sizes."""
    width = np.asarray(width, dtype=np.float64)
    height = np.asarray(height, dtype=np.float64)
    aspect, area = width / height, width * height
    cols, rows = _grids(max_num)
    best_c = np.ones(aspect.shape, dtype=np.int64)
    best_r = np.ones(aspect.shape, dtype=np.int64)
    best_diff = np.full(aspect.shape, np.inf)
    for i, j in zip(cols.tolist(), rows.tolist()):
        diff = np.abs(aspect - i / j)
        take = (diff < best_diff) | ((diff == best_diff) & (area > 0.5 * TILE * TILE * i * j))
        best_diff = np.where(diff < best_diff, diff, best_diff)
        best_c = np.where(take, i, best_c)
        best_r = np.where(take, j, best_r)
    return best_c, best_r


def image_tiles(width: np.ndarray, height: np.ndarray, max_num: int, use_thumbnail: bool = True) -> np.ndarray:
    """Tiles per image: the grid's, plus one thumbnail when the grid has more than one tile."""
    c, r = tile_grid(width, height, max_num)
    n = c * r
    return n + (n > 1) if use_thumbnail else n


def _images(rng: np.random.Generator, n: int, cfg: WorkloadConfig) -> tuple[np.ndarray, np.ndarray]:
    ratios = np.array([a for a, _ in ASPECT_RATIOS])
    weights = np.array([w for _, w in ASPECT_RATIOS])
    aspect = ratios[rng.choice(len(ratios), size=n, p=weights / weights.sum())] * np.exp(rng.normal(0, 0.05, n))
    side = np.clip(rng.lognormal(np.log(cfg.image_side_median), cfg.image_side_sigma, n), 64, 8192)
    width = np.where(aspect >= 1, side, side * aspect)
    height = np.where(aspect >= 1, side / aspect, side)
    return width, height


def _lognormal_tokens(rng: np.random.Generator, n: int, median: float, sigma: float) -> np.ndarray:
    return np.maximum(16, np.round(rng.lognormal(np.log(median), sigma, n))).astype(np.int64)


def _draw(rng: np.random.Generator, n: int, cfg: WorkloadConfig, p_text: float) -> list[SampleShape]:
    out: list[SampleShape] = []
    kinds_p = np.array([p_text] + [(1 - p_text) * s for s in (cfg.single_image, cfg.multi_image, cfg.video)])
    kinds_p /= kinds_p.sum()
    while len(out) < n:
        k = n - len(out)
        kind = rng.choice(4, size=k, p=kinds_p)
        text = _lognormal_tokens(rng, k, cfg.text_median, cfg.text_sigma)
        mm_text = _lognormal_tokens(rng, k, cfg.mm_text_median, cfg.mm_text_sigma)
        n_img = np.where(kind == 1, 1, np.where(kind == 2, rng.integers(cfg.images[0], cfg.images[1] + 1, k), 0))
        frames = rng.integers(cfg.frames[0], cfg.frames[1] + 1, k)
        w, h = _images(rng, int(n_img.sum()), cfg)
        per_image = np.empty(int(n_img.sum()), dtype=np.int64)
        owner = np.repeat(np.arange(k), n_img)
        for cnt in np.unique(n_img[n_img > 0]).tolist():
            sel = n_img[owner] == cnt
            per_image[sel] = image_tiles(w[sel], h[sel], max(1, cfg.max_dynamic_patch // cnt), cfg.use_thumbnail)
        starts = np.concatenate([[0], np.cumsum(n_img)])
        for s in range(k):
            if kind[s] == 0:
                out.append(SampleShape(0, int(min(text[s], cfg.max_tokens))))
                continue
            images = (1,) * int(frames[s]) if kind[s] == 3 else tuple(per_image[starts[s]:starts[s + 1]].tolist())
            t = int(mm_text[s])
            visual = sum(images) * cfg.num_image_token
            if visual + 16 > cfg.max_tokens:
                continue  # drawn again
            out.append(SampleShape(sum(images), min(t, cfg.max_tokens - visual), images))
    return out


@functools.lru_cache(maxsize=None)
def text_only_share(cfg: WorkloadConfig) -> float:
    """Share of text-only samples for which they carry ``cfg.lm_ratio`` of the tokens (pilot estimate)."""
    if cfg.text_only_share is not None:
        return cfg.text_only_share
    if cfg.lm_ratio == 0:
        return 0.0
    rng = np.random.default_rng(20240501)
    text = np.mean([s.llm_tokens(cfg.num_image_token) for s in _draw(rng, 20000, cfg, 1.0)])
    mm = np.mean([s.llm_tokens(cfg.num_image_token) for s in _draw(rng, 20000, cfg, 0.0)])
    r = cfg.lm_ratio
    return float(r * mm / (r * mm + (1 - r) * text))


def draw_workload(n: int, cfg: WorkloadConfig | None = None, seed: int | np.random.Generator = 0) -> list[SampleShape]:
    """``n`` samples of the InternVL3-like mix described in the module docstring."""
    cfg = cfg or WorkloadConfig()
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return _draw(rng, n, cfg, text_only_share(cfg))


def read_samples(path: str | Path, max_tokens: int | None = None,
                 num_image_token: int = 256) -> tuple[list[SampleShape], list[str]]:
    """Samples from a JSONL file ``{"tiles", "text_tokens", "images"?}`` per line.

    Returns the samples and one message per skipped line (``"FILE:LINE: reason"``): malformed lines,
    and samples longer than ``max_tokens`` when given. Blank lines are ignored.
    """
    samples: list[SampleShape] = []
    bad: list[str] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                s = SampleShape.from_dict(json.loads(line))
            except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
                bad.append(f"{path}:{lineno}: {e}")
                continue
            if max_tokens is not None and s.llm_tokens(num_image_token) > max_tokens:
                bad.append(f"{path}:{lineno}: {s.llm_tokens(num_image_token)} LLM tokens > max {max_tokens}")
                continue
            samples.append(s)
    return samples, bad
