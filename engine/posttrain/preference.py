"""MMPR-style preference pairs: JSONL records ``{image (optional path or list), question, chosen, rejected}``.

``data`` is an InternVL meta JSON (``{name: {root, annotation, repeat_time}}``) or one JSONL file
(images relative to its folder). A pair becomes two tokenised conversations (the question as
the user turn, the response as the assistant turn, supervised) that share one set of image
tiles, so the ViT encodes each image once per pair. The global order and skip accounting are
those of ``engine.data.dataset``: bad records are skipped, counted by reason and logged with
file:line; ``StepLoader`` serves the pairs of each step.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from engine.config import DataConfig, ModelConfig
from engine.data.batch import Sample
from engine.data.conversation import ConversationError, tokenize_conversation
from engine.data.dataset import (Annotation, BadSample, DataError, LineFile, LoadResult, _decode_image, _image_size,
                                 _no_augment, _repeat_pool, load_meta, log)
from engine.data.images import ImageProcessor
from engine.data.seeding import sample_random, sample_seed
from engine.data.tokenizer import Tokenizer, load_tokenizer


@dataclass
class PreferencePair:
    """A chosen and a rejected conversation over the same prompt and image tiles."""

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
        return self.chosen.num_tiles

    @property
    def tile_ids(self) -> None:
        """A pair is always loaded whole (all its tiles), as a ``Sample`` with ``tile_ids=None``."""
        return None

    @property
    def num_tokens(self) -> int:
        return self.chosen.num_tokens + self.rejected.num_tokens


def load_annotations(path: str) -> list[Annotation]:
    """Annotations of a meta JSON, or a single JSONL file whose images live beside it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"preference data {path!r}: file not found")
    if path.endswith(".jsonl"):
        return [Annotation(os.path.basename(path), os.path.dirname(os.path.abspath(path)), LineFile(path))]
    return load_meta(path)


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


class PreferenceDataset:
    """Preference pairs in a seeded, epoch-reshuffled, infinite global order (``repeat_time`` honoured).
    ``try_load(i)`` returns a ``LoadResult`` whose ``sample`` is a ``PreferencePair`` or None."""

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
        self.annotations = load_annotations(path)
        self.src, self.line = _repeat_pool(self.annotations, self.seed)
        if self.src.size == 0:
            raise DataError(f"posttrain.data={path!r} holds no preference records")
        self.stats: dict[str, int] = {}
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        log.info("preference data: %d pairs/epoch from %d annotations", self.src.size, len(self.annotations))

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

    def _tokenize(self, question: str, answer: str, tiles: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        conv = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        ids, labels = tokenize_conversation(conv, self.tokenizer, tiles, self.num_image_token, self.system_prompt)
        if len(ids) > self.max_sample_tokens:
            raise BadSample("too_long", f"{len(ids)} tokens > data.max_sample_tokens={self.max_sample_tokens}")
        return torch.tensor(ids, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64)

    def _load(self, i: int, a: int, line: int, source: str) -> PreferencePair:
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
        tiles = [self.processor.num_tiles(*_image_size(p)) for p in paths]
        try:
            c_ids, c_labels = self._tokenize(question, chosen, tiles)
            r_ids, r_labels = self._tokenize(question, rejected, tiles)
        except ConversationError as e:
            raise BadSample(e.reason, str(e)) from None
        pixel_values = None
        if paths:
            augment = ann.data_augment and self.processor.jpeg_aug_prob > 0
            rng = sample_random(self.seed, i, "image") if augment else None
            processor = self.processor if augment else _no_augment(self.processor)
            chunks = [processor.tiles(_decode_image(p), rng) for p in paths]
            for p, t, n in zip(paths, chunks, tiles):
                if t.shape[0] != n:
                    raise BadSample("corrupt_image", f"{p}: {t.shape[0]} tiles decoded, header said {n}")
            pixel_values = torch.from_numpy(chunks[0] if len(chunks) == 1 else np.concatenate(chunks))
        make = lambda ids, labels: Sample(ids, labels, pixel_values, list(tiles), source, "multimodal", int(i))  # noqa: E731
        return PreferencePair(make(c_ids, c_labels), make(r_ids, r_labels), int(i), source)

    def try_load(self, i: int) -> LoadResult:
        a, line = self.locate(i)
        source = self.annotations[a].lines.source(line)
        try:
            return LoadResult(i, self._load(i, a, line, source), source)
        except BadSample as e:
            return LoadResult(i, None, source, e.reason, e.message)

    def record_skip(self, result: LoadResult, stats: Optional[dict[str, int]] = None) -> None:
        stats = self.stats if stats is None else stats
        stats[result.reason] = stats.get(result.reason, 0) + 1
        log.warning("%s: skipped pair %d (%s): %s", result.source, result.index, result.reason, result.message)

    def load(self, i: int) -> Optional[PreferencePair]:
        r = self.try_load(i)
        if r.sample is None:
            self.record_skip(r)
        return r.sample

    def close(self) -> None:
        for ann in self.annotations:
            ann.lines.close()
