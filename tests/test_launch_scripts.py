"""The example launch scripts: syntax, shellcheck, the exact torchrun command each one runs
(DRY_RUN=1 with a faked SLURM allocation), and the SIGUSR1 -> checkpoint -> requeue path."""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import time

import pytest

from engine.config import load_config
from engine.train import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "examples", "*.sh")))
SLURM_SCRIPTS = {"pretrain_78b.sh": "pretrain_78b", "sft_78b.sh": "sft_78b"}
NODE_SCRIPTS = {"pretrain_1b.sh": "pretrain_1b", "pretrain_2b.sh": "pretrain_2b", "pretrain_8b.sh": "pretrain_8b",
                "sft_8b.sh": "sft_8b"}
HOSTS = ["h100-c07", "h100-c08", "h100-c11"]

FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG"
if [[ "$1 $2" == "show hostnames" ]]; then
    printf '%s\\n' HOSTS
    if [[ -n "${FAKE_MANY_HOSTS:-}" ]]; then seq -f 'h100-x%06g' 1 200000; fi
fi
""".replace("HOSTS", " ".join(HOSTS))
FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$FAKE_LOG"
if [[ "$*" == *engine.preflight* ]]; then exit "${FAKE_PREFLIGHT_EXIT:-0}"; fi
echo "signals=$TORCHELASTIC_SIGNALS_TO_HANDLE timeout=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" >> "$FAKE_LOG"
trap 'echo "srun: SIGUSR1 forwarded" >> "$FAKE_LOG"; exit 7' USR1
if [[ -n "${FAKE_SRUN_WAIT:-}" ]]; then
    touch "$FAKE_SRUN_WAIT"
    for _ in $(seq 300); do sleep 0.1; done
fi
exit "${FAKE_SRUN_EXIT:-0}"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    """PATH with fake ``scontrol`` / ``srun`` that log their calls, and the variables sbatch sets."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="h100-c[07-08,11]", SLURM_NNODES="3", SLURM_GPUS_ON_NODE="8",
               SLURM_CPUS_PER_TASK="96", SLURM_SUBMIT_DIR=ROOT)
    return env, log


def sbatch_header(path: str) -> dict[str, str]:
    out = {}
    for line in open(path):
        m = re.match(r"#SBATCH --([\w-]+)(?:=(\S+))?", line)
        if m:
            out[m.group(1)] = m.group(2) or ""
    return out


def test_scripts_exist():
    names = {os.path.basename(s) for s in SCRIPTS}
    assert set(SLURM_SCRIPTS) | set(NODE_SCRIPTS) | {"launch_common.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
    out = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); bash -n is checked above")
    out = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _trainer_argv(cmd: list[str]) -> list[str]:
    i = cmd.index("-m")
    assert cmd[i + 1] == "engine.train"
    return cmd[i + 2:]


def _check_trainer_args(argv: list[str], config: str, run_dir: str, meta: str, extra: list[str]) -> None:
    args = parse_args(argv)
    assert args.config == os.path.join(ROOT, "examples", "configs", f"{config}.yaml")
    assert os.path.isfile(args.config)
    assert f"run.dir={run_dir}" in args.overrides
    assert f"data.meta_path={meta}" in args.overrides
    assert "train.resume=auto" in args.overrides  # continue from RUN_DIR/checkpoints/latest
    assert args.overrides[-len(extra):] == extra  # the script's own --set arguments come last
    cfg = load_config(args.config, args.overrides)  # every override names a real key
    assert cfg.run_dir == run_dir and cfg.data.meta_path == meta and cfg.train.steps == 7


@pytest.mark.parametrize("script,config", sorted(SLURM_SCRIPTS.items()))
def test_slurm_dry_run(script, config, fake_slurm, tmp_path):
    env, log = fake_slurm
    env.update(DRY_RUN="1", RUN_DIR=str(tmp_path / "run"), DATA_META="/lustre/data/meta.json")
    out = subprocess.run(["bash", os.path.join(ROOT, "examples", script), "--set", "train.steps=7"],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    check, cmd = shlex.split(lines[0]), shlex.split(lines[1])
    # first every node runs the preflight with the trainer's config and overrides and this layout
    p = check.index("engine.preflight")
    assert check[0] == "srun" and {"--nodes=3", "--ntasks-per-node=1"} <= set(check[:p])
    assert check[p - 1] == "-m" and check[p + 1:] == cmd[cmd.index("-m") + 2:] + ["--nodes", "3", "--gpus-per-node", "8"]
    assert cmd[0] == "srun"
    assert {"--nodes=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=96"} <= set(cmd)
    t = cmd.index("torchrun")
    tr = cmd[t:cmd.index("-m")]
    assert {"--nnodes=3", "--nproc-per-node=8", "--rdzv-backend=c10d", f"--rdzv-endpoint={HOSTS[0]}:29500",
            "--rdzv-id=4242"} <= set(tr)
    _check_trainer_args(_trainer_argv(cmd), config, str(tmp_path / "run"), "/lustre/data/meta.json",
                        ["train.steps=7"])
    calls = log.read_text()
    assert "scontrol show hostnames h100-c[07-08,11]" in calls and "srun" not in calls  # dry: nothing launched


@pytest.mark.parametrize("script,config", sorted(SLURM_SCRIPTS.items()))
def test_sbatch_header(script, config):
    h = sbatch_header(os.path.join(ROOT, "examples", script))
    assert h["nodes"] == "32" and h["gpus-per-node"] == "8" and h["ntasks-per-node"] == "1"
    assert int(h["cpus-per-task"]) > 0 and re.fullmatch(r"\d+:\d\d:\d\d", h["time"])
    assert "exclusive" in h and "requeue" in h and h["open-mode"] == "append"
    assert re.fullmatch(r"B:USR1@(\d+)", h["signal"])
    assert "%j" in h["output"] and "%j" in h["error"]
    # the warning leaves torchrun's shutdown grace period time to save before the limit
    lead = int(h["signal"].split("@")[1])
    common = open(os.path.join(ROOT, "examples", "launch_common.sh")).read()
    grace = int(re.search(r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)", common).group(1))
    assert grace < lead


@pytest.mark.parametrize("script,config", sorted(NODE_SCRIPTS.items()))
def test_single_node_dry_run(script, config, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(DRY_RUN="1", GPUS_PER_NODE="8", RUN_DIR=str(tmp_path / "run"), DATA_META="/data/meta.json")
    out = subprocess.run(["bash", os.path.join(ROOT, "examples", script), "--set", "train.steps=7"],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    check, cmd = (shlex.split(line) for line in out.stdout.strip().splitlines())
    assert check[:3] == ["python", "-m", "engine.preflight"]
    assert check[3:] == cmd[cmd.index("-m") + 2:] + ["--nodes", "1", "--gpus-per-node", "8"]
    assert cmd[0] == "torchrun"
    assert {"--standalone", "--nnodes=1", "--nproc-per-node=8"} <= set(cmd[:cmd.index("-m")])
    _check_trainer_args(_trainer_argv(cmd), config, str(tmp_path / "run"), "/data/meta.json",
                        ["train.steps=7"])


def test_long_node_list(fake_slurm, tmp_path):
    """``head -n1`` closes the pipe early; scontrol's SIGPIPE must not end the script."""
    env, _ = fake_slurm
    env.update(DRY_RUN="1", FAKE_MANY_HOSTS="1")
    out = subprocess.run(["bash", os.path.join(ROOT, "examples", "pretrain_78b.sh")], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"--rdzv-endpoint={HOSTS[0]}:29500" in shlex.split(out.stdout)


def test_trainer_module_variable(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(DRY_RUN="1", GPUS_PER_NODE="4", TRAINER_MODULE="engine.posttrain.train")
    out = subprocess.run(["bash", os.path.join(ROOT, "examples", "sft_8b.sh")], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(out.stdout.strip().splitlines()[-1])
    assert cmd[cmd.index("-m") + 1] == "engine.posttrain.train" and "--nproc-per-node=4" in cmd


def test_slurm_script_needs_an_allocation(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["DRY_RUN"] = "1"
    out = subprocess.run(["bash", os.path.join(ROOT, "examples", "pretrain_78b.sh")], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "SLURM_JOB_ID" in out.stderr


def test_usr1_checkpoints_and_requeues(fake_slurm, tmp_path):
    """SLURM's SIGUSR1 to the batch shell reaches srun (and through torchrun, whose signal list the
    script extends, the trainers); once they exit the job requeues itself."""
    env, log = fake_slurm
    started = tmp_path / "srun-started"
    env.update(FAKE_SRUN_WAIT=str(started), RUN_DIR=str(tmp_path / "run"))
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "examples", "pretrain_78b.sh")], cwd=str(tmp_path),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "srun was not started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    calls = log.read_text().splitlines()
    assert proc.returncode == 0, err
    assert "srun: SIGUSR1 forwarded" in calls
    assert "SIGUSR1" in calls[calls.index(next(c for c in calls if c.startswith("signals=")))]
    assert calls[-1] == "scontrol requeue 4242"
    assert "requeueing job 4242" in err


def test_failure_is_not_requeued(fake_slurm, tmp_path):
    env, log = fake_slurm
    env.update(FAKE_SRUN_EXIT="5", RUN_DIR=str(tmp_path / "run"))
    out = subprocess.run(["bash", os.path.join(ROOT, "examples", "pretrain_78b.sh")], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 5
    assert "scontrol requeue" not in log.read_text()


def test_a_failed_preflight_stops_the_launch(fake_slurm, tmp_path):
    env, log = fake_slurm
    env.update(FAKE_PREFLIGHT_EXIT="1", RUN_DIR=str(tmp_path / "run"))
    out = subprocess.run(["bash", os.path.join(ROOT, "examples", "pretrain_78b.sh")], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=60)
    calls = log.read_text()
    assert out.returncode != 0 and "engine.preflight" in calls and "torchrun" not in calls


def test_preflight_can_be_skipped(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(DRY_RUN="1", GPUS_PER_NODE="8", PREFLIGHT="0")
    out = subprocess.run(["bash", os.path.join(ROOT, "examples", "pretrain_8b.sh")], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "engine.preflight" not in out.stdout
    assert shlex.split(out.stdout)[0] == "torchrun"
