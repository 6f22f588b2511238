"""The MPO recipes for 8B and 78B: valid configs for their world sizes, and the launch scripts run
the post-training entry point with the MPO variables (DRY_RUN=1, faked SLURM allocation)."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from engine.config import ConfigError, validate_config
from engine.posttrain.config import load_posttrain_config, validate_posttrain
from engine.posttrain.train import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {"mpo_8b": 8, "mpo_78b": 256}


@pytest.mark.parametrize("name,world", sorted(RECIPES.items()))
def test_mpo_recipe_is_valid_for_its_world(name, world):
    cfg, pt = load_posttrain_config(os.path.join(ROOT, f"examples/configs/{name}.yaml"), validate=False)
    validate_config(cfg, world)
    assert pt.mode == "mpo"
    assert (pt.mpo.pref_weight, pt.mpo.quality_weight, pt.mpo.gen_weight) == (0.8, 0.2, 1.0)
    assert cfg.train.lr == 2e-7 and cfg.data.max_sample_tokens == 12288
    assert cfg.data.jpeg_aug_prob == 0.0 and cfg.data.loss_reduction == "token"
    with pytest.raises(ConfigError, match="posttrain.data='data/mmpr/meta.json': file not found"):
        validate_posttrain(pt, cfg)  # the data is not in the repository


def _fake_slurm(tmp_path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node-a\necho node-b\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="77", SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="2",
               SLURM_GPUS_ON_NODE="8", SLURM_SUBMIT_DIR=ROOT)
    return env


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_mpo_script_dry_run(name, tmp_path):
    env = _fake_slurm(tmp_path) if name.endswith("78b") else {
        k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(DRY_RUN="1", GPUS_PER_NODE="8", RUN_DIR=str(tmp_path / "run"), PREFERENCE_DATA="/data/mmpr.json",
               INIT="/runs/sft")
    out = subprocess.run(["bash", os.path.join(ROOT, "examples", f"{name}.sh"), "--set", "train.steps=7"],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(out.stdout.strip().splitlines()[-1])
    assert cmd[0] == ("srun" if name.endswith("78b") else "torchrun")
    i = cmd.index("-m")
    assert cmd[i + 1] == "engine.posttrain.train"
    args = parse_args(cmd[i + 2:])
    assert args.config == os.path.join(ROOT, "examples", "configs", f"{name}.yaml")
    assert args.overrides[-1] == "train.steps=7"  # the caller's arguments come last
    cfg, pt = load_posttrain_config(args.config, args.overrides, validate=False)
    assert (pt.data, pt.init) == ("/data/mmpr.json", "/runs/sft")
    assert cfg.run_dir == str(tmp_path / "run") and cfg.train.resume == "auto" and cfg.train.steps == 7
