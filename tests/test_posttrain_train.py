"""Post-training runs end to end: SFT config trains, MPO learns to prefer the right answer, the
precomputed reference equals the frozen one, resume restores the BCO shift, bad config fails early."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = {"train.progress": "false", "train.tensorboard": "false", "train.save_interval": 0}


def _sets(d: dict) -> list[str]:
    return [f"{k}={v}" for k, v in d.items()]


def _run(config: str, overrides: dict):
    from engine.posttrain.config import load_posttrain_config
    from engine.posttrain.trainer import PostTrainer

    cfg, pt = load_posttrain_config(os.path.join(ROOT, config), _sets({**QUIET, **overrides}))
    trainer = PostTrainer(cfg, pt)
    trainer.train()
    return trainer


def _cli(config: str, overrides: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "engine.posttrain.train", "--config", config]
    for o in _sets({**QUIET, **overrides}):
        args += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)  # a tiny model runs fastest on one thread
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def colour_pairs(synthetic_data) -> str:
    """The colour preference pairs tools/make_synthetic_data.py writes beside the main set."""
    return os.path.join(synthetic_data, "colour_pairs_meta.json")


def _mpo(data: str, prefs: str, run_dir: str, **extra) -> dict:
    return {"data.tokenizer": f"{data}/tokenizer.model", "posttrain.init": "", "posttrain.data": prefs,
            "run.dir": run_dir, "data.system_prompt": "", **extra}


def test_sft_tiny_config_trains(synthetic_data, tmp_path):
    run = str(tmp_path / "sft")
    _run("examples/configs/sft_tiny.yaml", {"data.meta_path": f"{synthetic_data}/meta.json",
                                            "data.tokenizer": f"{synthetic_data}/tokenizer.model", "run.dir": run,
                                            "train.steps": 8, "train.global_batch": 8, "train.warmup_steps": 2})
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["visual_tokens"] > 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert os.path.exists(os.path.join(run, "posttrain.yaml"))


def test_mpo_learns_to_prefer_the_right_colour(synthetic_data, colour_pairs, tmp_path):
    """From random weights on pairs chosen = the shape's colour, rejected = another colour: the
    reward accuracy on pairs never seen before (first epoch) must pass 0.9, so the policy reads the image."""
    run = str(tmp_path / "mpo")
    proc = _cli("examples/configs/mpo_tiny.yaml", _mpo(synthetic_data, colour_pairs, run, **{
        "train.steps": 40, "train.lr": 2e-3, "train.warmup_steps": 5}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(run)
    assert len(rows) == 40 and 40 * 16 <= 1000  # every step sees new pairs
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "mpo/dpo", "mpo/bco",
                "mpo/lm", "mpo/delta", "pairs"):
        assert key in rows[0], key
    assert rows[0]["rewards/accuracy"] == 0.0 and rows[0]["rewards/margin"] == 0.0  # policy == reference
    assert rows[0]["mpo/dpo"] == pytest.approx(0.6931, abs=1e-3)
    last = rows[-5:]
    accuracy = sum(r["rewards/accuracy"] for r in last) / len(last)
    print(f"reward accuracy over the last 5 steps {accuracy:.3f}; per step {[r['rewards/accuracy'] for r in rows]}")
    assert accuracy > 0.9, [r["rewards/accuracy"] for r in rows]
    assert all(r["rewards/margin"] > 0 for r in last)
    assert rows[-1]["mpo/dpo"] < 0.6 and rows[-1]["mpo/lm"] < rows[0]["mpo/lm"] / 4
    assert rows[-1]["mpo/delta"] != 0.0


def test_precomputed_reference_equals_frozen_model(synthetic_data, tmp_path):
    common = {"train.steps": 3, "train.global_batch": 4, "train.lr": 1e-3, "train.warmup_steps": 1}
    prefs = f"{synthetic_data}/preference_meta.json"
    a = _run("examples/configs/mpo_tiny.yaml", _mpo(synthetic_data, prefs, str(tmp_path / "model"), **common))
    b = _run("examples/configs/mpo_tiny.yaml", _mpo(synthetic_data, prefs, str(tmp_path / "pre"), **common,
                                                    **{"posttrain.mpo.reference": "precomputed"}))
    assert a.runner.objective.reference is not None and b.runner.objective.reference is None  # no frozen copy in memory
    assert os.path.exists(tmp_path / "pre" / "reference_logps.pt")
    assert len(b.runner.objective.store) == 12
    ra, rb = read_metrics(str(tmp_path / "model")), read_metrics(str(tmp_path / "pre"))
    for x, y in zip(ra, rb):
        for key in ("loss", "mpo/dpo", "mpo/bco", "mpo/lm", "rewards/chosen", "rewards/margin", "mpo/delta"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), key
    assert ra[-1]["rewards/margin"] != 0.0


def test_resume_restores_reward_shift(synthetic_data, tmp_path):
    prefs = f"{synthetic_data}/preference_meta.json"
    opts = {"train.steps": 4, "train.global_batch": 4, "train.lr": 1e-3, "train.warmup_steps": 1}
    full = str(tmp_path / "full")
    _run("examples/configs/mpo_tiny.yaml", _mpo(synthetic_data, prefs, full, **opts, **{"train.save_interval": 2}))
    ckpt = os.path.join(full, "checkpoints", "step_00000002")
    part = str(tmp_path / "part")
    resumed = _run("examples/configs/mpo_tiny.yaml", _mpo(synthetic_data, prefs, part, **opts,
                                                          **{"train.resume": ckpt}))
    assert resumed.runner.objective.shift.count == 4
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == [3, 4]
    assert b[0]["mpo/delta"] != 0.0  # the shift of steps 1-2 came from the checkpoint
    for x, y in zip(a[2:], b):
        for key in ("loss", "mpo/delta", "mpo/bco", "rewards/margin", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), (x["step"], key)


def test_bad_posttrain_config_fails_before_training(synthetic_data, tmp_path):
    proc = _cli("examples/configs/mpo_tiny.yaml", _mpo(synthetic_data, str(tmp_path / "missing.json"),
                                                        str(tmp_path / "run")))
    assert proc.returncode == 2
    assert "posttrain.data=" in proc.stderr and "not found" in proc.stderr
    proc = _cli("examples/configs/mpo_tiny.yaml", {"posttrain.mpo.pref_weight": -1, "posttrain.init": ""})
    assert proc.returncode == 2 and "posttrain.mpo.pref_weight=-1" in proc.stderr
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("mode", ["sft", "mpo", "prm"])
def test_async_save_in_every_mode(synthetic_data, tmp_path, mode):
    """``train.async_save`` is the trainer's, whatever the mode: checkpoints written in the background
    are complete and ``latest`` names the last one."""
    from engine.checkpoint import CheckpointReader

    run = str(tmp_path / mode)
    opts = {"train.steps": 4, "train.global_batch": 4, "train.warmup_steps": 1, "train.save_interval": 2,
            "train.async_save": "true", "run.dir": run, "data.tokenizer": f"{synthetic_data}/tokenizer.model"}
    if mode == "mpo":
        trainer = _run("examples/configs/mpo_tiny.yaml", _mpo(synthetic_data, f"{synthetic_data}/preference_meta.json",
                                                              run, **opts))
    else:
        meta = f"{synthetic_data}/prm/{mode}_meta.json"
        trainer = _run("examples/configs/prm_tiny.yaml", {**opts, "posttrain.mode": mode, "data.meta_path": meta})
    assert trainer.ckpt.async_save
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert trainer.ckpt.published()[-2:] == ["step_00000002", "step_00000004"]
    assert CheckpointReader(trainer.ckpt.latest()).meta["step"] == 4
