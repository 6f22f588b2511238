"""The shape index: every record's size without its pixels, computed once and cached beside the data.

For each line of an annotation file (or of the text corpus) the index holds whether the record is
usable (else its skip reason and message), its non-visual token count and the tiles of each of its
images (dynamic tiling needs only the image's size, which its header gives). A preference pair is
two sequences over the same images (chosen, rejected): its index also holds the text tokens of the
longer one, and its token count is both sequences' (each holds the images' context tokens).
Placement and the text share are decided from the index alone; loading then checks that the record
still has the indexed shape (a file changed after indexing is skipped and counted as ``stale_index``).

Cache: ``<annotation>.<key>.shapes.npz`` beside the annotation file (or in ``data.index_dir``), where
``key`` hashes the annotation file (path, size, modification time) and every setting that changes a
record's shape: the tokenizer's files, the chat template and system prompt, the image root, the
image size, ``min/max_dynamic_patch``, the thumbnail and the tokens per tile. A changed file or
setting gives another key, so the index is rebuilt; a missing, unreadable or inconsistent cache
file is (re)built with a warning, never trusted. The build runs in ``workers`` processes with a progress bar.

Line index: the byte offsets of every record of a line file, cached the same way (``line_offsets``), so
that only the first reader scans a large annotation file; every other rank reads the offsets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

log = logging.getLogger("engine.data")

FORMAT = "engine-shape-index-1"
REASONS = ("", "missing_image", "corrupt_image", "malformed", "image_mismatch", "too_long", "stale_index")
IN_PROCESS_BELOW = 4096  # records: smaller files are indexed in this process (no pool start-up)
CHUNK = 256  # records per worker task

Entry = tuple  # (reason or "", text tokens, tiles per image, message[, a pair's longer sequence's text tokens])
Shape = tuple[str, str, int, list[int]]  # (reason or "", message, LLM tokens, tiles per image)


@dataclass
class ShapeTable:
    """Shapes of the records of one line file, by line position."""

    status: np.ndarray  # [n] int8: index into REASONS (0: usable)
    text_tokens: np.ndarray  # [n] int32: tokens besides the image context tokens
    offsets: np.ndarray  # [n+1] int64 into ``image_tiles``
    image_tiles: np.ndarray  # [images] int32: tiles of each image, record by record
    messages: dict[int, str]  # line position -> why the record is unusable
    longest: Optional[np.ndarray] = None  # [n] int32, a table of pairs only: text tokens of the longer sequence

    def __len__(self) -> int:
        return int(self.status.size)

    def reason(self, k: int) -> str:
        return REASONS[int(self.status[k])]

    def tiles(self, k: int) -> list[int]:
        return self.image_tiles[int(self.offsets[k]):int(self.offsets[k + 1])].tolist()

    def shape(self, k: int, num_image_token: int, max_tokens: int) -> Shape:
        """``(skip reason or "", message, LLM tokens, tiles per image)`` of record ``k``: its text tokens
        plus the image context tokens of each of its sequences; ``too_long`` when its (longest) sequence
        has more than ``max_tokens`` (``data.max_sample_tokens``)."""
        if self.status[k]:
            return self.reason(k), self.messages.get(k, ""), 0, []
        tiles = self.tiles(k)
        image = sum(tiles) * num_image_token
        if self.longest is None:
            n = longest = int(self.text_tokens[k]) + image
        else:
            n, longest = int(self.text_tokens[k]) + 2 * image, int(self.longest[k]) + image
        if longest > max_tokens:
            return "too_long", f"{longest} tokens > data.max_sample_tokens={max_tokens}", n, tiles
        return "", "", n, tiles

    @classmethod
    def from_entries(cls, entries: Sequence[Entry], pairs: bool = False) -> "ShapeTable":
        status = np.asarray([REASONS.index(e[0]) for e in entries], dtype=np.int8)
        counts = np.asarray([len(e[2]) for e in entries], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        tiles = np.asarray([t for e in entries for t in e[2]], dtype=np.int32)
        longest = np.asarray([e[4] for e in entries], dtype=np.int32) if pairs else None
        return cls(status, np.asarray([e[1] for e in entries], dtype=np.int32), offsets, tiles,
                   {k: e[3] for k, e in enumerate(entries) if e[0]}, longest)


def file_fingerprint(path: str) -> dict:
    """Identity of a file (or of every file under a folder): path, size and modification time."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
        return {"dir": path, "files": [file_fingerprint(f) for f in files]}
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def content_digest(path: str) -> str:
    """SHA-256 of a file's bytes, or of every file under a folder (names and bytes)."""
    h = hashlib.sha256()
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs) if os.path.isdir(path) else [path]
    for f in files:
        h.update(os.path.relpath(f, path).encode() if f != path else b"")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def index_key(lines_path: str, settings: dict) -> str:
    """Hex key of an index: the line file's identity and the settings that shape its records."""
    blob = json.dumps({"format": FORMAT, "file": file_fingerprint(lines_path), "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def index_path(lines_path: str, key: str, index_dir: str = "", kind: str = "shapes") -> str:
    """``<file>.<key16>.<kind>.npz`` beside the line file, or in ``index_dir``."""
    folder = index_dir or os.path.dirname(os.path.abspath(lines_path))
    return os.path.join(folder, f"{os.path.basename(lines_path)}.{key[:16]}.{kind}.npz")


def write_npz(path: str, **arrays: np.ndarray) -> None:
    """Write atomically (a reader sees the old file, the new one, or none)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def save_table(path: str, table: ShapeTable, key: str) -> None:
    pairs = {} if table.longest is None else {"longest": table.longest}
    write_npz(path, status=table.status, text_tokens=table.text_tokens, offsets=table.offsets,
              image_tiles=table.image_tiles, **pairs,
              meta=np.frombuffer(json.dumps({"key": key, "messages": table.messages}).encode(), dtype=np.uint8))


def read_table(path: str, key: str, n: int, pairs: bool = False) -> ShapeTable:
    """The cached table, or ValueError when it is not the index of ``key`` with ``n`` records (of
    preference pairs when ``pairs``)."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        if pairs != ("longest" in z.files):
            raise ValueError("it is not an index of " + ("preference pairs" if pairs else "single records"))
        table = ShapeTable(z["status"], z["text_tokens"], z["offsets"], z["image_tiles"],
                           {int(k): str(v) for k, v in meta.get("messages", {}).items()},
                           z["longest"] if pairs else None)
    if meta.get("key") != key:
        raise ValueError(f"its key {str(meta.get('key'))[:16]} is not {key[:16]}")
    if len(table) != n or table.text_tokens.size != n or table.offsets.size != n + 1 or (
            pairs and table.longest.size != n):
        raise ValueError(f"it holds {len(table)} records, the file has {n}")
    if table.offsets[0] != 0 or table.offsets[-1] != table.image_tiles.size or np.any(np.diff(table.offsets) < 0):
        raise ValueError("its image offsets are inconsistent")
    if table.status.min(initial=0) < 0 or table.status.max(initial=0) >= len(REASONS):
        raise ValueError("it has unknown status codes")
    return table


LINES_FORMAT = "engine-line-index-1"


def scan_lines(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start byte, end byte, 1-based line number) of every non-blank line of a text file: one pass."""
    starts, ends, numbers = [], [], []
    pos = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                starts.append(pos)
                ends.append(pos + len(line))
                numbers.append(number)
            pos += len(line)
    return (np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64),
            np.asarray(numbers, dtype=np.int64))


def line_offsets(path: str, index_dir: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``scan_lines(path)``, cached as ``<file>.<key>.lines.npz`` beside it (or in ``index_dir``) with
    the file's identity (path, size, modification time) as key: the first reader (rank 0, under
    ``leader_first``) scans the file, the others read the offsets instead of the whole file. A
    missing, foreign or inconsistent cache is rescanned (and rewritten when the folder is writable)."""
    key = index_key(path, {"lines": LINES_FORMAT})
    cache = index_path(path, key, index_dir, "lines")
    if os.path.exists(cache):
        try:
            with np.load(cache, allow_pickle=False) as z:
                starts, ends, numbers = z["starts"], z["ends"], z["numbers"]
                stored = z["key"].tobytes().decode()
            if stored != key or not starts.size == ends.size == numbers.size:
                raise ValueError("it is the line index of another file")
            if starts.size and (np.any(ends <= starts) or np.any(starts[1:] < ends[:-1])
                                or int(ends[-1]) > os.path.getsize(path)):
                raise ValueError("its offsets are inconsistent")
            return starts, ends, numbers
        except Exception as e:  # any damage: rescan
            log.warning("line index %s is unusable (%s): rescanning %s", cache, e, path)
    starts, ends, numbers = scan_lines(path)
    try:
        write_npz(cache, starts=starts, ends=ends, numbers=numbers, key=np.frombuffer(key.encode(), dtype=np.uint8))
    except OSError as e:
        log.info("line index of %s not cached (%s)", path, e)
    return starts, ends, numbers


_BUILD: Optional[Callable[[int], Entry]] = None  # the entry function of the pool being built (inherited by fork)


def _build_chunk(bounds: tuple[int, int], entry: Optional[Callable[[int], Entry]] = None) -> list[Entry]:
    entry = entry or _BUILD
    assert entry is not None
    return [entry(k) for k in range(*bounds)]


def build_table(n: int, entry: Callable[[int], Entry], workers: int, label: str, pairs: bool = False) -> ShapeTable:
    """Entries ``entry(0..n-1)`` in ``workers`` forked processes (in this one when few or ``workers`` is 0);
    ``pairs``: entries of preference pairs (with their longer sequence's text tokens)."""
    global _BUILD
    t0 = time.perf_counter()
    chunks = [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
    from tqdm import tqdm

    bar = tqdm(total=n, desc=f"shape index {label}", unit="rec", disable=None, leave=False)
    entries: list[Entry] = []
    try:
        if workers > 0 and n >= IN_PROCESS_BELOW and "fork" in multiprocessing.get_all_start_methods():
            _BUILD = entry
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                for part in pool.map(_build_chunk, chunks):
                    entries.extend(part)
                    bar.update(len(part))
        else:
            for c in chunks:
                entries.extend(_build_chunk(c, entry))
                bar.update(c[1] - c[0])
    finally:
        _BUILD = None
        bar.close()
    log.info("shape index %s: %d records in %.1f s (%d worker processes)", label, n, time.perf_counter() - t0,
             workers if n >= IN_PROCESS_BELOW else 0)
    return ShapeTable.from_entries(entries, pairs)


def load_or_build(lines_path: str, n: int, settings: dict, entry: Callable[[int], Entry], workers: int = 0,
                  index_dir: str = "", pairs: bool = False) -> ShapeTable:
    """The index of a line file of ``n`` records (preference pairs when ``pairs``): from its cache when
    valid, else built (and cached when the folder is writable)."""
    key = index_key(lines_path, settings)
    path = index_path(lines_path, key, index_dir)
    if os.path.exists(path):
        try:
            return read_table(path, key, n, pairs)
        except Exception as e:  # any damage: rebuild
            log.warning("shape index %s is unusable (%s): rebuilding it", path, e)
    else:
        log.warning("no shape index %s (first use of this file with these settings, or it was removed): "
                    "building it", path)
    table = build_table(n, entry, workers, os.path.basename(lines_path), pairs)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_table(path, table, key)
    except OSError as e:
        log.warning("shape index for %s not cached (%s): set data.index_dir to a writable folder", lines_path, e)
    return table
