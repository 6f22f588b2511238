"""``python -m engine.preflight``: a sound set-up passes; each broken piece (annotation file, image,
tokenizer, init_from checkpoint, run directory, layout) fails with a line naming it, and several
broken pieces are all reported by one run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from conftest import tiny_overrides
from engine.preflight import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "examples/configs/tiny.yaml"
CHECKS = ["torch", "config", "data", "tokenizer", "init_from", "run_dir", "host_memory"]


def args(data_dir: str, run_dir: str, *extra: str, **overrides) -> list[str]:
    out = ["--config", os.path.join(ROOT, CONFIG)]
    for o in tiny_overrides(data_dir, run_dir, **overrides):
        out += ["--set", o]
    return out + list(extra)


def run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "engine.preflight", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def preflight(argv: list[str], capsys) -> tuple[int, dict]:
    """In-process run with ``--json``: (exit status, report)."""
    capsys.readouterr()
    code = main(argv + ["--json"])
    return code, json.loads(capsys.readouterr().out)


def failed(report: dict) -> list[str]:
    return [c["name"] for c in report["checks"] if not c["ok"]]


def copy_data(synthetic_data: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(synthetic_data, tmp_path / "data"))


def image_records(data: Path, suffix: str = "") -> list[tuple[int, str]]:
    """(line number, image) of the single-image records of train.jsonl whose image ends with suffix."""
    out = []
    with open(data / "train.jsonl") as f:
        for number, line in enumerate(f, 1):
            image = json.loads(line).get("image")
            if isinstance(image, str) and image.endswith(suffix):
                out.append((number, image))
    return out


def tokenizer_without_image_context(data: Path) -> str:
    """A sentencepiece model with every special token except ``<IMG_CONTEXT>``."""
    import sentencepiece as spm

    with open(data / "text.jsonl") as f:
        sentences = [json.loads(line)["text"] for line in f]
    prefix = str(data / "no_img_context")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=prefix, vocab_size=300, model_type="bpe", pad_id=0, unk_id=1,
        eos_id=2, bos_id=-1, eos_piece="<|endoftext|>", user_defined_symbols=["<|im_start|>", "<|im_end|>", "<img>",
                                                                              "</img>"],
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    return prefix + ".model"


# ----------------------------------------------------------------------------- passing


def test_sound_setup_passes(synthetic_data, tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli(args(synthetic_data, str(run_dir), "--json"))
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is True and report["problems"] == []
    assert [c["name"] for c in report["checks"]] == CHECKS
    assert all(c["ok"] for c in report["checks"])
    detail = {c["name"]: c["detail"] for c in report["checks"]}
    assert re.search(r"\b(1[6-9]|[2-9]\d) image\(s\) decoded from the first 16 image records", detail["data"])
    assert "<IMG_CONTEXT>=7" in detail["tokenizer"]
    if not torch.cuda.is_available():
        assert "CPU only" in detail["torch"]
    assert run_dir.is_dir() and os.listdir(run_dir) == []  # created; the probe file is gone


def test_human_report(synthetic_data, tmp_path, capsys):
    assert main(args(synthetic_data, str(tmp_path / "run"))) == 0
    text = capsys.readouterr().out
    for name in CHECKS:
        assert f"ok    {name}" in text
    assert text.rstrip().endswith("all checks passed")


# ----------------------------------------------------------------------------- one problem each


def test_missing_annotation_files(synthetic_data, tmp_path, capsys):
    data = copy_data(synthetic_data, tmp_path)
    meta = json.loads((data / "meta.json").read_text())
    good = next(iter(meta.values()))
    meta["gone_a"] = {**good, "annotation": "gone_a.jsonl"}
    meta["gone_b"] = {**good, "annotation": "gone_b.jsonl"}
    (data / "meta.json").write_text(json.dumps(meta))
    code, report = preflight(args(str(data), str(tmp_path / "run")), capsys)
    assert code == 1 and failed(report) == ["data"]
    for name in ("gone_a", "gone_b"):  # every missing file, not only the first
        assert any(f"entry '{name}': annotation file not found" in p and f"{name}.jsonl" in p
                   for p in report["problems"]), report["problems"]
    assert len(report["problems"]) == 2
    detail, records = report["checks"][2]["detail"], len((data / "train.jsonl").read_text().splitlines())
    assert detail.startswith(f"1 annotation file(s), {records} records") and re.search(r"; [1-9]\d* image", detail), detail


def test_corrupt_and_missing_images(synthetic_data, tmp_path, capsys):
    data = copy_data(synthetic_data, tmp_path)
    (line_a, corrupt), (line_b, missing) = image_records(data, ".png")[:2]
    assert line_b <= 16 + 5  # both among the first image records
    raw = (data / "images" / corrupt).read_bytes()
    (data / "images" / corrupt).write_bytes(raw[: len(raw) // 2])  # the header reads, the pixels do not
    (data / "images" / missing).unlink()
    code, report = preflight(args(str(data), str(tmp_path / "run")), capsys)
    assert code == 1 and failed(report) == ["data"]
    annotation = data / "train.jsonl"
    assert any(p.startswith(f"{annotation}:{line_a}: cannot decode image") and corrupt in p
               for p in report["problems"]), report["problems"]
    assert any(p.startswith(f"{annotation}:{line_b}: image not found") and missing in p
               for p in report["problems"]), report["problems"]


def test_tokenizer_without_image_token(synthetic_data, tmp_path, capsys):
    data = copy_data(synthetic_data, tmp_path)
    path = tokenizer_without_image_context(data)
    code, report = preflight(args(str(data), str(tmp_path / "run"), **{"data.tokenizer": path}), capsys)
    assert code == 1 and failed(report) == ["tokenizer"]
    [problem] = report["problems"]
    assert "<IMG_CONTEXT>" in problem and path in problem


def test_tokenizer_larger_than_model_vocabulary(synthetic_data, tmp_path, capsys):
    code, report = preflight(args(synthetic_data, str(tmp_path / "run"), **{"model.llm.vocab_size": 400}), capsys)
    assert code == 1 and failed(report) == ["tokenizer"]
    [problem] = report["problems"]
    assert "512 tokens" in problem and "model.llm.vocab_size=400" in problem


def test_init_from_missing_and_misshapen_tensors(synthetic_data, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from engine.config import load_config
    from engine.models.hf_adapter import save_pretrained
    from engine.models.internvl import InternVLModel

    ckpt = tmp_path / "ckpt"
    save_pretrained(InternVLModel(load_config(os.path.join(ROOT, CONFIG)).model), str(ckpt))
    base = args(synthetic_data, str(tmp_path / "run"), **{"train.init_from": str(ckpt)})
    code, report = preflight(base, capsys)
    assert code == 0, report["problems"]
    assert "hf format" in report["checks"][4]["detail"]

    file = ckpt / "model.safetensors"
    tensors = load_file(str(file))
    del tensors["language_model.model.norm.weight"]
    tensors["vision_tower.encoder.layer.0.layernorm_before.weight"] = torch.zeros(3)
    save_file(tensors, str(file), metadata={"format": "pt"})
    code, report = preflight(base, capsys)
    assert code == 1 and failed(report) == ["init_from"]
    problems = report["problems"]
    assert len(problems) == 2, problems
    assert any("'language_model.norm.weight'" in p and "is missing" in p for p in problems), problems
    assert any("'vision_model.layers.0.norm1.weight'" in p and "(3,)" in p and "(64,)" in p for p in problems), problems


def test_run_dir_under_a_file(synthetic_data, tmp_path, capsys):
    (tmp_path / "afile").write_text("not a directory")
    run_dir = tmp_path / "afile" / "run"
    code, report = preflight(args(synthetic_data, str(run_dir)), capsys)
    assert code == 1 and failed(report) == ["run_dir"]
    [problem] = report["problems"]
    assert problem.startswith(f"run.dir='{run_dir}': cannot be created")


def test_layout_and_devices(synthetic_data, tmp_path, capsys):
    code, report = preflight(args(synthetic_data, str(tmp_path / "run"), "--gpus-per-node", "3"), capsys)
    assert code == 1
    assert any("train.global_batch=8" in p and "world size 3" in p for p in report["problems"]), report["problems"]
    assert "config" in failed(report) and "host_memory" in failed(report)  # skipped: no valid layout
    assert "skipped" in report["checks"][-1]["detail"]
    if not torch.cuda.is_available():
        assert any(p.startswith("--gpus-per-node=3: CUDA is not available") for p in report["problems"])


def test_unknown_config_key(tmp_path, capsys):
    assert main(["--config", os.path.join(ROOT, CONFIG), "--set", "train.nope=1"]) == 2
    assert "unknown config key 'train.nope'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- several at once


def test_several_problems_in_one_run(synthetic_data, tmp_path):
    data = copy_data(synthetic_data, tmp_path)
    meta = json.loads((data / "meta.json").read_text())
    next(iter(meta.values()))["annotation"] = "gone.jsonl"
    (data / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "afile").write_text("")
    out = run_cli(args(str(data), str(tmp_path / "afile" / "run"), **{"data.tokenizer": str(data / "none.model")}))
    assert out.returncode == 1, out.stdout + out.stderr
    text = out.stdout
    for name in ("data", "tokenizer", "run_dir"):
        assert f"FAIL  {name}" in text, text
    assert "3 problem(s):" in text
    assert "annotation file not found" in text and "gone.jsonl" in text
    assert "data.tokenizer=" in text and "none.model" in text
    assert "run.dir=" in text and "cannot be created" in text


def test_posttrain_config_checks_its_own_data(synthetic_data, tmp_path, capsys):
    """An MPO config (with its posttrain: section) loads, and its pairs (posttrain.data) are what is checked."""
    base = ["--config", "examples/configs/mpo_tiny.yaml", "--set", f"data.tokenizer={synthetic_data}/tokenizer.model",
            "--set", f"data.text_corpus={synthetic_data}/text.jsonl", "--set", "posttrain.init=",
            "--set", f"run.dir={tmp_path / 'run'}"]
    code, report = preflight(base + ["--set", f"posttrain.data={synthetic_data}/preference_meta.json"], capsys)
    assert code == 0 and report["ok"], report["problems"]
    code, report = preflight(base + ["--set", f"posttrain.data={tmp_path / 'missing.json'}"], capsys)
    assert code == 1 and failed(report) == ["data"] and "missing.json" in report["problems"][0]
