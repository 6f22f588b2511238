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

    def tiles(self, image: Image.Image, rng: random.Random | None = None) -> np.ndarray:
        """Tile and normalise ``image`` to a ``[tiles, 3, S, S]`` float32 array; each tile is
        JPEG-degraded with probability ``jpeg_aug_prob`` at a quality drawn from ``rng`` (required
        when the probability is > 0)."""
        tiles = dynamic_preprocess(image.convert("RGB"), self.min_num, self.max_num, self.image_size,
                                   self.use_thumbnail)
        if self.jpeg_aug_prob > 0 and rng is None:
            raise ValueError("JPEG augmentation needs a random generator")
        out = np.empty((len(tiles), 3, self.image_size, self.image_size), dtype=np.float32)
        for k, tile in enumerate(tiles):
            if self.jpeg_aug_prob > 0 and rng.random() < self.jpeg_aug_prob:
                tile = jpeg_degrade(tile, rng.randint(*JPEG_QUALITIES))
            out[k] = normalize_array(tile, self.image_size)
        return out

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """``tiles`` as a float32 tensor ``[tiles, 3, S, S]``."""
        return torch.from_numpy(self.tiles(image, rng))
