"""The shape index: cached beside the data, rebuilt when a file or setting changes or the cache is
damaged, and loading that finds a record changed since indexing skips and counts it."""

from __future__ import annotations

import glob
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import DataConfig
from engine.data import shape_index
from engine.data.dataset import InternVLDataset
from engine.data.loader import StepLoader
from engine.data.tokenizer import load_tokenizer
from engine.models.presets import preset_model_config
from tools.make_synthetic_data import generate

MODEL = preset_model_config("tiny")


@pytest.fixture
def synth(tmp_path):
    generate(str(tmp_path), num_samples=48, num_text_docs=24, seed=5)
    return tmp_path


def dcfg(synth, **kw) -> DataConfig:
    base = dict(meta_path=str(synth / "meta.json"), text_corpus=str(synth / "text.jsonl"),
                tokenizer=str(synth / "tokenizer.model"), max_dynamic_patch=4)
    base.update(kw)
    return DataConfig(**base)


def dataset(synth, **kw) -> InternVLDataset:
    return InternVLDataset(dcfg(synth, **kw), MODEL, seed=3, tokenizer=load_tokenizer(str(synth / "tokenizer.model")))


def index_files(folder) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(str(folder), "*.shapes.npz")))


def never_build(*args, **kwargs):
    raise AssertionError("the shape index was rebuilt")


def test_index_is_cached_beside_the_data_and_matches_the_records(synth, monkeypatch):
    ds = dataset(synth)
    files = index_files(synth)
    assert len(files) == 2 and files[0].startswith("text.jsonl.") and files[1].startswith("train.jsonl.")
    for (kind, a), table in ds.tables.items():  # every entry is what reading the record gives
        for k in range(len(table)):
            reason, text_tokens, tiles, message = ds._entry(kind, a, k)
            assert (table.reason(k), table.tiles(k)) == (reason, tiles)
            assert int(table.text_tokens[k]) == text_tokens and table.messages.get(k, "") == message
    monkeypatch.setattr(shape_index, "build_table", never_build)
    again = dataset(synth)  # read from the cache, not rebuilt
    assert [again.shape(i) for i in range(200)] == [ds.shape(i) for i in range(200)]
    assert again.text_share == ds.text_share


def test_changed_setting_or_file_rebuilds(synth, monkeypatch):
    dataset(synth)
    first = set(index_files(synth))
    dataset(synth, max_dynamic_patch=2)  # another tiling: another index for the annotation
    second = set(index_files(synth)) - first
    assert len(second) == 1 and next(iter(second)).startswith("train.jsonl.")
    dataset(synth, system_prompt="You are a test.")
    assert len(set(index_files(synth)) - first - second) == 1
    # the tokenizer is keyed by its content: the same file elsewhere reuses the index
    copy = synth / "copy.model"
    copy.write_bytes((synth / "tokenizer.model").read_bytes())
    monkeypatch.setattr(shape_index, "build_table", never_build)
    InternVLDataset(dcfg(synth, tokenizer=str(copy)), MODEL, seed=3, tokenizer=load_tokenizer(str(copy)))
    monkeypatch.undo()
    # an edited annotation file gets a new index with its new record
    with open(synth / "train.jsonl") as f:
        lines = f.readlines()
    with open(synth / "train.jsonl", "a") as f:
        f.write(lines[0])
    ds = dataset(synth)
    assert len(ds.tables[("multimodal", 0)]) == len(lines) + 1


def test_damaged_index_is_rebuilt_with_a_warning(synth, caplog):
    ds = dataset(synth)
    want = [ds.shape(i) for i in range(100)]
    path = glob.glob(str(synth / "train.jsonl.*.shapes.npz"))[0]
    with open(path, "r+b") as f:
        f.truncate(100)
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        again = dataset(synth)
    assert any("unusable" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert [again.shape(i) for i in range(100)] == want
    # a readable file of another index under this name (wrong key, wrong length) is not trusted either
    other = glob.glob(str(synth / "text.jsonl.*.shapes.npz"))[0]
    os.replace(other, path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        again = dataset(synth)
    assert any("is not" in r.getMessage() for r in caplog.records)
    assert [again.shape(i) for i in range(100)] == want


def test_index_dir_and_an_unwritable_cache(synth, tmp_path_factory, monkeypatch, caplog):
    where = tmp_path_factory.mktemp("indexes")
    dataset(synth, index_dir=str(where))
    assert len(index_files(where)) == 2 and not index_files(synth)

    def read_only(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(shape_index, "save_table", read_only)
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        ds = dataset(synth)  # still works, from an index in memory
    assert any("not cached" in r.getMessage() and "data.index_dir" in r.getMessage() for r in caplog.records)
    assert ds.load(0) is not None


def test_parallel_build_equals_the_in_process_build(synth, monkeypatch):
    local = dataset(synth, index_workers=0).tables
    for p in glob.glob(str(synth / "*.shapes.npz")):
        os.remove(p)
    monkeypatch.setattr(shape_index, "IN_PROCESS_BELOW", 0)
    forked = dataset(synth, index_workers=2).tables
    for key, table in local.items():
        other = forked[key]
        for name in ("status", "text_tokens", "offsets", "image_tiles"):
            assert np.array_equal(getattr(table, name), getattr(other, name)), (key, name)
        assert table.messages == other.messages


def first_multimodal(ds, start: int, tiles_at_least: int = 1) -> int:
    return next(i for i in range(start, start + 400) if not ds.is_text(i) and ds.meta(i).tiles >= tiles_at_least)


def image_of(ds, i: int) -> str:
    kind, a, line = ds.locate(i)
    rec = json.loads(ds.annotations[a].lines.read(line))
    image = rec["image"] if isinstance(rec["image"], str) else rec["image"][0]
    return os.path.join(ds.annotations[a].root, image)


def test_changed_and_truncated_images_are_skipped_and_counted(synth, caplog):
    ds = dataset(synth)
    loader = StepLoader(ds, global_batch=16)
    stale = first_multimodal(ds, 0)
    cut = first_multimodal(ds, stale + 1)
    w, h = Image.open(image_of(ds, stale)).size
    Image.new("RGB", (4 * max(w, h), max(8, min(w, h) // 2)), (9, 9, 9)).save(image_of(ds, stale))  # other tiling
    data = open(image_of(ds, cut), "rb").read()
    with open(image_of(ds, cut), "wb") as f:
        f.write(data[: len(data) // 2])  # the header still reads; the pixels do not
    assert ds.try_load(cut, ()).sample is not None  # tokens only: nothing to notice
    assert ds.try_load(cut).reason == "corrupt_image"
    assert ds.try_load(stale, ()).reason == "stale_index"
    batch = loader.next_batch()
    assert stale in batch.indices and cut in batch.indices
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        found = batch.load({pos: None for pos in range(len(batch))})
        loader.record_load_skips(batch, {p: (r.reason, r.message) for p, r in found.items()})
    assert loader.stats == {"stale_index": 1, "corrupt_image": 1} and loader.skipped_total() == 2
    assert stale not in batch.indices and cut not in batch.indices and len(batch) == 14
    assert all(s is not None for s in batch.samples())
    messages = [r.getMessage() for r in caplog.records]
    assert any(ds.source(stale) in m and "(stale_index)" in m and "file changed" in m for m in messages)
    assert any(ds.source(cut) in m and "(corrupt_image)" in m for m in messages)


def test_any_split_of_a_samples_tiles_gives_the_same_pixels(synth):
    ds = dataset(synth, jpeg_aug_prob=0.5)
    i = first_multimodal(ds, 0, tiles_at_least=3)
    full = ds.try_load(i)
    n = full.sample.num_tiles
    assert full.tiles_decoded == n and full.images_decoded == len(full.sample.image_tiles)
    for part in ([0], [n - 1], list(range(1, n)), [0, n - 1]):
        got = ds.try_load(i, part)
        assert got.sample.tile_ids == part and got.tiles_decoded == len(part)
        assert torch.equal(got.sample.pixel_values, full.sample.pixel_values[part])
        assert torch.equal(got.sample.input_ids, full.sample.input_ids)
    none = ds.try_load(i, ())
    assert none.images_decoded == 0 and none.sample.pixel_values.shape[0] == 0


def test_worker_processes_load_what_the_main_process_loads(synth):
    ds = dataset(synth, jpeg_aug_prob=0.5)
    here, there = StepLoader(ds, 12), StepLoader(ds, 12, num_workers=2, prefetch=True)
    share = {0: None, 1: (), 3: (0,)}
    there.request = lambda b: share
    for _ in range(3):
        a, b = here.next_batch(), there.next_batch()
        assert a.indices == b.indices
        a.load(share), b.load(share)
        assert a.counters["tiles_decoded"] == b.counters["tiles_decoded"]
        for x, y in zip(a.samples(), b.samples()):
            assert (x is None) == (y is None)
            if x is not None:
                assert torch.equal(x.input_ids, y.input_ids) and x.tile_ids == y.tile_ids
                assert (x.pixel_values is None and y.pixel_values is None) or torch.equal(x.pixel_values,
                                                                                         y.pixel_values)
    there.close()


def test_line_offsets_are_scanned_once_and_cached(tmp_path, monkeypatch, caplog):
    """Only the first reader of an annotation file scans it; a changed file or a damaged cache is rescanned."""
    from engine.data.dataset import LineFile

    path = tmp_path / "ann.jsonl"
    path.write_text('{"a": 1}\n\n{"b": 22}\n{"c": 333}\n')
    scans = []
    scan = shape_index.scan_lines
    monkeypatch.setattr(shape_index, "scan_lines", lambda p: scans.append(p) or scan(p))
    first = LineFile(str(path))
    assert [first.read(k) for k in range(len(first))] == [b'{"a": 1}\n', b'{"b": 22}\n', b'{"c": 333}\n']
    assert first.source(1).endswith("ann.jsonl:3") and len(scans) == 1
    again = LineFile(str(path))  # another rank: reads the cache
    assert len(scans) == 1 and np.array_equal(again.starts, first.starts) and again.source(2) == first.source(2)
    [cache] = glob.glob(str(tmp_path / "ann.jsonl.*.lines.npz"))

    path.write_text('{"a": 1}\n{"z": 0}\n')  # changed file: another key, rescanned
    assert [LineFile(str(path)).read(k) for k in range(2)] == [b'{"a": 1}\n', b'{"z": 0}\n'] and len(scans) == 2

    other = tmp_path / "other.jsonl"  # a cache that is another file's: rescanned with a warning
    other.write_text('{"x": 1}\n')
    LineFile(str(other))
    [mine] = glob.glob(str(tmp_path / "other.jsonl.*.lines.npz"))
    os.replace(cache, mine)
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        assert LineFile(str(other)).read(0) == b'{"x": 1}\n'
    assert len(scans) == 4 and "line index" in caplog.text and "unusable" in caplog.text
