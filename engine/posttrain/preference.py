"""MMPR-style preference pairs: JSONL records ``{image (optional path or list), question, chosen, rejected}``.

``data`` is an InternVL meta JSON (``{name: {root, annotation, repeat_time}}``) or one JSONL file
(images relative to its folder). A pair becomes two tokenised conversations (the question as
the user turn, the response as the assistant turn, supervised) that share one set of image
tiles, so the ViT encodes each image once per pair. The global order and skip accounting are
those of ``engine.data.dataset``: bad records are skipped, counted by reason and logged with
file:line; ``StepLoader`` serves the pairs of each step.

Shapes come from a shape index of each annotation file (``engine.data.shape_index``, built once and
cached beside the data, as for pre-training): a pair's tokens are its two sequences' (chosen +
rejected), its tiles the shared images'. A pair the index marks bad (malformed line, missing or
empty fields, identical responses, missing or unreadable image headers, a sequence over
``data.max_sample_tokens``) is skipped without being read, and one whose record or image changed
since indexing is skipped as ``stale_index``. ``try_load(i, tiles)`` loads the tokens of a pair and
only the pixel tiles asked for (augmentation draws stay those of the whole pair, so any split of its
tiles gives the same pixels); the pair's ``tile_ids`` then names the rows of its ``pixel_values``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from engine.config import DataConfig, ModelConfig
from engine.data import shape_index
from engine.data.batch import Sample
from engine.data.conversation import ConversationError, tokenize_conversation
from engine.data.dataset import (Annotation, BadSample, CountedSkips, DataError, LineFile, LoadResult, image_size_of,
                                 repeat_pool, check_indexed, index_settings, load_meta, load_pixels, log)
from engine.data.images import ImageProcessor
from engine.data.loader import sample_from_wire, sample_to_wire
from engine.data.seeding import sample_seed
from engine.data.tokenizer import Tokenizer, load_tokenizer


@dataclass
class PreferencePair:
    """A chosen and a rejected conversation over the same prompt and image tiles (one pixel tensor)."""

    chosen: Sample
    rejected: Sample
    index: int
    source: str

    @property
    def pixel_values(self) -> Optional[torch.Tensor]:
        return self.chosen.pixel_values

    @property
    def image_tiles(self) -> list[int]:
        return self.chosen.image_tiles

    @property
    def num_tiles(self) -> int:
        """Tiles of the pair's images (whether or not ``pixel_values`` holds them all)."""
        return self.chosen.num_tiles

    @property
    def tile_ids(self) -> Optional[list[int]]:
        """The tiles ``pixel_values`` holds (None: all, in order), as ``Sample.tile_ids``."""
        return self.chosen.tile_ids

    @property
    def num_tokens(self) -> int:
        return self.chosen.num_tokens + self.rejected.num_tokens

    def to_wire(self, pixels: Callable[[np.ndarray], Any]) -> tuple:
        """The pair as plain arrays for a loader worker's pipe (``engine.data.loader``); ``pixels`` says how
        its pixel array travels (once, for both sequences)."""
        px = self.pixel_values
        bare = [sample_to_wire(dataclasses.replace(s, pixel_values=None), pixels) for s in (self.chosen, self.rejected)]
        return (*bare, None if px is None else pixels(px.numpy()), self.index, self.source)

    @classmethod
    def from_wire(cls, wire: tuple, take: Callable[[Any], torch.Tensor]) -> "PreferencePair":
        """The pair ``to_wire`` sent; ``take`` turns its pixels' wire form into a tensor."""
        chosen, rejected, px, index, source = wire
        pixel_values = None if px is None else take(px)
        both = [dataclasses.replace(sample_from_wire(w, take), pixel_values=pixel_values) for w in (chosen, rejected)]
        return cls(*both, index, source)


@dataclass
class _Prepared:
    """A pair's two token sequences ``(ids, labels)`` and its images' paths and tiles (no pixels)."""

    chosen: tuple[list[int], list[int]]
    rejected: tuple[list[int], list[int]]
    image_paths: list[str] = field(default_factory=list)
    image_tiles: list[int] = field(default_factory=list)

    @property
    def lengths(self) -> tuple[int, int]:
        return len(self.chosen[0]), len(self.rejected[0])


def load_annotations(path: str, index_dir: str = "") -> list[Annotation]:
    """Annotations of a meta JSON, or a single JSONL file whose images live beside it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"preference data {path!r}: file not found")
    if path.endswith(".jsonl"):
        return [Annotation(os.path.basename(path), os.path.dirname(os.path.abspath(path)), LineFile(path, index_dir))]
    return load_meta(path, index_dir)


def _text(rec: dict, key: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str) or not v.strip():
        raise BadSample("malformed", f"'{key}' is missing, empty or not a string")
    return v


def parse_images(rec: dict) -> list[str]:
    images = rec.get("image")
    if images is None or images == "":
        return []
    if isinstance(images, str):
        return [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise BadSample("malformed", f"'image' must be a path or a list of paths, got {images!r}")
    return images


class PreferenceDataset(CountedSkips):
    """Preference pairs in a seeded, epoch-reshuffled, infinite global order (``repeat_time`` honoured).
    ``shape(i)`` comes from the shape index; ``try_load(i, tiles)`` returns a ``LoadResult`` whose
    ``sample`` is a ``PreferencePair`` or None."""

    item = "pair"

    def __init__(self, path: str, data: DataConfig, model: ModelConfig, seed: int,
                 tokenizer: Optional[Tokenizer] = None) -> None:
        self.path = path
        self.seed = int(seed)
        self.text_share = 0.0  # StepLoader state: no text stream here
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(data.tokenizer)
        if self.tokenizer.img_context_id != model.img_context_token_id:
            raise DataError(f"model.img_context_token_id={model.img_context_token_id} but the tokenizer "
                            f"{self.tokenizer.path} has id {self.tokenizer.img_context_id} for <IMG_CONTEXT>")
        self.num_image_token = model.num_image_token
        self.max_sample_tokens = int(data.max_sample_tokens)
        self.system_prompt: Optional[str] = data.system_prompt
        self.processor = ImageProcessor(model.vision.image_size, data.min_dynamic_patch, data.max_dynamic_patch,
                                        data.use_thumbnail, data.jpeg_aug_prob)
        self.annotations = load_annotations(path, data.index_dir)
        self.src, self.line = repeat_pool(self.annotations, self.seed)
        if self.src.size == 0:
            raise DataError(f"posttrain.data={path!r} holds no preference records")
        self.stats: dict[str, int] = {}
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self.allocate = functools.partial(np.empty, dtype=np.float32)  # where pixels are made (shape -> array)
        self.tables = self._shape_tables(int(data.index_workers), data.index_dir)
        log.info("preference data: %d pairs/epoch from %d annotations", self.src.size, len(self.annotations))

    def _shape_tables(self, workers: int, index_dir: str) -> list[shape_index.ShapeTable]:
        """The shape index of every annotation file (cached or built)."""
        workers = min(workers, os.cpu_count() or 1)
        out = []
        for a, ann in enumerate(self.annotations):
            settings = index_settings("preference", self.tokenizer, self.processor, self.system_prompt,
                                      self.num_image_token, ann.root)
            out.append(shape_index.load_or_build(ann.lines.path, len(ann.lines), settings,
                                                 functools.partial(self._entry, a), workers, index_dir, pairs=True))
        return out

    def __len__(self) -> int:
        return int(self.src.size)

    def locate(self, i: int) -> tuple[int, int]:
        """(annotation index, line position) of global index ``i``."""
        if i < 0:
            raise IndexError(f"pair index {i} is negative")
        epoch, r = divmod(int(i), len(self))
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = np.random.default_rng(sample_seed(self.seed, epoch, "order:preference")).permutation(len(self))
                if len(self._perms) >= 4:
                    self._perms.pop(next(iter(self._perms)))
                self._perms[epoch] = perm
        j = int(perm[r])
        return int(self.src[j]), int(self.line[j])

    def source(self, i: int) -> str:
        """``file:line`` of global index ``i``."""
        a, line = self.locate(i)
        return self.annotations[a].lines.source(line)

    def _tokenize(self, question: str, answer: str, tiles: list[int]) -> tuple[list[int], list[int]]:
        conv = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        return tokenize_conversation(conv, self.tokenizer, tiles, self.num_image_token, self.system_prompt)

    def _prepare(self, a: int, line: int) -> _Prepared:
        """Tokens and image headers of one record; raises BadSample. Reads no pixels."""
        ann = self.annotations[a]
        try:
            rec: Any = json.loads(ann.lines.read(line))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadSample("malformed", f"not valid JSON: {e}") from None
        if not isinstance(rec, dict):
            raise BadSample("malformed", "record is not a JSON object")
        question, chosen, rejected = _text(rec, "question"), _text(rec, "chosen"), _text(rec, "rejected")
        if chosen == rejected:
            raise BadSample("malformed", "'chosen' and 'rejected' are identical")
        paths = [os.path.join(ann.root, p) for p in parse_images(rec)]
        tiles = [self.processor.num_tiles(*image_size_of(p)) for p in paths]
        try:
            return _Prepared(self._tokenize(question, chosen, tiles), self._tokenize(question, rejected, tiles), paths,
                             tiles)
        except ConversationError as e:
            raise BadSample(e.reason, str(e)) from None

    def _entry(self, a: int, line: int) -> shape_index.Entry:
        """The shape index entry of one record: (reason, text tokens of both sequences, tiles per image,
        message, text tokens of the longer sequence). Reads its line and image headers."""
        try:
            p = self._prepare(a, line)
        except BadSample as e:
            return e.reason, 0, [], e.message, 0
        image = sum(p.image_tiles) * self.num_image_token
        return "", sum(p.lengths) - 2 * image, list(p.image_tiles), "", max(p.lengths) - image

    def shape(self, i: int) -> shape_index.Shape:
        """``(skip reason or "", message, LLM tokens of both sequences, tiles per image)`` of global index
        ``i`` from the shape index alone (a pair with a sequence over ``data.max_sample_tokens`` is ``too_long``)."""
        a, line = self.locate(i)
        return self.tables[a].shape(line, self.num_image_token, self.max_sample_tokens)

    def try_load(self, i: int, tiles: Optional[Sequence[int]] = None) -> LoadResult:
        """Load global index ``i``; a bad pair gives ``sample=None`` and its reason (not counted).
        ``tiles``: the pair's tile numbers whose pixels to decode (None: all; empty: tokens only)."""
        a, line = self.locate(i)
        ann = self.annotations[a]
        source = ann.lines.source(line)
        reason, message, indexed_tokens, indexed = self.tables[a].shape(line, self.num_image_token,
                                                                        self.max_sample_tokens)
        if reason:
            return LoadResult(i, None, source, reason, message)
        decoded = [0, 0]
        try:
            p = self._prepare(a, line)
            check_indexed(sum(p.lengths), max(p.lengths), p.image_tiles, self.max_sample_tokens, indexed_tokens,
                          indexed)
            pixel_values, tile_ids = load_pixels(self.processor, ann.data_augment, self.seed, i, p.image_paths,
                                                 p.image_tiles, tiles, self.allocate, decoded)
        except BadSample as e:
            return LoadResult(i, None, source, e.reason, e.message, decoded[0], decoded[1])
        chosen, rejected = (Sample(torch.tensor(ids, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64),
                                   pixel_values, list(p.image_tiles), source, "multimodal", int(i), tile_ids)
                            for ids, labels in (p.chosen, p.rejected))
        return LoadResult(i, PreferencePair(chosen, rejected, int(i), source), source, images_decoded=decoded[0],
                          tiles_decoded=decoded[1])

    def close(self) -> None:
        for ann in self.annotations:
            ann.lines.close()
