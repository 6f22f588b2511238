"""End-to-end training on one process: loss falls, resume is exact, preemption saves, the vision path is used."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_overrides
from engine.config import load_config
from engine.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(overrides):
    from engine.trainer import Trainer

    cfg = load_config(os.path.join(ROOT, "examples/configs/tiny.yaml"), overrides)
    trainer = Trainer(cfg)
    trainer.train()
    return trainer


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc)."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.split("/")[2]))
    return out


def _cli(overrides, env_extra=None, **kw):
    args = [sys.executable, "-m", "engine.train", "--config", "examples/configs/tiny.yaml"]
    for o in overrides:
        args += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **(env_extra or {}))
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


@pytest.fixture(scope="module")
def reference_run(synthetic_data, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("ref"))
    _train(tiny_overrides(synthetic_data, run, **{"train.steps": 8}))
    return read_metrics(run)


def test_metrics_rows(reference_run):
    assert [r["step"] for r in reference_run] == list(range(1, 9))
    for key in ("loss", "lr", "grad_norm", "tokens", "text_tokens", "visual_tokens", "skipped_samples", "step_time"):
        assert key in reference_run[0]
    assert all(r["tokens"] == r["text_tokens"] + r["visual_tokens"] for r in reference_run)
    assert any(r["visual_tokens"] > 0 for r in reference_run)
    assert reference_run[-1]["loss"] < reference_run[0]["loss"]


def test_resume_after_kill_continues_the_same_curve(synthetic_data, tmp_path, reference_run):
    run = str(tmp_path / "killed")
    # The save at step 6 stalls after writing its files, so the kill lands after the step-3 checkpoint
    # and before the run ends, however slowly this process polls.
    # Loading runs in two worker processes (prefetching): they die with the trainer, and their
    # shared-memory slots are removed by the next run.
    opts = tiny_overrides(synthetic_data, run, **{"train.steps": 8, "train.save_interval": 3, "data.num_workers": 2})
    proc = _cli(opts, env_extra={"ENGINE_CHECKPOINT_SAVE_DELAY": "6:300"})
    stalled = os.path.join(run, "checkpoints", ".tmp-step_00000006", "rank_00000.rng.pt")
    deadline = time.time() + 300
    while not os.path.exists(stalled) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    workers = children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate()[0].decode()
    assert len(workers) >= 2, out[-3000:]
    deadline = time.time() + 30
    while any(os.path.exists(f"/proc/{w}") for w in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{w}") for w in workers), "loader workers outlived the killed trainer"
    latest = os.path.join(run, "checkpoints", "latest")
    assert os.path.exists(stalled) and os.path.exists(latest), out[-3000:]
    with open(latest) as f:
        saved = int(f.read().split("_")[1])
    assert saved == 3
    _train(opts)
    assert not glob.glob(f"/dev/shm/engine-loader-{proc.pid}-*")
    resumed = read_metrics(run)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(resumed[saved:], reference_run[saved:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_sigterm_saves_and_exits_cleanly(synthetic_data, tmp_path, reference_run):
    run = str(tmp_path / "preempted")
    proc = _cli(tiny_overrides(synthetic_data, run, **{"train.steps": 200}))
    metrics = os.path.join(run, "metrics.jsonl")
    deadline = time.time() + 300
    while (not os.path.exists(metrics) or os.path.getsize(metrics) == 0) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0].decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out
    assert "stopped by signal" in out
    with open(os.path.join(run, "checkpoints", "latest")) as f:
        step = int(f.read().split("_")[1])
    assert 1 <= step < 200
    rows = read_metrics(run)
    assert rows[-1]["step"] == step


def test_bad_config_fails_before_training(tmp_path):
    proc = _cli(["parallel.llm.tp=3", f"run.dir={tmp_path}"])
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 2
    assert "parallel.llm.tp=3" in out and "num_heads" in out
    assert not os.path.exists(os.path.join(tmp_path, "metrics.jsonl"))


def test_init_from_transformers_checkpoint(tmp_path):
    from engine.config import ConfigError
    from engine.models.hf_adapter import save_pretrained
    from engine.models.internvl import InternVLModel
    from engine.models.presets import preset_model_config
    from engine.trainer import build_model

    torch.manual_seed(3)
    src = InternVLModel(preset_model_config("tiny"))
    save_pretrained(src, str(tmp_path / "hf"))
    cfg = load_config(os.path.join(ROOT, "examples/configs/tiny.yaml"), [f"train.init_from={tmp_path / 'hf'}"])
    model = build_model(cfg)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    cfg.model.llm.num_layers = 2
    with pytest.raises(ConfigError, match="train.init_from"):
        build_model(cfg)
