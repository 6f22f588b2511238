"""Checkpoints under faults: SIGKILL inside a save, SIGUSR1 preemption, damaged directories,
asynchronous saves, weights-only initialisation, extra runner state."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_overrides
from engine.checkpoint import CheckpointError, CheckpointManager, load_checkpoint, read_full_model, save_checkpoint
from engine.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples/configs/tiny.yaml")
STEPS = 4


def opts(data: str, run: str, **extra) -> list[str]:
    return tiny_overrides(data, run, **{"train.steps": STEPS, "train.save_interval": 2, **extra})


def trainer(overrides: list[str]):
    from engine.trainer import Trainer

    return Trainer(load_config(CONFIG, overrides))


def losses(rows: list[dict]) -> list[float]:
    return [r["loss"] for r in rows]


def cli(overrides: list[str], env: dict) -> subprocess.Popen:
    args = [sys.executable, "-m", "engine.train", "--config", CONFIG]
    for o in overrides:
        args += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **env)
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for(path: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def assert_same_curve(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) and got
    for a, b in zip(got, want):
        assert a == pytest.approx(b, rel=1e-6, abs=0)


@pytest.fixture(scope="module")
def reference(synthetic_data, tmp_path_factory):
    """Uninterrupted run that saves every 2 steps in the background (asynchronous saves)."""
    run = str(tmp_path_factory.mktemp("faults_ref"))
    t = trainer(opts(synthetic_data, run, **{"train.keep_last": 3}))
    t.ckpt.async_save = True
    rows = t.train()
    ck = os.path.join(run, "checkpoints")
    return {"run": run, "losses": losses(rows), "published": CheckpointManager(ck).published(),
            "latest": CheckpointManager(ck).latest()}


def test_async_saves_publish_and_resume(reference, synthetic_data, tmp_path):
    assert reference["published"] == ["step_00000002", "step_00000004"]
    assert reference["latest"].endswith("step_00000004")
    assert not [d for d in os.listdir(os.path.join(reference["run"], "checkpoints")) if d.startswith(".tmp")]
    ckpt = os.path.join(reference["run"], "checkpoints", "step_00000002")
    t = trainer(opts(synthetic_data, str(tmp_path), **{"train.resume": ckpt}))
    assert t.step == 2
    assert_same_curve(losses(t.train()), reference["losses"][2:])


def test_sigkill_inside_a_save_keeps_the_previous_checkpoint(reference, synthetic_data, tmp_path):
    run = str(tmp_path / "killed")
    proc = cli(opts(synthetic_data, run), {"ENGINE_CHECKPOINT_SAVE_DELAY": "4:300"})
    tmp = os.path.join(run, "checkpoints", ".tmp-step_00000004")
    wait_for(os.path.join(tmp, "rank_00000.rng.pt"), proc)  # the rank's files are written, not yet published
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    ck = CheckpointManager(os.path.join(run, "checkpoints"))
    assert ck.latest().endswith("step_00000002") and ck.published() == ["step_00000002"]
    CheckpointManager.check(ck.latest())
    with pytest.raises(CheckpointError, match=r"\.tmp-step_00000004 is incomplete: manifest\.json is missing"):
        CheckpointManager.check(tmp)
    t = trainer(opts(synthetic_data, run))  # resume=auto
    assert t.step == 2
    assert_same_curve(losses(t.train()), reference["losses"][2:])
    assert ck.published() == ["step_00000002", "step_00000004"] and not os.path.exists(tmp)


def test_sigusr1_saves_exits_and_resumes_the_same_curve(synthetic_data, tmp_path):
    # A long run with a learning rate that does not depend on train.steps (warm-up, then constant), so
    # wherever the signal lands, the resumed steps can be compared with an uninterrupted run as long.
    const_lr = {"train.lr": 2e-3, "train.min_lr": 2e-3, "train.save_interval": 0}
    run = str(tmp_path / "preempted")
    proc = cli(opts(synthetic_data, run, **{**const_lr, "train.steps": 1000}), {})
    metrics = os.path.join(run, "metrics.jsonl")
    wait_for(metrics, proc)
    while os.path.getsize(metrics) == 0:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0 and "stopped by signal" in out, out[-3000:]
    step = int(os.path.basename(CheckpointManager(os.path.join(run, "checkpoints")).latest()).split("_")[1])
    assert 1 <= step < 1000
    t = trainer(opts(synthetic_data, run, **{**const_lr, "train.steps": step + 2}))
    assert t.step == step
    want = trainer(opts(synthetic_data, str(tmp_path / "uninterrupted"), **{**const_lr, "train.steps": step + 2}))
    assert_same_curve(losses(t.train()), losses(want.train())[step:])


def _damaged(reference, tmp_path, name: str, damage) -> str:
    path = str(tmp_path / name)
    shutil.copytree(reference["latest"], path)
    damage(path)
    return path


def test_damaged_checkpoints_name_what_is_missing(reference, synthetic_data, tmp_path):
    def remove(f):
        return lambda p: os.remove(os.path.join(p, f))

    def truncate(p):
        with open(os.path.join(p, "rank_00000.safetensors"), "r+b") as f:
            f.truncate(1000)

    cases = {
        "missing_shard": (remove("rank_00000.safetensors"), "incomplete: missing rank_00000.safetensors"),
        "truncated": (truncate, "rank_00000.safetensors is truncated or altered: 1000 bytes"),
        "no_meta": (remove("meta.json"), "incomplete: missing meta.json"),
        "no_index": (remove("index.json"), "incomplete: missing index.json"),
        "no_manifest": (remove("manifest.json"), "manifest.json is missing"),
    }
    for name, (damage, message) in cases.items():
        path = _damaged(reference, tmp_path, name, damage)
        with pytest.raises(CheckpointError, match=message):
            trainer(opts(synthetic_data, str(tmp_path / f"run_{name}"), **{"train.resume": path}))

    other = opts(synthetic_data, str(tmp_path / "run_other"), **{"train.resume": reference["latest"],
                                                                  "model.llm.intermediate_size": 192})
    with pytest.raises(CheckpointError, match=r"shape mismatch language_model\.layers\.0\.mlp\.gate_proj\.weight: "
                                              r"checkpoint \(256, 128\), model \(192, 128\)"):
        trainer(other)


def test_weights_only_checkpoint_initialises_then_the_run_continues(reference, synthetic_data, tmp_path):
    from engine.checkpoint.convert import to_engine
    from engine.models.hf_adapter import save_pretrained
    from engine.models.internvl import InternVLModel

    weights, cfg = read_full_model(reference["latest"])
    model = InternVLModel(cfg, init=False)
    model.load_state_dict(weights)
    save_pretrained(model, str(tmp_path / "hf"), format="internvl_chat")  # the tiny model uses ps v2
    to_engine(str(tmp_path / "hf"), str(tmp_path / "init"), out=lambda s: None)

    run = str(tmp_path / "finetune")
    over = opts(synthetic_data, run, **{"train.resume": str(tmp_path / "init"), "train.steps": 2})
    t = trainer(over)
    assert t.step == 0
    for name, p in t.runner.model.named_parameters():
        assert torch.equal(p.detach(), weights[name]), name
    t.train()
    again = trainer(over)  # restarted with the same command: continues from its own checkpoint
    assert again.step == 2


def test_extra_runner_state_round_trips(tmp_path):
    from engine.config import Config
    from engine.models.internvl import InternVLModel
    from engine.models.presets import preset_model_config
    from engine.parallel.objective import LanguageModelling
    from engine.step import LocalRunner

    class ShiftObjective(LanguageModelling):  # an objective with state, like MPO's reward shift
        shift = 0.0

        def state_dict(self):
            return {"reward_shift": {"value": self.shift}}

        def load_state_dict(self, state):
            self.shift = state["reward_shift"]["value"]

    def ShiftRunner(model, cfg, device):
        return LocalRunner(model, cfg, device, objective=ShiftObjective())

    cfg = Config()
    cfg.model = preset_model_config("tiny")
    a = ShiftRunner(InternVLModel(cfg.model), cfg, torch.device("cpu"))
    a.objective.shift = 0.375
    path = save_checkpoint(CheckpointManager(str(tmp_path)), 1, a, cfg, {"step": 1})
    torch.manual_seed(1)
    b = ShiftRunner(InternVLModel(cfg.model), cfg, torch.device("cpu"))
    assert load_checkpoint(path, b, cfg).kind == "train"
    assert b.objective.shift == 0.375
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n
