"""VisualPRM: label-only supervision, step scores against a direct forward, PRM training and the
Best-of-N tool on engine and transformers checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch

from engine.config import config_from_dict
from engine.data.batch import IGNORE_INDEX
from engine.data.conversation import tokenize_conversation
from engine.data.dataset import BadSample
from engine.data.tokenizer import load_tokenizer
from engine.models.internvl import InternVLModel
from engine.posttrain.prm import (PRMDataset, keep_labels_only, label_ids, prm_conversation, score_steps,
                                  solution_score, split_steps)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "<image>\nDescribe the shape step by step."


@pytest.fixture(scope="module")
def tok(synthetic_data):
    return load_tokenizer(f"{synthetic_data}/tokenizer.model")


@pytest.fixture(scope="module")
def prm_data(synthetic_data, tmp_path_factory) -> str:
    from engine.posttrain.synthetic import write_prm_data

    out = str(tmp_path_factory.mktemp("prm"))
    write_prm_data(out, num_images=48, seed=0)
    return out


def test_only_label_tokens_are_supervised(tok):
    plus, minus = label_ids(tok)
    conv = prm_conversation(QUESTION, ["the shape is a circle.", "it is red.", "the background is white."],
                            ["+", "-", "+"])
    ids, labels = tokenize_conversation(conv, tok, [1], 16, "")
    kept = keep_labels_only(labels, (plus, minus), tok.im_end_id)
    sup = [(k, t) for k, t in enumerate(kept) if t != IGNORE_INDEX]
    assert [t for _, t in sup] == [plus, minus, plus]
    assert all(ids[k] == t for k, t in sup)
    assert all(ids[k + 1] == tok.im_end_id for k, _ in sup)  # the end token is not supervised
    bad = prm_conversation(QUESTION, ["the shape is a circle."], ["yes"])
    _, labels = tokenize_conversation(bad, tok, [1], 16, "")
    with pytest.raises(BadSample, match="assistant turn 0"):
        keep_labels_only(labels, (plus, minus), tok.im_end_id)


def test_prm_dataset_supervises_labels_and_skips_bad_turns(synthetic_data, prm_data, tok, tmp_path):
    plus, minus = label_ids(tok)
    lines = open(f"{prm_data}/prm.jsonl").read().splitlines()[:3]
    broken = json.loads(lines[0])
    broken["conversations"][1]["value"] = "correct"
    lines.append(json.dumps(broken))
    (tmp_path / "prm.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"p": {"root": f"{prm_data}/images", "annotation": "prm.jsonl"}}))
    cfg = config_from_dict({"model": {"preset": "tiny"}, "data": {
        "meta_path": str(tmp_path / "meta.json"), "text_corpus": "", "tokenizer": f"{synthetic_data}/tokenizer.model",
        "max_dynamic_patch": 2}})
    ds = PRMDataset(cfg.data, cfg.model, 0, tok)
    samples = [ds.load(i) for i in range(4)]
    good = [s for s in samples if s is not None]
    assert len(good) == 3 and ds.stats == {"malformed": 1}
    for s in good:
        sup = s.labels[s.labels != IGNORE_INDEX].tolist()
        assert len(sup) == 3 and set(sup) <= {plus, minus}


def test_step_scores_match_direct_forward(tok, prm_data):
    from PIL import Image

    from engine.data.images import ImageProcessor

    cfg = config_from_dict({"model": {"preset": "tiny"}})
    torch.manual_seed(0)
    model = InternVLModel(cfg.model).eval()
    proc = ImageProcessor(cfg.model.vision.image_size, 1, 2, True, 0.0)
    rec = json.loads(open(f"{prm_data}/questions.jsonl").readline())
    px = proc(Image.open(f"{prm_data}/{rec['image']}").convert("RGB"))
    solutions = [split_steps(rec["answer"]), ["the shape is a circle.", "it is blue."], []]
    got = score_steps(model, tok, rec["question"], solutions, px, [px.shape[0]], system_prompt="")
    assert [len(s) for s in got] == [3, 2, 0]
    plus, minus = label_ids(tok)
    for steps, scores in zip(solutions[:2], got):
        ids, labels = tokenize_conversation(prm_conversation(rec["question"], steps), tok, [px.shape[0]],
                                            cfg.model.num_image_token, "")
        with torch.no_grad():
            logits = model(torch.tensor([ids]), px)[0]
        where = [k for k, t in enumerate(keep_labels_only(labels, (plus, minus), tok.im_end_id)) if t != IGNORE_INDEX]
        want = [torch.softmax(logits[k - 1, [plus, minus]], -1)[0].item() for k in where]
        assert scores == pytest.approx(want, rel=1e-4)
    assert solution_score(got[2]) == 0.0 and solution_score(got[0]) == pytest.approx(sum(got[0]) / 3)


@pytest.fixture(scope="module")
def runs(synthetic_data, prm_data, tmp_path_factory) -> dict:
    """A policy (SFT on the step-by-step answers) and a PRM, each trained for a few steps."""
    from engine.posttrain.config import load_posttrain_config
    from engine.posttrain.trainer import PostTrainer

    root = tmp_path_factory.mktemp("bon")
    out = {}
    for mode, meta in (("sft", "sft_meta.json"), ("prm", "prm_meta.json")):
        run = str(root / mode)
        cfg, pt = load_posttrain_config(os.path.join(ROOT, "examples/configs/prm_tiny.yaml"), [
            f"posttrain.mode={mode}", f"data.meta_path={prm_data}/{meta}", f"run.dir={run}",
            f"data.tokenizer={synthetic_data}/tokenizer.model", "train.steps=4", "train.warmup_steps=1",
            "train.global_batch=8", "train.progress=false", "train.tensorboard=false", "train.save_interval=0"])
        PostTrainer(cfg, pt).train()
        out[mode] = run
    return out


def test_prm_training_lowers_label_loss(runs):
    from engine.metrics import read_metrics

    rows = read_metrics(runs["prm"])
    assert len(rows) == 4 and rows[-1]["loss"] < rows[0]["loss"]


def test_best_of_n_tool(runs, prm_data, synthetic_data, tmp_path):
    from tools.best_of_n import main

    report_path = tmp_path / "report.json"
    args = ["--policy", runs["sft"], "--prm", runs["prm"], "--data", f"{prm_data}/questions.jsonl", "--n", "3",
            "--limit", "2", "--max-new-tokens", "6", "--seed", "1", "--out", str(report_path)]
    assert main(args) == 0
    report = json.loads(report_path.read_text())
    assert (report["questions"], report["n"]) == (2, 3)
    for row in report["details"]:
        assert len(row["candidates"]) == 3
        assert row["scores"] == pytest.approx([solution_score(s) for s in row["step_scores"]])
        assert row["best"] == max(range(3), key=lambda j: row["scores"][j])
        assert [len(s) for s in row["step_scores"]] == [len(split_steps(c)) for c in row["candidates"]]
        assert all(0.0 <= p <= 1.0 for s in row["step_scores"] for p in s)
    bon = sum(r["correct"][r["best"]] for r in report["details"]) / 2
    assert report["best_of_n_accuracy"] == bon
    assert report["best_of_1_accuracy"] == sum(r["correct"][0] for r in report["details"]) / 2
    assert report["oracle_accuracy"] >= report["best_of_n_accuracy"]

    # the PRM exported as a transformers directory scores exactly like its engine run
    from engine.models.hf_adapter import save_pretrained
    from engine.posttrain.checkpoints import load_model

    prm, _ = load_model(runs["prm"])
    hf = str(tmp_path / "prm_hf")
    save_pretrained(prm, hf)
    again = tmp_path / "again.json"
    assert main(args[:2] + ["--prm", hf, "--prm-config", os.path.join(runs["prm"], "config.yaml")] + args[4:-1]
                + [str(again)]) == 0
    other = json.loads(again.read_text())
    for a, b in zip(report["details"], other["details"]):
        assert a["candidates"] == b["candidates"]
        for x, y in zip(a["step_scores"], b["step_scores"]):
            assert x == pytest.approx(y, rel=1e-5)
