"""The dataset and step loader: mixing, determinism, resume, bad data, start-up errors."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter

import pytest
import torch

from engine.config import DataConfig
from engine.data.dataset import DataError, InternVLDataset
from engine.data.loader import StepLoader, build_step_loader
from engine.data.tokenizer import load_tokenizer
from engine.models.presets import preset_model_config
from tools.make_synthetic_data import generate, main

MODEL = preset_model_config("tiny")
NIT = MODEL.num_image_token


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(str(out), num_samples=150, num_text_docs=80, seed=11, with_bad=True)
    return out


@pytest.fixture(scope="module")
def tok(synth):
    return load_tokenizer(str(synth / "tokenizer.model"))


def dcfg(synth, **kw) -> DataConfig:
    base = dict(meta_path=str(synth / "meta.json"), text_corpus=str(synth / "text.jsonl"),
                tokenizer=str(synth / "tokenizer.model"))
    base.update(kw)
    return DataConfig(**base)


def same_sample(a, b) -> bool:
    if a.source != b.source or not torch.equal(a.input_ids, b.input_ids) or not torch.equal(a.labels, b.labels):
        return False
    if (a.pixel_values is None) != (b.pixel_values is None):
        return False
    return a.pixel_values is None or torch.equal(a.pixel_values, b.pixel_values)


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_mixing_ratio_by_tokens(synth, tok, ratio):
    ds = InternVLDataset(dcfg(synth, lm_ratio=ratio), MODEL, seed=0, tokenizer=tok)
    text = mm = 0
    n = 4000
    for i in range(n):
        t = ds.num_tokens(i)
        if ds.is_text(i):
            text += t
        else:
            mm += t
    assert abs(text / (text + mm) - ratio) < 0.02
    assert sum(ds.is_text(i) for i in range(n)) == int(n * ds.text_share + 1e-9)
    assert 0 < ds.text_share < 1
    assert max(sum(ds.is_text(i) for i in range(k, k + 20)) for k in range(0, 400, 20)) <= 20 * ds.text_share + 1


def test_single_stream_configs(synth, tok):
    mm_only = InternVLDataset(dcfg(synth, text_corpus=""), MODEL, seed=0, tokenizer=tok)
    assert mm_only.text_share == 0 and not any(mm_only.is_text(i) for i in range(200))
    no_lm = InternVLDataset(dcfg(synth, lm_ratio=0.0), MODEL, seed=0, tokenizer=tok)
    assert no_lm.text_share == 0
    text_only = InternVLDataset(dcfg(synth, meta_path=""), MODEL, seed=0, tokenizer=tok)
    assert text_only.text_share == 1 and all(text_only.is_text(i) for i in range(100))
    s = text_only.load(3)
    assert s.kind == "text" and s.pixel_values is None and int(s.input_ids[-1]) == tok.eos_id
    assert torch.equal(s.labels, s.input_ids)


def _mm_sources(ds, count):
    out, i = [], 0
    while len(out) < count:
        if not ds.is_text(i):
            out.append(ds.source(i))
        i += 1
    return out


def test_epochs_and_repeat_time(synth, tok, tmp_path):
    ds = InternVLDataset(dcfg(synth), MODEL, seed=0, tokenizer=tok)
    n = ds.num_multimodal
    src = _mm_sources(ds, 2 * n)
    assert len(set(src[:n])) == n and set(src[:n]) == set(src[n:])  # each record once per epoch
    assert src[:n] != src[n:]  # reshuffled
    for repeat, expect in ((2, 2 * n), (0.5, n // 2)):
        meta = tmp_path / f"meta_{repeat}.json"
        meta.write_text(json.dumps({"x": {"root": str(synth / "images"), "annotation": str(synth / "train.jsonl"),
                                          "repeat_time": repeat}}))
        r = InternVLDataset(dcfg(synth, meta_path=str(meta)), MODEL, seed=0, tokenizer=tok)
        assert r.num_multimodal == expect
        counts = Counter(_mm_sources(r, expect))
        assert set(counts.values()) == {int(max(repeat, 1))} and len(counts) == (n if repeat > 1 else n // 2)


def test_meta_matches_load(synth, tok):
    ds = InternVLDataset(dcfg(synth), MODEL, seed=0, tokenizer=tok)
    kinds = set()
    for i in range(40):
        text_tokens, tiles = ds.meta(i)
        s = ds.load(i)
        assert s is not None and s.source == ds.source(i) and s.index == i
        kinds.add(s.kind)
        assert tiles == s.num_tiles and text_tokens + tiles * NIT == s.num_tokens
        assert int((s.input_ids == tok.img_context_id).sum()) == tiles * NIT
        if tiles:
            assert s.pixel_values.shape == (tiles, 3, 112, 112) and s.pixel_values.dtype == torch.float32
            assert s.image_tiles and sum(s.image_tiles) == tiles
    assert kinds == {"text", "multimodal"}


def test_determinism_independent_of_order(synth, tok):
    cfg = dcfg(synth, jpeg_aug_prob=1.0)
    a = InternVLDataset(cfg, MODEL, seed=7, tokenizer=tok)
    b = InternVLDataset(cfg, MODEL, seed=7, tokenizer=tok)
    idx = list(range(16))
    first = [a.load(i) for i in idx]
    second = {i: b.load(i) for i in reversed(idx)}
    again = a.load(5)
    assert all(same_sample(first[i], second[i]) for i in idx)
    assert same_sample(again, first[5])
    plain = InternVLDataset(dcfg(synth), MODEL, seed=7, tokenizer=tok)
    mm = [i for i in idx if first[i].pixel_values is not None]
    unaugmented = {i: plain.load(i) for i in mm[:4]}
    assert mm and all(unaugmented[i].source == first[i].source for i in unaugmented)
    assert any(not torch.equal(unaugmented[i].pixel_values, first[i].pixel_values) for i in unaugmented)  # JPEG
    other = InternVLDataset(cfg, MODEL, seed=8, tokenizer=tok)
    assert [other.source(i) for i in idx] != [a.source(i) for i in idx]


def test_step_loader_resume(synth, tok):
    ds = InternVLDataset(dcfg(synth), MODEL, seed=3, tokenizer=tok)
    run = StepLoader(ds, global_batch=8)
    for _ in range(3):
        run.next_step()
    state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint file
    expected = run.next_step()
    resumed = StepLoader(InternVLDataset(dcfg(synth), MODEL, seed=3, tokenizer=tok), global_batch=8)
    resumed.load_state_dict(state)
    assert resumed.step == 3 and list(resumed.step_indices()) == list(range(24, 32))
    got = resumed.next_step()
    assert len(got) == len(expected) == 8 and all(same_sample(x, y) for x, y in zip(got, expected))
    assert resumed.last_indices == list(range(24, 32))
    with pytest.raises(ValueError, match="global_batch=8"):
        StepLoader(ds, global_batch=4).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=3"):
        StepLoader(InternVLDataset(dcfg(synth), MODEL, seed=4, tokenizer=tok), 8).load_state_dict(state)


def test_build_step_loader_from_config(synth, tok):
    from engine.config import config_from_dict

    cfg = config_from_dict({"data": {"meta_path": str(synth / "meta.json"), "text_corpus": str(synth / "text.jsonl"),
                                     "tokenizer": str(synth / "tokenizer.model"), "num_workers": 1},
                            "train": {"global_batch": 6, "seed": 9}})
    loader = build_step_loader(cfg)
    assert loader.global_batch == 6 and loader.dataset.seed == 9 and loader.prefetch
    first = loader.next_step()
    assert [s.index for s in first] == loader.last_indices == list(range(6))
    assert loader.next_step()[0].index == 6
    loader.close()


def test_rank_share_and_prefetch(synth, tok):
    ds = InternVLDataset(dcfg(synth), MODEL, seed=5, tokenizer=tok)
    full = StepLoader(ds, 8, step=2).next_step()
    idx = list(StepLoader(ds, 8, step=2).step_indices())
    r0, r1 = StepLoader(ds, 8, step=2), StepLoader(ds, 8, step=2)
    part = r0.next_step(idx[1::2]) + r1.next_step(idx[0::2])
    assert r0.step == 3 and r0.last_indices == idx[1::2]
    by_source = {s.source: s for s in part}
    assert len(part) == 8 and all(same_sample(s, by_source[s.source]) for s in full)
    with pytest.raises(ValueError, match="not in step"):
        StepLoader(ds, 8).next_step([8])
    plain, fast = StepLoader(ds, 8), StepLoader(ds, 8, num_workers=2, prefetch=True)
    for _ in range(3):
        a, b = plain.next_step(), fast.next_step()
        assert len(a) == len(b) and all(same_sample(x, y) for x, y in zip(a, b))
    fast.close()


EXPECTED_BAD = {2: "missing_image", 3: "corrupt_image", 4: "corrupt_image", 5: "malformed", 6: "malformed",
                7: "malformed", 8: "malformed", 9: "image_mismatch", 10: "too_long"}


def test_bad_data_counted_and_logged(synth, tok, caplog):
    cfg = dcfg(synth, meta_path=str(synth / "meta_bad.json"), text_corpus="")
    ds = InternVLDataset(cfg, MODEL, seed=0, tokenizer=tok)
    loader = StepLoader(ds, global_batch=10)  # one step = the whole file
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        good = loader.next_step()
    assert len(good) == 1 and good[0].source.endswith("bad.jsonl:1")
    assert loader.stats == {"missing_image": 1, "corrupt_image": 2, "malformed": 4, "image_mismatch": 1,
                            "too_long": 1}
    assert loader.skipped == loader.skipped_total() == 9 and loader.last_skips == loader.stats
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for line, reason in EXPECTED_BAD.items():
        assert any(f"bad.jsonl:{line}:" in m and f"({reason})" in m for m in messages), (line, reason)
    assert loader.state_dict()["stats"] == loader.stats
    # dataset.load counts in the dataset's own stats
    assert ds.load(next(i for i in range(10) if ds.source(i).endswith(":5"))) is None
    assert ds.stats == {"malformed": 1}
    # the meta of a bad record costs nothing
    assert ds.meta(next(i for i in range(10) if ds.source(i).endswith(":2"))) == (0, 0)


def test_too_long_threshold(synth, tok):
    ds = InternVLDataset(dcfg(synth, max_sample_tokens=60), MODEL, seed=0, tokenizer=tok)
    loader = StepLoader(ds, 32)
    got = loader.next_step()
    assert loader.stats.get("too_long", 0) > 0 and all(s.num_tokens <= 60 for s in got)
    assert len(got) + loader.stats["too_long"] == 32


def test_startup_errors(synth, tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="data.meta_path='.*nope.json'"):
        InternVLDataset(dcfg(synth, meta_path=str(tmp_path / "nope.json")), MODEL, seed=0, tokenizer=tok)
    cases = {
        "missing_annotation.json": ({"a": {"root": str(synth / "images"), "annotation": "gone.jsonl"}},
                                    FileNotFoundError, "annotation file not found: .*gone.jsonl"),
        "missing_root.json": ({"a": {"root": "no_such_dir", "annotation": str(synth / "train.jsonl")}},
                              FileNotFoundError, "root folder not found"),
        "no_annotation_key.json": ({"a": {"root": str(synth / "images")}}, DataError, "lacks a string 'annotation'"),
        "bad_repeat.json": ({"a": {"root": str(synth / "images"), "annotation": str(synth / "train.jsonl"),
                                   "repeat_time": 0}}, DataError, "repeat_time=0"),
    }
    for name, (content, exc, msg) in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(exc, match=msg):
            InternVLDataset(dcfg(synth, meta_path=str(tmp_path / name)), MODEL, seed=0, tokenizer=tok)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        InternVLDataset(dcfg(synth, meta_path=str(tmp_path / "broken.json")), MODEL, seed=0, tokenizer=tok)
    with pytest.raises(FileNotFoundError, match="data.text_corpus"):
        InternVLDataset(dcfg(synth, text_corpus=str(tmp_path / "t.jsonl")), MODEL, seed=0, tokenizer=tok)
    other = preset_model_config("tiny")
    other.img_context_token_id = 9
    with pytest.raises(DataError, match="model.img_context_token_id=9"):
        InternVLDataset(dcfg(synth), other, seed=0, tokenizer=tok)


def test_make_synthetic_data_cli(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["--out", str(out), "--num-samples", "20", "--seed", "2", "--with-bad"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 21 and summary["bad_records"] == 10
    for f in ("meta.json", "train.jsonl", "text.jsonl", "preference.jsonl", "preference_meta.json",
              "tokenizer.model", "bad.jsonl", "meta_bad.json"):
        assert (out / f).is_file(), f
    meta = json.loads((out / "meta.json").read_text())
    entry = next(iter(meta.values()))
    records = [json.loads(l) for l in (out / entry["annotation"]).read_text().splitlines()]
    assert len(records) == 21
    for r in records:
        images = r["image"] if isinstance(r["image"], list) else [r["image"]]
        assert all(os.path.isfile(out / entry["root"] / p) for p in images)
        assert r["conversations"][0]["from"] == "human" and r["conversations"][-1]["from"] == "gpt"
    prefs = [json.loads(l) for l in (out / "preference.jsonl").read_text().splitlines()]
    assert all(p["chosen"] != p["rejected"] and "<image>" in p["question"] for p in prefs)
    # same seed, same data
    again = tmp_path / "e"
    main(["--out", str(again), "--num-samples", "20", "--seed", "2"])
    assert (again / "train.jsonl").read_text() == (out / "train.jsonl").read_text()
    assert (again / "text.jsonl").read_text() == (out / "text.jsonl").read_text()
