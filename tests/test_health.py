"""Run health: a step with a non-finite (or, with ``train.spike_factor``, spiking) loss or gradient
norm updates nothing and is counted; ``train.max_bad_steps`` in a row stop the run, leaving the
last good checkpoint as ``latest``. Driven by the fault drill ``faults.nan_at_steps``."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_overrides
from dist_utils import run_distributed
from engine.checkpoint import CheckpointManager
from engine.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples/configs/tiny.yaml")


def _optimizer_state(opt) -> list[torch.Tensor]:
    return [v.clone() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]


def test_a_nan_step_is_skipped_and_the_run_goes_on(synthetic_data, tmp_path):
    from engine.trainer import Trainer

    cfg = load_config(CONFIG, tiny_overrides(synthetic_data, str(tmp_path), **{
        "train.steps": 12, "train.save_interval": 0, "faults.nan_at_steps": "[5]"}))
    t = Trainer(cfg)
    rows = []
    for step in range(1, 13):
        if step == 5:
            weights = {k: v.clone() for k, v in t.runner.model.state_dict().items()}
            moments, lr = _optimizer_state(t.runner.optimizer), t.scheduler.get_last_lr()
        rows.append(t.train_step())
        if step == 5:
            assert all(torch.equal(v, weights[k]) for k, v in t.runner.model.state_dict().items())
            after = _optimizer_state(t.runner.optimizer)
            assert len(after) == len(moments) and all(torch.equal(a, b) for a, b in zip(after, moments))
            assert t.scheduler.get_last_lr() == lr
    assert math.isnan(rows[4]["loss"])
    assert [r["skipped_steps"] for r in rows] == [0] * 4 + [1] * 8
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for i, r in enumerate(rows) if i != 4)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_consecutive_bad_steps_stop_the_run_and_keep_the_last_good_checkpoint(synthetic_data, tmp_path):
    args = [sys.executable, "-m", "engine.train", "--config", CONFIG]
    for o in tiny_overrides(synthetic_data, str(tmp_path), **{
            "train.steps": 12, "train.save_interval": 2, "faults.nan_at_steps": "[3,4,5,6]",
            "train.max_bad_steps": 3}):
        args += ["--set", o]
    proc = subprocess.run(args, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-3000:]
    assert "steps [3, 4, 5]" in out and "train.max_bad_steps=3" in out
    assert "step 3 skipped (non-finite loss nan)" in out
    assert CheckpointManager(os.path.join(str(tmp_path), "checkpoints")).latest().endswith("step_00000002")


def test_spike_guard_and_non_finite_norm():
    from engine.config import TrainConfig
    from engine.trainer import StepHealth, TrainingHealthError

    h = StepHealth(TrainConfig(spike_factor=2.0, spike_window=2, max_bad_steps=2))
    assert h.check(1.0, 1.0) is None and h.check(1.5, 1.0) is None
    assert h.check(2.9, 1.0) is None  # below 2 x max(1.0, 1.5)
    assert "loss spike" in h.check(6.0, 1.0)  # above 2 x max(1.5, 2.9)
    h.skip(4, "loss spike", ["a.jsonl:1"])
    assert "non-finite gradient norm" in h.check(1.0, float("inf"))
    with pytest.raises(TrainingHealthError, match=r"steps \[4, 5\]"):
        h.skip(5, "non-finite gradient norm inf", [])
    off = StepHealth(TrainConfig())
    assert all(off.check(x, 1.0) is None for x in (1.0, 100.0, 1e6))  # spike guard off by default


def test_bad_health_settings_fail_before_training():
    for key, value in (("faults.nan_at_steps", "[0]"), ("faults.nan_at_steps", "five"),
                       ("train.spike_factor", "0.5"), ("train.max_bad_steps", "0"), ("train.hang_timeout_s", "-1"),
                       ("faults.stall_seconds", "-5")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(CONFIG, [f"{key}={value}"])
    from engine.config import validate_config

    cfg = load_config(CONFIG, ["faults.stall_rank=2", "faults.stall_seconds=10", "faults.stall_at_step=1"])
    with pytest.raises(ConfigError, match=r"faults\.stall_rank=2 is not a rank of a world of 2"):
        validate_config(cfg, 2)


def _nan_under_tp(rank: int, world: int, data: str, run: str) -> dict:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from engine.trainer import Trainer

    cfg = load_config(CONFIG, tiny_overrides(data, run, **{"train.steps": 3, "train.save_interval": 0,
                                                           "faults.nan_at_steps": "[2]", "parallel.llm.tp": 2}))
    t = Trainer(cfg)
    t.train_step()
    before = {k: v.clone() for k, v in t.runner.model.state_dict().items()}
    second = t.train_step()
    same = all(torch.equal(v, before[k]) for k, v in t.runner.model.state_dict().items())
    third = t.train_step()
    return {"skipped": [second["skipped_steps"], third["skipped_steps"]], "same": same,
            "losses": [second["loss"], third["loss"]],
            "straggler": (third["straggler/rank"], third["straggler/ratio"])}


def test_every_rank_skips_the_same_step(synthetic_data, tmp_path):
    """LLM tp=2 on 2 processes: the NaN is injected on one rank; both skip step 2 and go on."""
    for r in run_distributed(_nan_under_tp, 2, synthetic_data, str(tmp_path), timeout=300):
        assert r["skipped"] == [1, 1] and r["same"]
        assert math.isnan(r["losses"][0]) and math.isfinite(r["losses"][1])
        assert r["straggler"][0] in (0, 1) and r["straggler"][1] >= 1.0


def test_straggler_report(caplog):
    from engine.config import TrainConfig
    from engine.parallel.runner import straggler_stats
    from engine.trainer import StepHealth

    assert straggler_stats([1.0, 3.0, 1.0, 1.5]) == {"straggler/rank": 1, "straggler/ratio": 3.0 / 1.25}
    h = StepHealth(TrainConfig())
    with caplog.at_level("WARNING", logger="engine.trainer"):
        for step in range(1, 10):
            h.straggler(step, 3, 1.5)
        h.straggler(10, 2, 1.5)  # another rank breaks the run
        assert "slowest" not in caplog.text
        for step in range(11, 21):
            h.straggler(step, 2, 1.3 if step != 15 else 1.1)  # 1.1: not a straggler, the count restarts
        assert "slowest" not in caplog.text
        for step in range(21, 26):
            h.straggler(step, 2, 1.3)
    assert "rank 2 has been the slowest for 10 steps (step 25" in caplog.text


# ----------------------------------------------------------------------------- hang watchdog

def _log_time(line: str) -> float:
    """Epoch seconds of a log line's ``%(asctime)s`` stamp."""
    import datetime

    stamp = " ".join(line.split(" ")[:2])
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_a_stalled_rank_is_named_and_every_rank_exits(synthetic_data, tmp_path):
    """2 gloo ranks; rank 1 sleeps 300 s at the start of step 3; train.hang_timeout_s=20."""
    import time

    opts = tiny_overrides(synthetic_data, str(tmp_path / "run"), **{
        "train.steps": 6, "train.save_interval": 0, "train.hang_timeout_s": 20, "faults.stall_rank": 1,
        "faults.stall_at_step": 3, "faults.stall_seconds": 300})
    cmd = [sys.executable, "-m", "engine.train", "--config", CONFIG]
    for o in opts:
        cmd += ["--set", o]
    procs, logs = [], []
    for rank in (0, 1):
        logs.append(open(tmp_path / f"rank{rank}.log", "w+"))
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", PYTHONPATH=ROOT,
                   ENGINE_INIT_METHOD=f"file://{tmp_path / 'rendezvous'}")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
    ended = [None, None]
    deadline = time.time() + 400
    try:
        while None in ended and time.time() < deadline:
            for r, p in enumerate(procs):
                if ended[r] is None and p.poll() is not None:
                    ended[r] = time.time()
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = []
    for f in logs:
        f.seek(0)
        out.append(f.read())
        f.close()
    assert None not in ended, "a rank was still running:\n" + "\n".join(o[-2000:] for o in out)
    stall = next(line for line in out[1].splitlines() if "fault drill: rank 1 stalls" in line)
    for r, p in enumerate(procs):
        assert p.returncode != 0, out[r][-3000:]
        assert ended[r] - _log_time(stall) < 90, f"rank {r} ended {ended[r] - _log_time(stall):.0f} s after the stall"
    assert procs[1].returncode == 4 and "rank 1: hang watchdog: step 3" in out[1], out[1][-3000:]
    assert "phase 'stall (fault drill faults.stall_*)'" in out[1]
    # rank 0 names rank 1 and where it was, whether its own watchdog or the broken collective ended it
    assert "ranks that did not arrive: rank 1 (step 3, 'stall (fault drill faults.stall_*)')" in out[0], out[0][-3000:]
