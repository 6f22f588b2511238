"""The shape index of preference pairs: a pair's shape (chosen + rejected tokens, the shared image's
tiles) is what loading it gives, the index is cached and reused, bad records are known from the index
alone, a pair loads any subset of its tiles with the same pixels, records changed after indexing are
skipped, and loader workers hand pairs over like samples."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import DataConfig, config_from_dict
from engine.data import shape_index
from engine.data.loader import StepLoader
from engine.models.presets import preset_model_config
from engine.posttrain.pairs import pack_pairs
from engine.posttrain.preference import PreferenceDataset

MODEL = preset_model_config("tiny")
PAIRS = 40


def copy_pairs(synthetic_data: str, out, n: int) -> None:
    """The first ``n`` pairs of the synthetic preference data into ``out`` (``prefs.jsonl`` named by
    ``meta.json``, their images under ``images/``) with the tokenizer (``tokenizer.model``)."""
    os.makedirs(out / "images")
    with open(os.path.join(synthetic_data, "preference.jsonl")) as f:
        lines = [f.readline() for _ in range(n)]
    for line in lines:
        name = json.loads(line)["image"]
        shutil.copy(os.path.join(synthetic_data, "images", name), out / "images" / name)
    (out / "prefs.jsonl").write_text("".join(lines))
    (out / "meta.json").write_text(json.dumps({"prefs": {"root": "images", "annotation": "prefs.jsonl"}}))
    shutil.copy(os.path.join(synthetic_data, "tokenizer.model"), out / "tokenizer.model")


@pytest.fixture
def prefs(synthetic_data, tmp_path):
    copy_pairs(synthetic_data, tmp_path, PAIRS)
    return tmp_path


def dataset(folder, path: str = "meta.json", **kw) -> PreferenceDataset:
    data = DataConfig(**{"tokenizer": str(folder / "tokenizer.model"), "max_dynamic_patch": 2,
                         "max_sample_tokens": 512, **kw})
    return PreferenceDataset(str(folder / path), data, MODEL, seed=3)


def never_build(*args, **kwargs):
    raise AssertionError("the shape index was rebuilt")


def image_of(ds, i: int) -> str:
    a, line = ds.locate(i)
    return os.path.join(ds.annotations[a].root, json.loads(ds.annotations[a].lines.read(line))["image"])


def test_shape_is_what_loading_gives_and_the_index_is_reused(prefs, monkeypatch):
    ds = dataset(prefs)
    files = glob.glob(str(prefs / "prefs.jsonl.*.shapes.npz"))
    assert len(files) == 1
    for i in range(2 * PAIRS):  # two epochs
        reason, _, tokens, tiles = ds.shape(i)
        pair = ds.load(i)
        assert reason == "" and pair is not None
        assert tokens == pair.num_tokens == pair.chosen.num_tokens + pair.rejected.num_tokens
        assert tiles == pair.image_tiles and pair.num_tiles == sum(tiles) == pair.pixel_values.shape[0]
        assert ds.source(i) == pair.source
    monkeypatch.setattr(shape_index, "build_table", never_build)
    again = dataset(prefs)  # from the cache
    assert [again.shape(i) for i in range(PAIRS)] == [ds.shape(i) for i in range(PAIRS)]
    monkeypatch.undo()
    dataset(prefs, system_prompt="You are a test.")  # another setting: another index
    assert len(glob.glob(str(prefs / "prefs.jsonl.*.shapes.npz"))) == 2


def test_damaged_or_foreign_index_is_rebuilt_with_a_warning(prefs, caplog):
    want = [dataset(prefs).shape(i) for i in range(PAIRS)]
    path = glob.glob(str(prefs / "prefs.jsonl.*.shapes.npz"))[0]
    with open(path, "r+b") as f:
        f.truncate(100)
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        assert [dataset(prefs).shape(i) for i in range(PAIRS)] == want
    assert any("unusable" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    # an index of single records (no longer-sequence column) under this name is not trusted
    ds = dataset(prefs)
    table = ds.tables[0]
    with np.load(path) as z:
        key = json.loads(z["meta"].tobytes().decode())["key"]
    shape_index.save_table(path, shape_index.ShapeTable(table.status, table.text_tokens, table.offsets,
                                                        table.image_tiles, table.messages), key)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        assert [dataset(prefs).shape(i) for i in range(PAIRS)] == want
    assert any("not an index of preference pairs" in r.getMessage() for r in caplog.records)


def test_bad_records_are_known_from_the_index(prefs, monkeypatch):
    good = json.loads((prefs / "prefs.jsonl").read_text().splitlines()[0])
    (prefs / "images" / "broken.png").write_bytes(b"not an image")
    records = {  # line: (record, the skip reason the index gives it)
        1: ({**good, "image": [good["image"]]}, ""),
        2: ([good["question"], good["chosen"]], "malformed"),
        3: ({**good, "image": "missing.png"}, "missing_image"),
        4: ({**good, "image": "broken.png"}, "corrupt_image"),
        5: ({**good, "rejected": good["chosen"]}, "malformed"),
        6: ({"question": good["question"], "chosen": good["chosen"], "image": good["image"]}, "malformed"),
        7: ({**good, "rejected": "blue " * 1000}, "too_long"),
        8: ({"question": "Which colour is red?", "chosen": "red", "rejected": "green"}, ""),
    }
    (prefs / "images" / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r, _ in records.values())
                                                + "{not json\n")
    ds = dataset(prefs, "images/bad.jsonl")
    monkeypatch.setattr(PreferenceDataset, "_prepare", never_build)  # shapes and skips: the index alone
    shapes = {int(ds.source(i).rsplit(":", 1)[1]): ds.shape(i) for i in range(len(records) + 1)}
    assert {k: s[0] for k, s in shapes.items()} == {**{k: r for k, (_, r) in records.items()}, 9: "malformed"}
    assert "identical" in shapes[5][1] and "'rejected'" in shapes[6][1] and "not valid JSON" in shapes[9][1]
    assert "> data.max_sample_tokens=512" in shapes[7][1] and shapes[8][3] == [] and shapes[1][3] != []
    loader = StepLoader(ds, len(records) + 1)
    batch = loader.next_batch()
    assert loader.stats == {"malformed": 4, "missing_image": 1, "corrupt_image": 1, "too_long": 1}
    assert len(batch) == 2
    # the limit is not part of the index: a higher one admits the long pair from the same cache
    monkeypatch.undo()
    monkeypatch.setattr(shape_index, "build_table", never_build)
    longer = dataset(prefs, "images/bad.jsonl", max_sample_tokens=4096)
    assert [longer.shape(i)[0] for i in range(len(records) + 1)].count("") == 3


def test_any_split_of_a_pairs_tiles_gives_the_same_pixels(prefs):
    ds = dataset(prefs, jpeg_aug_prob=0.5)
    i = next(i for i in range(PAIRS) if sum(ds.shape(i)[3]) >= 3)
    full = ds.try_load(i)
    n = full.sample.num_tiles
    assert full.sample.tile_ids is None and full.tiles_decoded == n and full.images_decoded == 1
    for part in ([0], [n - 1], list(range(1, n)), [0, n - 1]):
        got = ds.try_load(i, part)
        pair = got.sample
        assert pair.tile_ids == part and pair.num_tiles == n and got.tiles_decoded == len(part)
        assert pair.chosen.pixel_values is pair.rejected.pixel_values
        assert torch.equal(pair.pixel_values, full.sample.pixel_values[part])
        assert torch.equal(pair.chosen.input_ids, full.sample.chosen.input_ids)
    none = ds.try_load(i, ())
    assert none.images_decoded == 0 and none.sample.pixel_values.shape[0] == 0 and none.sample.num_tiles == n
    # packing sees the pair's tiles whatever this rank holds of its pixels
    cfg = config_from_dict({"model": {"preset": "tiny"}, "data": {"max_packed_tokens": 1024}})
    packs = [pack_pairs([r.sample], cfg) for r in (full, ds.try_load(i, [1]), none)]
    assert all(p.num_tiles == n and int(p.batch.image_tiles.sum()) == 2 * n for p in packs)
    assert all(torch.equal(p.feature_index, packs[0].feature_index) for p in packs)


def test_changed_and_truncated_images_are_skipped(prefs):
    ds = dataset(prefs)
    multi = [i for i in range(PAIRS) if sum(ds.shape(i)[3]) >= 3]
    stale, cut = multi[0], multi[1]
    w, h = Image.open(image_of(ds, stale)).size
    Image.new("RGB", (max(w, h), max(w, h)), (9, 9, 9)).save(image_of(ds, stale))  # square: one tile
    data = open(image_of(ds, cut), "rb").read()
    with open(image_of(ds, cut), "wb") as f:
        f.write(data[: len(data) // 2])  # the header still reads; the pixels do not
    assert ds.try_load(stale, ()).reason == "stale_index"  # tokens only: the image header changed
    assert ds.try_load(cut, ()).sample is not None  # tokens only: nothing to notice
    assert ds.try_load(cut, [2]).reason == "corrupt_image"


def test_worker_processes_hand_pairs_over_like_samples(prefs):
    ds = dataset(prefs, jpeg_aug_prob=0.5)
    here, there = StepLoader(ds, 8), StepLoader(ds, 8, num_workers=2, prefetch=True)
    multi = next(pos for pos in range(8) if sum(ds.shape(pos)[3]) >= 3)
    share = {0: None, 1: (), multi: (0, 2)}
    there.request = lambda b: share
    try:
        for _ in range(2):
            a, b = here.next_batch(), there.next_batch()
            assert a.indices == b.indices
            a.load(share), b.load(share)
            assert a.counters == {**b.counters, "wait_seconds": a.counters["wait_seconds"]}
            for x, y in zip(a.samples(), b.samples()):
                assert (x is None) == (y is None)
                if x is None:
                    continue
                assert type(y).__name__ == "PreferencePair" and x.tile_ids == y.tile_ids and x.index == y.index
                assert y.chosen.pixel_values is y.rejected.pixel_values
                for s, t in ((x.chosen, y.chosen), (x.rejected, y.rejected)):
                    assert torch.equal(s.input_ids, t.input_ids) and torch.equal(s.labels, t.labels)
                    assert torch.equal(s.pixel_values, t.pixel_values) and s.image_tiles == t.image_tiles
        # whole steps (the precomputed reference's first pass) come through the workers too
        pairs = there.next_step()
        assert [p.index for p in pairs] == list(there.step_indices(there.step - 1))
        assert all(p.tile_ids is None and p.pixel_values.shape[0] == p.num_tiles for p in pairs)
    finally:
        there.close()
