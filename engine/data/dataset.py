"""InternVL training data: meta JSON + JSONL conversations, mixed with a plain-text corpus.

The global sample order is map-style and infinite: global index ``i`` is a text document or a
multimodal sample by a fixed interleaving whose text share makes text ``data.lm_ratio`` of all
tokens on average; each stream is reshuffled every epoch from the seed (``repeat_time``
honoured). ``meta(i)`` is cheap (tokens + image headers, no pixels); ``load(i)`` returns the
``Sample`` or None for a bad sample, which is counted by reason and logged with file:line.

Shapes come from the shape index (``engine.data.shape_index``), built once per annotation file and
settings and cached beside the data: a record the index marks bad is skipped without being read,
and a record whose file changed since indexing is skipped as ``stale_index``. ``try_load(i, tiles)``
loads the tokens of a sample and only the pixel tiles asked for (augmentation draws stay those of
the whole sample, so any split of its tiles gives the same pixels).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from engine.config import DataConfig, ModelConfig
from engine.data.batch import Sample
from engine.data import shape_index
from engine.data.conversation import (ConversationError, insert_missing_placeholders, tokenize_conversation,
                                      tokenize_text_document, validate_conversation)
from engine.data.images import ImageProcessor
from engine.data.seeding import sample_random, sample_seed
from engine.data.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("engine.data")

SKIP_REASONS = ("missing_image", "corrupt_image", "malformed", "image_mismatch", "too_long", "stale_index")
TEMPLATE = "internvl2_5"  # the chat template of engine.data.conversation (part of the shape index key)
_SHARE_DEN = 1 << 24  # the text share is held as an exact fraction of this


class DataError(ValueError):
    """The data configuration or a meta file is unusable (raised at start, never per sample)."""


class BadSample(Exception):
    """A sample to skip; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class SampleMeta(NamedTuple):
    """Size of a sample before loading: non-visual tokens and image tiles (0, 0 for a bad sample).
    Its length is ``text_tokens + tiles * num_image_token``."""

    text_tokens: int
    tiles: int


@dataclass
class LoadResult:
    index: int
    sample: Optional[Sample]
    source: str
    reason: str = ""
    message: str = ""
    images_decoded: int = 0  # work done, for the loader's per-step counters
    tiles_decoded: int = 0


class LineFile:
    """Non-blank lines of a text file, by position, read with ``pread`` (thread-safe)."""

    def __init__(self, path: str, index_dir: str = "") -> None:
        """Offsets from the cached line index (``shape_index.line_offsets``; ``index_dir`` as
        ``data.index_dir``), scanned on first use."""
        self.path = path
        self.starts, self.ends, self.numbers = shape_index.line_offsets(path, index_dir)
        self._fd: Optional[int] = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return int(self.starts.size)

    def read(self, k: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        a, b = int(self.starts[k]), int(self.ends[k])
        return os.pread(self._fd, b - a, a)

    def source(self, k: int) -> str:
        return f"{self.path}:{int(self.numbers[k])}"

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


@dataclass
class Annotation:
    """One entry of the meta JSON."""

    name: str
    root: str
    lines: LineFile
    repeat_time: float = 1.0
    data_augment: bool = True


@dataclass
class _Prepared:
    input_ids: list[int]
    labels: list[int]
    image_paths: list[str] = field(default_factory=list)
    image_tiles: list[int] = field(default_factory=list)


def resolve_path(path: str, base_dir: str) -> str:
    """Absolute paths as they are; relative ones against the meta file's folder, else the cwd."""
    if os.path.isabs(path):
        return path
    beside = os.path.join(base_dir, path)
    return beside if os.path.exists(beside) or not os.path.exists(path) else path


def load_meta(meta_path: str, index_dir: str = "") -> list[Annotation]:
    """Parse InternVL's meta JSON ``{name: {root, annotation, repeat_time, ...}}`` (line indexes of the
    annotation files cached in ``index_dir``, "": beside them)."""
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"data.meta_path={meta_path!r}: meta file not found")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"data.meta_path={meta_path!r}: not valid JSON: {e}") from None
    if not isinstance(meta, dict) or not meta:
        raise DataError(f"{meta_path}: expected a non-empty object {{name: {{root, annotation, ...}}}}")
    base = os.path.dirname(os.path.abspath(meta_path))
    out = []
    for name, entry in meta.items():
        if not isinstance(entry, dict):
            raise DataError(f"{meta_path}: entry {name!r} must be an object")
        for key in ("root", "annotation"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise DataError(f"{meta_path}: entry {name!r} lacks a string '{key}'")
        repeat = entry.get("repeat_time", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, (int, float)) or not repeat > 0:
            raise DataError(f"{meta_path}: entry {name!r}: repeat_time={repeat!r} must be a positive number")
        root = resolve_path(entry["root"], base)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{meta_path}: entry {name!r}: root folder not found: {root}")
        annotation = resolve_path(entry["annotation"], base)
        if not os.path.isfile(annotation):
            raise FileNotFoundError(f"{meta_path}: entry {name!r}: annotation file not found: {annotation}")
        lines = LineFile(annotation, index_dir)
        if len(lines) == 0:
            log.warning("%s: entry %r: annotation %s has no records", meta_path, name, annotation)
        out.append(Annotation(name, root, lines, float(repeat), bool(entry.get("data_augment", True))))
    return out


def repeat_pool(annotations: list[Annotation], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(annotation index, line) of every multimodal sample in one epoch: floor(repeat_time) full
    copies plus a seeded subset for the fractional part."""
    srcs, lines = [], []
    for a, ann in enumerate(annotations):
        n = len(ann.lines)
        whole, frac = int(math.floor(ann.repeat_time)), ann.repeat_time - math.floor(ann.repeat_time)
        parts = [np.arange(n, dtype=np.int64)] * whole
        extra = int(round(frac * n))
        if extra:
            rng = np.random.default_rng(sample_seed(seed, a, f"repeat:{ann.name}"))
            parts.append(np.sort(rng.permutation(n)[:extra]))
        for p in parts:
            srcs.append(np.full(p.size, a, dtype=np.int32))
            lines.append(p)
    if not srcs:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    return np.concatenate(srcs), np.concatenate(lines)


class CountedSkips:
    """``load`` and ``record_skip`` over a data set's ``try_load``: a bad item is counted by reason in
    ``stats`` and logged with file:line (``item`` names it in the log)."""

    item = "sample"
    stats: dict[str, int]

    def record_skip(self, result: LoadResult, stats: Optional[dict[str, int]] = None) -> None:
        """Count a skipped item in ``stats`` (default ``self.stats``) and log it with file:line."""
        stats = self.stats if stats is None else stats
        stats[result.reason] = stats.get(result.reason, 0) + 1
        log.warning("%s: skipped %s %d (%s): %s", result.source, self.item, result.index, result.reason,
                    result.message)

    def load(self, i: int):
        """The item at global index ``i``, or None (counted in ``stats`` and logged) when it is bad."""
        r = self.try_load(i)
        if r.sample is None:
            self.record_skip(r)
        return r.sample


class InternVLDataset(CountedSkips):
    """Multimodal conversations (meta JSON) mixed with a text corpus; see the module docstring.

    ``seed`` fixes the order and every per-sample random draw; ``tokenizer`` defaults to
    ``load_tokenizer(data.tokenizer)``; ``ratio_probe`` samples per stream estimate the mean lengths
    that set the text share. ``data.system_prompt`` (optional) replaces InternVL's system prompt.
    """

    def __init__(self, data: DataConfig, model: ModelConfig, seed: int, tokenizer: Optional[Tokenizer] = None,
                 ratio_probe: int = 256) -> None:
        self.data = data
        self.seed = int(seed)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(data.tokenizer)
        self._check_tokenizer(model)
        self.num_image_token = model.num_image_token
        self.max_sample_tokens = int(data.max_sample_tokens)
        self.system_prompt: Optional[str] = getattr(data, "system_prompt", None)
        self.processor = ImageProcessor(model.vision.image_size, data.min_dynamic_patch, data.max_dynamic_patch,
                                        data.use_thumbnail, data.jpeg_aug_prob)
        self.annotations = load_meta(data.meta_path, data.index_dir) if data.meta_path else []
        self.mm_src, self.mm_line = repeat_pool(self.annotations, self.seed)
        self.text: Optional[LineFile] = None
        if data.text_corpus:
            if not os.path.isfile(data.text_corpus):
                raise FileNotFoundError(f"data.text_corpus={data.text_corpus!r}: file not found")
            self.text = LineFile(data.text_corpus, data.index_dir)
        if self.mm_src.size == 0 and self.num_text_docs == 0:
            raise DataError(f"no samples: data.meta_path={data.meta_path!r} and "
                            f"data.text_corpus={data.text_corpus!r} hold no records")
        self.stats: dict[str, int] = {}
        self._perm_lock = threading.Lock()
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self.allocate = functools.partial(np.empty, dtype=np.float32)  # where pixels are made (shape -> array)
        self.tables = self._shape_tables(int(data.index_workers), data.index_dir)
        self.mean_tokens = (0.0, 0.0)  # (multimodal, text) estimates
        self.text_share = self._choose_text_share(float(data.lm_ratio), ratio_probe)
        self._share_num = int(round(self.text_share * _SHARE_DEN))
        log.info("data: %d multimodal samples/epoch from %d annotations, %d text documents; text share %.3f "
                 "of samples (mean tokens: multimodal %.1f, text %.1f) for lm_ratio %.2f",
                 self.mm_src.size, len(self.annotations), self.num_text_docs, self.text_share,
                 self.mean_tokens[0], self.mean_tokens[1], data.lm_ratio)

    # ------------------------------------------------------------------ setup

    def _shape_tables(self, workers: int, index_dir: str) -> dict[tuple[str, int], shape_index.ShapeTable]:
        """The shape index of every annotation file and of the text corpus (cached or built)."""
        workers = min(workers, os.cpu_count() or 1)
        out = {}
        for a, ann in enumerate(self.annotations):
            settings = index_settings("multimodal", self.tokenizer, self.processor, self.system_prompt,
                                      self.num_image_token, ann.root)
            out[("multimodal", a)] = shape_index.load_or_build(
                ann.lines.path, len(ann.lines), settings, lambda k, a=a: self._entry("multimodal", a, k), workers,
                index_dir)
        if self.text is not None:
            out[("text", -1)] = shape_index.load_or_build(
                self.text.path, len(self.text), {"kind": "text", "tokenizer": _tokenizer_digest(self.tokenizer.path)},
                lambda k: self._entry("text", -1, k), workers, index_dir)
        return out

    def _check_tokenizer(self, model: ModelConfig) -> None:
        tok = self.tokenizer
        for key, want, got in (("model.img_context_token_id", model.img_context_token_id, tok.img_context_id),
                               ("model.img_start_token_id", model.img_start_token_id, tok.img_start_id),
                               ("model.img_end_token_id", model.img_end_token_id, tok.img_end_id)):
            if want != got:
                raise DataError(f"{key}={want} but the tokenizer {tok.path} has id {got} for that token")
        if tok.vocab_size > model.llm.vocab_size:
            raise DataError(f"tokenizer {tok.path} has {tok.vocab_size} tokens, more than "
                            f"model.llm.vocab_size={model.llm.vocab_size}")

    @property
    def num_text_docs(self) -> int:
        return 0 if self.text is None else len(self.text)

    @property
    def num_multimodal(self) -> int:
        """Multimodal samples per epoch (repeat_time applied)."""
        return int(self.mm_src.size)

    def _choose_text_share(self, lm_ratio: float, probe: int) -> float:
        """Fraction p of samples that are text so that text is ``lm_ratio`` of tokens on average:
        p*Tt / (p*Tt + (1-p)*Tm) = r  =>  p = r*Tm / (r*Tm + (1-r)*Tt)."""
        if self.num_multimodal == 0:
            return 1.0
        if self.num_text_docs == 0 or lm_ratio <= 0:
            if lm_ratio > 0:
                log.info("data.lm_ratio=%s ignored: no text corpus (data.text_corpus is empty)", lm_ratio)
            return 0.0

        def mean_len(stream: int, n: int, kind: str) -> float:
            perm = self._perm(stream, 0, n)[: max(1, probe)]
            sizes = []
            for j in perm.tolist():
                entry = ("text", -1, j) if kind == "text" else ("multimodal", int(self.mm_src[j]), int(self.mm_line[j]))
                m = self._entry_meta(*entry)
                if m.text_tokens > 0:
                    sizes.append(m.text_tokens + m.tiles * self.num_image_token)
            return float(np.mean(sizes)) if sizes else 0.0

        tm, tt = mean_len(0, self.num_multimodal, "multimodal"), mean_len(1, self.num_text_docs, "text")
        self.mean_tokens = (tm, tt)
        if tm <= 0 or tt <= 0:
            raise DataError(f"cannot mix text and multimodal data: the first {probe} samples of a stream are all "
                            f"bad (mean tokens multimodal {tm}, text {tt})")
        return lm_ratio * tm / (lm_ratio * tm + (1.0 - lm_ratio) * tt)

    def _perm(self, stream: int, epoch: int, n: int) -> np.ndarray:
        key = (stream, epoch)
        with self._perm_lock:
            p = self._perms.get(key)
            if p is None:
                p = np.random.default_rng(sample_seed(self.seed, epoch, f"order:{stream}")).permutation(n)
                if len(self._perms) >= 8:
                    self._perms.pop(next(iter(self._perms)))
                self._perms[key] = p
            return p

    # ------------------------------------------------------------------ order

    def is_text(self, i: int) -> bool:
        return self._split(i)[0]

    def _split(self, i: int) -> tuple[bool, int]:
        """(is text, index within its stream) of global index ``i``."""
        if i < 0:
            raise IndexError(f"sample index {i} is negative")
        before = (i * self._share_num) // _SHARE_DEN  # text slots in [0, i)
        text = ((i + 1) * self._share_num) // _SHARE_DEN > before
        return text, (before if text else i - before)

    def locate(self, i: int) -> tuple[str, int, int]:
        """``(kind, annotation index or -1, line position)`` of global index ``i``."""
        text, k = self._split(i)
        if text:
            epoch, r = divmod(k, self.num_text_docs)
            return "text", -1, int(self._perm(1, epoch, self.num_text_docs)[r])
        epoch, r = divmod(k, self.num_multimodal)
        j = int(self._perm(0, epoch, self.num_multimodal)[r])
        return "multimodal", int(self.mm_src[j]), int(self.mm_line[j])

    def epoch_of(self, i: int) -> int:
        """Epoch of the multimodal stream (of the text stream when there is no multimodal data)."""
        text, k = self._split(i)
        if self.num_multimodal == 0:
            return k // self.num_text_docs
        return (i - (i * self._share_num) // _SHARE_DEN) // self.num_multimodal

    def source(self, i: int) -> str:
        """``file:line`` of global index ``i``."""
        kind, a, line = self.locate(i)
        return self._lines(kind, a).source(line)

    def _lines(self, kind: str, a: int) -> LineFile:
        if kind == "text":
            assert self.text is not None
            return self.text
        return self.annotations[a].lines

    # ------------------------------------------------------------------ samples

    def _prepare(self, kind: str, a: int, line: int) -> _Prepared:
        """Tokens and image headers of one record; raises BadSample. Reads no pixels."""
        raw = self._lines(kind, a).read(line)
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadSample("malformed", f"not valid JSON: {e}") from None
        if not isinstance(rec, dict):
            raise BadSample("malformed", "record is not a JSON object")
        try:
            if kind == "text":
                ids, labels = tokenize_text_document(rec.get("text"), self.tokenizer)
                return _Prepared(ids, labels)
            images = rec.get("image")
            if images is None or images == "":
                images = []
            elif isinstance(images, str):
                images = [images]
            if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
                raise BadSample("malformed", f"'image' must be a path or a list of paths, got {images!r}")
            _, turns = validate_conversation(rec.get("conversations"))
            insert_missing_placeholders(turns, len(images))
            root = self.annotations[a].root
            paths = [os.path.join(root, p) for p in images]
            tiles = [self.processor.num_tiles(*image_size_of(p)) for p in paths]
            ids, labels = tokenize_conversation(rec["conversations"], self.tokenizer, tiles, self.num_image_token,
                                                self.system_prompt)
            return _Prepared(ids, labels, paths, tiles)
        except ConversationError as e:
            raise BadSample(e.reason, str(e)) from None

    def _entry(self, kind: str, a: int, line: int) -> shape_index.Entry:
        """The shape index entry of one record (reads its line and image headers)."""
        try:
            p = self._prepare(kind, a, line)
        except BadSample as e:
            return e.reason, 0, [], e.message
        return "", len(p.input_ids) - sum(p.image_tiles) * self.num_image_token, list(p.image_tiles), ""

    def _entry_meta(self, kind: str, a: int, line: int) -> SampleMeta:
        t = self.tables[(kind, a)]
        if t.status[line]:
            return SampleMeta(0, 0)
        return SampleMeta(int(t.text_tokens[line]), sum(t.tiles(line)))

    def meta(self, i: int) -> SampleMeta:
        """``(text_tokens, tiles)`` of global index ``i`` from the shape index ((0, 0) when it is bad)."""
        return self._entry_meta(*self.locate(i))

    def shape(self, i: int) -> tuple[str, str, int, list[int]]:
        """``(skip reason or "", message, LLM tokens, tiles per image)`` of global index ``i`` from the
        shape index alone (a sample over ``data.max_sample_tokens`` is ``too_long``)."""
        return self._shape_at(*self.locate(i))

    def _shape_at(self, kind: str, a: int, line: int) -> shape_index.Shape:
        return self.tables[(kind, a)].shape(line, self.num_image_token, self.max_sample_tokens)

    def num_tokens(self, i: int) -> int:
        m = self.meta(i)
        return m.text_tokens + m.tiles * self.num_image_token

    def try_load(self, i: int, tiles: Optional[Sequence[int]] = None) -> LoadResult:
        """Load global index ``i``; a bad sample gives ``sample=None`` and its reason (not counted).
        ``tiles``: the sample's tile numbers whose pixels to decode (None: all; empty: tokens only);
        the sample's ``tile_ids`` then names the rows of its ``pixel_values``."""
        kind, a, line = self.locate(i)
        source = self._lines(kind, a).source(line)
        reason, message, indexed_tokens, indexed = self._shape_at(kind, a, line)
        if reason:
            return LoadResult(i, None, source, reason, message)
        decoded = [0, 0]
        try:
            p = self._prepare(kind, a, line)
            check_indexed(len(p.input_ids), len(p.input_ids), p.image_tiles, self.max_sample_tokens, indexed_tokens,
                          indexed)
            augment = kind == "multimodal" and self.annotations[a].data_augment
            pixel_values, tile_ids = load_pixels(self.processor, augment, self.seed, i, p.image_paths, p.image_tiles,
                                                 tiles, self.allocate, decoded)
            sample = Sample(input_ids=torch.tensor(p.input_ids, dtype=torch.int64),
                            labels=torch.tensor(p.labels, dtype=torch.int64), pixel_values=pixel_values,
                            image_tiles=list(p.image_tiles), source=source, kind=kind, index=int(i), tile_ids=tile_ids)
            return LoadResult(i, sample, source, images_decoded=decoded[0], tiles_decoded=decoded[1])
        except BadSample as e:
            return LoadResult(i, None, source, e.reason, e.message, decoded[0], decoded[1])

    def __getitem__(self, i: int) -> Optional[Sample]:
        return self.load(i)

    def close(self) -> None:
        for ann in self.annotations:
            ann.lines.close()
        if self.text is not None:
            self.text.close()


def image_size_of(path: str) -> tuple[int, int]:
    """(width, height) from the image header only."""
    if not os.path.isfile(path):
        raise BadSample("missing_image", f"image not found: {path}")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as e:  # PIL raises many types for bad files
        raise BadSample("corrupt_image", f"cannot read image header {path}: {e}") from None
    if w <= 0 or h <= 0:
        raise BadSample("corrupt_image", f"image {path} has size {w}x{h}")
    return w, h


def decode_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise BadSample("missing_image", f"image not found: {path}") from None
    except Exception as e:
        raise BadSample("corrupt_image", f"cannot decode image {path}: {e}") from None


_DIGESTS: dict[str, str] = {}  # file fingerprint (JSON) -> content digest


def _tokenizer_digest(path: str) -> str:
    """Content hash of the tokenizer's files (memoised by their size and modification time)."""
    key = json.dumps(shape_index.file_fingerprint(path), sort_keys=True) if os.path.exists(path) else path
    if key not in _DIGESTS:
        _DIGESTS[key] = shape_index.content_digest(path) if os.path.exists(path) else f"name:{path}"
    return _DIGESTS[key]


def _no_augment(p: ImageProcessor) -> ImageProcessor:
    return ImageProcessor(p.image_size, p.min_num, p.max_num, p.use_thumbnail, 0.0)


def index_settings(kind: str, tokenizer: Tokenizer, processor: ImageProcessor, system_prompt: Optional[str],
                   num_image_token: int, root: str) -> dict:
    """The settings that shape the records of an annotation file of images under ``root`` (part of its
    shape index key): the tokenizer's contents, the chat template and system prompt, the tiling."""
    p = processor
    return {"kind": kind, "tokenizer": _tokenizer_digest(tokenizer.path), "root": os.path.abspath(root),
            "template": TEMPLATE, "system_prompt": system_prompt, "num_image_token": num_image_token,
            "image_size": p.image_size, "min_dynamic_patch": p.min_num, "max_dynamic_patch": p.max_num,
            "use_thumbnail": p.use_thumbnail}


def check_indexed(tokens: int, longest: int, image_tiles: list[int], max_tokens: int, indexed_tokens: int,
                  indexed_tiles: list[int]) -> None:
    """Raise ``BadSample`` when a record just read is over ``max_tokens`` in its ``longest`` sequence
    (``too_long``) or is not what its shape index says (``stale_index``: the file changed since)."""
    if longest > max_tokens:
        raise BadSample("too_long", f"{longest} tokens > data.max_sample_tokens={max_tokens}")
    if image_tiles != indexed_tiles or tokens != indexed_tokens:
        raise BadSample("stale_index", f"{tokens} tokens, tiles {image_tiles}; the shape index says {indexed_tokens} "
                                       f"tokens, tiles {indexed_tiles} (file changed since indexing)")


def load_pixels(processor: ImageProcessor, augment: bool, seed: int, index: int, paths: Sequence[str],
                image_tiles: Sequence[int], tiles: Optional[Sequence[int]], allocate: Callable[..., np.ndarray],
                decoded: list[int]) -> tuple[Optional[torch.Tensor], Optional[list[int]]]:
    """(pixels of the wanted ``tiles`` of a record's images, their tile numbers or None for all), made in
    ``allocate(shape)``; ``tiles``: the record's tile numbers (None: all; empty: none). Augmentation
    (when ``augment``) draws for every tile of the record from (``seed``, ``index``), decoded or not,
    so any split of its tiles gives the same pixels. Adds the images and tiles decoded to ``decoded``;
    raises ``BadSample`` for an image that does not decode to its indexed tiles."""
    if not paths:
        return None, None
    rng = sample_random(seed, index, "image") if augment and processor.jpeg_aug_prob > 0 else None
    processor = processor if augment else _no_augment(processor)
    want = None if tiles is None else set(int(t) for t in tiles)
    per_image, start = [], 0
    for n in image_tiles:
        per_image.append(list(range(n)) if want is None else [k for k in range(n) if start + k in want])
        start += n
    S = processor.image_size
    out = allocate((sum(len(m) for m in per_image), 3, S, S))  # the loader's workers: shared memory
    ids, start, row = [], 0, 0
    for path, n, mine in zip(paths, image_tiles, per_image):
        if not mine:
            processor.augment_plan(n, rng)  # the draws of this image's tiles, so later images get theirs
        else:
            image = decode_image(path)
            got = processor.num_tiles(*image.size)
            if got != n:
                raise BadSample("corrupt_image", f"{path}: {got} tiles decoded, header said {n}")
            processor.tiles(image, rng, mine, out=out[row:row + len(mine)])
            ids.extend(start + k for k in mine)
            row += len(mine)
            decoded[0] += 1
            decoded[1] += len(mine)
        start += n
    return torch.from_numpy(out), None if tiles is None else ids


def build_dataset(cfg: Any, tokenizer: Optional[Tokenizer] = None) -> InternVLDataset:
    """``InternVLDataset(cfg.data, cfg.model, cfg.train.seed)`` for a full ``Config``."""
    return InternVLDataset(cfg.data, cfg.model, cfg.train.seed, tokenizer)
