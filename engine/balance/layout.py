"""Inputs of the balancer: the parallel layout of one step and the shape of each sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


@dataclass(frozen=True)
class Layout:
    """Parallel layout of the ViT and the LLM over ``world`` GPUs.

    ViT ranks: ``world // vit_tp`` data-parallel replicas. LLM: ``llm_dp = world // (llm_tp * llm_pp)``
    data-parallel replicas, each running ``microbatches`` microbatches of packed rows of at most
    ``max_packed_tokens`` tokens. Global ranks are ordered tp fastest, then dp, then pp (Megatron's
    default), so ViT rank ``v`` (global ranks ``v*vit_tp ...``) lives in LLM dp group ``vit_home(v)``
    (and, when ``vit_tp > llm_tp``, in all of ``vit_groups(v)``).
    """

    world: int
    llm_tp: int = 1
    llm_pp: int = 1
    vit_tp: int = 1
    microbatches: int = 1
    max_packed_tokens: int = 16384
    num_image_token: int = 256

    def __post_init__(self) -> None:
        for name in ("world", "llm_tp", "llm_pp", "vit_tp", "microbatches", "max_packed_tokens", "num_image_token"):
            _positive_int(getattr(self, name), f"Layout.{name}")
        if self.world % (self.llm_tp * self.llm_pp):
            raise ValueError(
                f"Layout.world={self.world} is not divisible by llm_tp*llm_pp={self.llm_tp}*{self.llm_pp}")
        if self.world % self.vit_tp:
            raise ValueError(f"Layout.world={self.world} is not divisible by vit_tp={self.vit_tp}")

    @property
    def vit_ranks(self) -> int:
        return self.world // self.vit_tp

    @property
    def llm_dp(self) -> int:
        return self.world // (self.llm_tp * self.llm_pp)

    def vit_home(self, vit_rank: int) -> int:
        """LLM data-parallel rank of the first GPU of ViT rank ``vit_rank``."""
        return (vit_rank * self.vit_tp // self.llm_tp) % self.llm_dp

    def vit_groups(self, vit_rank: int) -> frozenset[int]:
        """LLM data-parallel ranks of all GPUs of ViT rank ``vit_rank`` (several when vit_tp > llm_tp)."""
        first = vit_rank * self.vit_tp
        return frozenset((g // self.llm_tp) % self.llm_dp for g in range(first, first + self.vit_tp))

    @classmethod
    def from_config(cls, cfg: Any, world: int) -> "Layout":
        """Layout from the engine config (``cfg.parallel``, ``cfg.data``, ``cfg.model``) for ``world`` GPUs.

        Head parallelism splits a replica's work like tensor parallelism (the engine's grids order ranks
        tp, hp, dp, pp), so ``llm_tp = tp * hp`` and ``vit_tp = tp * hp`` of each module.
        """
        llm, vit = cfg.parallel.llm, cfg.parallel.vit
        return cls(world=world, llm_tp=llm.tp * getattr(llm, "hp", 1), llm_pp=llm.pp,
                   vit_tp=vit.tp * getattr(vit, "hp", 1), microbatches=llm.microbatches,
                   max_packed_tokens=cfg.data.max_packed_tokens, num_image_token=cfg.model.num_image_token)


@dataclass(frozen=True)
class SampleShape:
    """What the balancer needs of a sample: its tiles and its text tokens (``images``: tiles per image)."""

    tiles: int
    text_tokens: int
    images: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _positive_int(self.tiles, "tiles", 0)
        _positive_int(self.text_tokens, "text_tokens", 0)
        object.__setattr__(self, "images", tuple(self.images))
        for t in self.images:
            _positive_int(t, "images[]", 1)
        if self.images and sum(self.images) != self.tiles:
            raise ValueError(f"images={list(self.images)} sum to {sum(self.images)} tiles, but tiles={self.tiles}")
        if self.tiles + self.text_tokens == 0:
            raise ValueError("a sample needs at least one tile or one text token")

    def llm_tokens(self, num_image_token: int = 256) -> int:
        return self.text_tokens + self.tiles * num_image_token

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"tiles": self.tiles, "text_tokens": self.text_tokens}
        if self.images:
            d["images"] = list(self.images)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "SampleShape":
        if not isinstance(d, dict):
            raise ValueError(f"a sample must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {"tiles", "text_tokens", "images"})
        if unknown:
            raise ValueError(f"unknown sample key(s) {unknown}")
        for key in ("tiles", "text_tokens"):
            if key not in d:
                raise ValueError(f"sample is missing {key!r}")
        images = d.get("images", ())
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"images={images!r} must be a list of tiles per image")
        return cls(tiles=d["tiles"], text_tokens=d["text_tokens"], images=tuple(images))

    @classmethod
    def from_tokens(cls, llm_tokens: int, image_tiles: Sequence[int], num_image_token: int = 256) -> "SampleShape":
        """Shape of a tokenised sample whose ``llm_tokens`` already include the image context tokens."""
        tiles = int(sum(image_tiles))
        text = int(llm_tokens) - tiles * num_image_token
        if text < 0:
            raise ValueError(f"sample of {llm_tokens} tokens cannot hold {tiles} tiles x {num_image_token} tokens")
        return cls(tiles=tiles, text_tokens=text, images=tuple(int(t) for t in image_tiles))


def sample_arrays(samples: Sequence[SampleShape], layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """``(tiles, llm tokens)`` arrays; raises if a sample cannot fit in one packed row."""
    n = len(samples)
    tiles = np.fromiter((s.tiles for s in samples), dtype=np.int64, count=n)
    text = np.fromiter((s.text_tokens for s in samples), dtype=np.int64, count=n)
    tokens = text + tiles * layout.num_image_token
    over = np.flatnonzero(tokens > layout.max_packed_tokens)
    if over.size:
        i = int(over[0])
        raise ValueError(
            f"sample {i} has {int(tokens[i])} LLM tokens ({int(text[i])} text + {int(tiles[i])} tiles x "
            f"{layout.num_image_token}), above max_packed_tokens={layout.max_packed_tokens}"
            + (f" ({over.size} samples over the limit)" if over.size > 1 else ""))
    return tiles, tokens
