"""InternVL image preprocessing: dynamic tiling, JPEG augmentation, ImageNet normalisation.

An image of aspect ratio ``w/h`` is resized to the grid ``(cols, rows)`` of tiles (``min_num`` <=
cols*rows <= ``max_num``) whose ratio ``cols/rows`` is closest to ``w/h``; on a tie the larger grid
wins when the image covers more than half of it. A thumbnail of the whole image follows the
tiles when there is more than one tile and ``use_thumbnail``.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JPEG_QUALITIES = (75, 100)
_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)  # inclusive range of the augmentation's JPEG quality


def target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All grids ``(cols, rows)`` with ``min_num <= cols*rows <= max_num``, by increasing area."""
    if not 1 <= min_num <= max_num:
        raise ValueError(f"tile range min_num={min_num}, max_num={max_num} is invalid")
    grids = {(i, j) for i in range(1, max_num + 1) for j in range(1, max_num + 1) if min_num <= i * j <= max_num}
    return sorted(grids, key=lambda g: (g[0] * g[1], g))


def find_closest_aspect_ratio(aspect_ratio: float, ratios: list[tuple[int, int]], width: int, height: int,
                              image_size: int) -> tuple[int, int]:
    """The grid whose ratio is closest to ``aspect_ratio``; ties go to the larger grid when the
    image area exceeds half the grid's pixel area."""
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for cols, rows in ratios:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def tile_grid(width: int, height: int, min_num: int, max_num: int, image_size: int) -> tuple[int, int]:
    """``(cols, rows)`` of the dynamic tiling of a ``width x height`` image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} is invalid")
    return find_closest_aspect_ratio(width / height, target_ratios(min_num, max_num), width, height, image_size)


def num_tiles(width: int, height: int, min_num: int, max_num: int, image_size: int, use_thumbnail: bool) -> int:
    """Number of tiles (thumbnail included) without touching pixels."""
    cols, rows = tile_grid(width, height, min_num, max_num, image_size)
    n = cols * rows
    return n + 1 if use_thumbnail and n > 1 else n


def dynamic_preprocess(image: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448,
                       use_thumbnail: bool = False) -> list[Image.Image]:
    """Tiles of ``image_size`` squares, row-major, then the thumbnail if any."""
    width, height = image.size
    cols, rows = tile_grid(width, height, min_num, max_num, image_size)
    resized = image.resize((cols * image_size, rows * image_size), Image.Resampling.BICUBIC)
    tiles = []
    for r in range(rows):
        for c in range(cols):
            box = (c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size)
            tiles.append(resized.crop(box))
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def jpeg_degrade(image: Image.Image, quality: int) -> Image.Image:
    """Round-trip through JPEG at ``quality``."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def normalize_array(image: Image.Image, image_size: int) -> np.ndarray:
    """``[3, S, S]`` float32 array: bicubic resize to ``S``, scale to [0, 1], ImageNet mean/std."""
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    x = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0)
    return ((x - _MEAN) / _STD).transpose(2, 0, 1)


def normalize_tile(image: Image.Image, image_size: int) -> torch.Tensor:
    """``normalize_array`` as a contiguous tensor."""
    return torch.from_numpy(np.ascontiguousarray(normalize_array(image, image_size)))


@dataclass
class ImageProcessor:
    """Image -> ``[tiles, 3, S, S]`` float32 tensor, InternVL style."""

    image_size: int = 448
    min_num: int = 1
    max_num: int = 12
    use_thumbnail: bool = True
    jpeg_aug_prob: float = 0.0

    def num_tiles(self, width: int, height: int) -> int:
        return num_tiles(width, height, self.min_num, self.max_num, self.image_size, self.use_thumbnail)

    def augment_plan(self, n: int, rng: random.Random | None) -> list[int | None]:
        """The JPEG quality of each of ``n`` tiles (None: not degraded): each tile is degraded with
        probability ``jpeg_aug_prob`` at a quality drawn from ``rng`` (required when it is > 0)."""
        if self.jpeg_aug_prob <= 0:
            return [None] * n
        if rng is None:
            raise ValueError("JPEG augmentation needs a random generator")
        return [rng.randint(*JPEG_QUALITIES) if rng.random() < self.jpeg_aug_prob else None for _ in range(n)]

    def tiles(self, image: Image.Image, rng: random.Random | None = None,
              wanted: Sequence[int] | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Tile, augment (``augment_plan``) and normalise ``image`` to a ``[tiles, 3, S, S]`` float32
        array (written into ``out`` when given); ``wanted``: only those tile numbers, in increasing order
        (the draws are the whole image's, so the pixels of a tile do not depend on which others are made)."""
        image = image.convert("RGB")
        width, height = image.size
        cols, rows = tile_grid(width, height, self.min_num, self.max_num, self.image_size)
        grid = cols * rows
        total = grid + 1 if self.use_thumbnail and grid > 1 else grid
        quality = self.augment_plan(total, rng)
        keep = range(total) if wanted is None else sorted(set(int(k) for k in wanted))
        if any(not 0 <= k < total for k in keep):
            raise ValueError(f"tiles {list(keep)} asked of an image of {total} tiles")
        S = self.image_size
        resized = image.resize((cols * S, rows * S), Image.Resampling.BICUBIC) if any(k < grid for k in keep) else None
        if out is None:
            out = np.empty((len(keep), 3, S, S), dtype=np.float32)
        elif out.shape != (len(keep), 3, S, S):
            raise ValueError(f"out has shape {out.shape}, the tiles {(len(keep), 3, S, S)}")
        for j, k in enumerate(keep):
            if k < grid:
                r, c = divmod(k, cols)
                tile = resized.crop((c * S, r * S, (c + 1) * S, (r + 1) * S))
            else:
                tile = image.resize((S, S), Image.Resampling.BICUBIC)
            if quality[k] is not None:
                tile = jpeg_degrade(tile, quality[k])
            out[j] = normalize_array(tile, S)
        return out

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """``tiles`` as a float32 tensor ``[tiles, 3, S, S]``."""
        return torch.from_numpy(self.tiles(image, rng))
