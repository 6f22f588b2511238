"""Sharded construction: every rank materialises only its own shards, and they are exactly the
slices of the model one process builds with the same seed (or of the transformers checkpoint it
starts from), for tp, pp, vpp, hp and ViT tp layouts; the parallel plan agrees with the planner;
bad ``train.init_from`` directories name the tensor and the file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from engine.config import ConfigError, apply_override, config_from_dict
from engine.models.hf_adapter import save_pretrained
from engine.models.internvl import InternVLModel
from engine.parallel.tensor_parallel import shard_tensor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (preset, overrides, world): every rank of each is rehearsed and compared with one process.
LAYOUTS = {
    "llm_tp2_vit_tp2": ("tiny", ["parallel.llm.tp=2", "parallel.vit.tp=2"], 4),
    "llm_tp4_kv_replicas_vit_tp4_padded_heads": ("tiny-6b-vit", ["parallel.llm.tp=4", "parallel.vit.tp=4"], 4),
    "llm_pp2_vpp2": ("tiny", ["parallel.llm.pp=2", "parallel.llm.vpp=2", "parallel.llm.microbatches=2"], 4),
    "llm_tp2_hp2_pp2_vit_hp2": ("tiny", ["parallel.llm.tp=2", "parallel.llm.hp=2", "parallel.llm.pp=2",
                                         "parallel.llm.microbatches=2", "parallel.vit.hp=2"], 8),
}


def make_cfg(preset: str, overrides: list[str], seed: int = 7):
    cfg = config_from_dict({"model": {"preset": preset}})
    for o in overrides + [f"train.seed={seed}"]:
        apply_override(cfg, o)
    return cfg


def one_process(cfg) -> dict[str, torch.Tensor]:
    from engine.trainer import build_model

    return build_model(cfg).state_dict()


def expected_slice(full: torch.Tensor, cfg, name: str, world: int, rank: int) -> torch.Tensor:
    from engine.parallel.plan import plan_for
    from engine.planning.rehearse import rank_coords

    p = plan_for(cfg)[name]
    c = rank_coords(cfg, world, rank)
    tp_rank = (c.llm if p.grid == "llm" else c.vit)["tp"]
    tp = (cfg.parallel.llm if p.grid == "llm" else cfg.parallel.vit).tp
    return shard_tensor(full, p.info, tp_rank, tp) if p.info.dim is not None else full


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_rank_shards_are_the_one_process_slices(name):
    from engine.parallel.plan import plan_for
    from engine.planning.rehearse import build_rank_shards, rank_coords

    preset, overrides, world = LAYOUTS[name]
    cfg = make_cfg(preset, overrides)
    full = one_process(cfg)
    plan = plan_for(cfg)
    held_anywhere = set()
    for rank in range(world):
        shards = build_rank_shards(cfg, world, rank)
        stage = rank_coords(cfg, world, rank).llm["pp"]
        assert set(shards) == {p.name for p in plan.rank_params(stage)}, rank
        held_anywhere |= set(shards)
        for key, local in shards.items():
            assert torch.equal(local, expected_slice(full[key], cfg, key, world, rank)), f"rank {rank}: {key}"
        layers = {int(k.split(".")[2]) for k in shards if k.startswith("language_model.layers.")}
        assert layers == {i for r in plan.ranges[stage] for i in r}
    assert held_anywhere == set(full), "every parameter is held by some rank"


def test_init_depends_on_the_seed_and_the_name_only():
    a = make_cfg("tiny", [], seed=7)
    m1, m2 = one_process(a), one_process(a)
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    other = one_process(make_cfg("tiny", [], seed=8))
    assert not torch.equal(m1["language_model.layers.0.mlp.up_proj.weight"],
                           other["language_model.layers.0.mlp.up_proj.weight"])
    w = m1["language_model.layers.0.mlp.up_proj.weight"]
    assert abs(float(w.std()) - 0.02) < 0.002 and abs(float(w.mean())) < 0.002
    assert torch.equal(m1["vision_model.layers.0.ls1"], torch.full_like(m1["vision_model.layers.0.ls1"], 0.1))
    assert not torch.equal(m1["language_model.layers.0.mlp.up_proj.weight"],
                           m1["language_model.layers.1.mlp.up_proj.weight"])


def test_blocks_make_no_difference(monkeypatch):
    """Values are drawn in blocks of whole rows; a slice drawn alone equals that slice of the whole."""
    from engine.models import init
    from engine.models.init import InitRule, initial_tensor

    monkeypatch.setattr(init, "BLOCK_ELEMENTS", 48)  # rows of 10: blocks of 4 rows
    rule = InitRule("normal", 1.0)
    whole = initial_tensor(rule, "w", (23, 10), seed=3)
    for a, b in ((0, 23), (5, 9), (7, 8), (12, 23)):
        assert torch.equal(initial_tensor(rule, "w", (23, 10), 3, 0, a, b), whole[a:b])
    cols = initial_tensor(rule, "v", (6, 40), seed=3, dim=1)
    assert torch.equal(initial_tensor(rule, "v", (6, 40), 3, 1, 13, 29), cols[:, 13:29])
    scratch = torch.full((64,), float("nan"))  # blocks drawn into a reused buffer: the same values
    for a, b in ((0, 23), (5, 9)):
        out = init.fill_slice(torch.empty(b - a, 10), rule, "w", (23, 10), 3, 0, a, scratch=scratch)
        assert torch.equal(out, whole[a:b])


def test_local_runner_builds_the_same_model_on_meta():
    from engine.step import LocalRunner
    from engine.trainer import build_model

    cfg = make_cfg("tiny", [])
    meta = build_model(cfg, meta=True)
    assert all(p.is_meta for p in meta.parameters())
    runner = LocalRunner(meta, cfg, torch.device("cpu"))
    want = one_process(cfg)
    got = runner.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_plan_matches_the_planner_per_stage():
    """The rehearsal's parameter count per rank is the planner's count for that rank's stage."""
    from engine.planning import get_gpu, make_plan, plan_dict
    from engine.planning.rehearse import rehearse

    preset, overrides, world = LAYOUTS["llm_tp2_hp2_pp2_vit_hp2"]
    cfg = make_cfg(preset, overrides)
    stages = plan_dict(make_plan(cfg, 1, world, get_gpu("h100")))["stages"]
    for rank in (0, world - 1):
        r = rehearse(cfg, world, rank)
        assert r["params"] == stages[r["llm_stage"]]["params"]["total"], rank
        assert r["param_bytes"] == 4 * r["params"]


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A tiny-6b-vit model saved in transformers format in bf16 (the shape of a real init_from)."""
    torch.manual_seed(11)
    model = InternVLModel(make_cfg("tiny-6b-vit", []).model)
    path = str(tmp_path_factory.mktemp("hf") / "model")
    save_pretrained(model.to(torch.bfloat16), path)
    return path, {k: v.float() for k, v in model.state_dict().items()}


def test_init_from_reads_each_ranks_slices(hf_checkpoint, monkeypatch):
    from engine.models import init
    from engine.planning.rehearse import build_rank_shards
    from engine.step import LocalRunner
    from engine.trainer import build_model

    monkeypatch.setattr(init, "BLOCK_ELEMENTS", 200)  # several reads per tensor
    path, full = hf_checkpoint
    cfg = make_cfg("tiny-6b-vit", ["parallel.llm.tp=4", "parallel.vit.tp=4", f"train.init_from={path}"])
    for rank in range(4):
        for key, local in build_rank_shards(cfg, 4, rank).items():
            assert torch.equal(local, expected_slice(full[key], cfg, key, 4, rank)), f"rank {rank}: {key}"
    one = make_cfg("tiny-6b-vit", [f"train.init_from={path}"])
    got = LocalRunner(build_model(one, meta=True), one, torch.device("cpu")).model.state_dict()
    assert all(torch.equal(got[k], full[k]) for k in full)


def test_init_from_problems_name_the_tensor_and_the_file(hf_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    from engine.step import LocalRunner
    from engine.trainer import build_model

    path, _ = hf_checkpoint
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in os.listdir(path):
        if f != "model.safetensors":
            shutil.copy(os.path.join(path, f), broken / f)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    victim = next(k for k in tensors if "mlp.fc1.weight" in k)
    del tensors[victim]
    save_file(tensors, str(broken / "model.safetensors"))
    cfg = make_cfg("tiny-6b-vit", [f"train.init_from={broken}"])
    with pytest.raises(ConfigError, match="train.init_from") as e:
        LocalRunner(build_model(cfg, meta=True), cfg, torch.device("cpu"))
    assert victim in str(e.value) and "model.safetensors" in str(e.value)

    data = open(os.path.join(path, "model.safetensors"), "rb").read()
    open(broken / "model.safetensors", "wb").write(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="model.safetensors"):
        LocalRunner(build_model(cfg, meta=True), cfg, torch.device("cpu"))


def test_rehearse_rank_cli(tmp_path):
    """``python -m engine.plan ... --rehearse-rank R --json`` adds the rehearsal object."""
    cmd = [sys.executable, "-m", "engine.plan", "--config", "examples/configs/tiny.yaml", "--nodes", "1",
           "--gpus-per-node", "4", "--set", "parallel.llm.tp=2", "--set", "parallel.llm.pp=2",
           "--set", "parallel.llm.microbatches=2", "--set", "parallel.vit.tp=2", "--rehearse-rank", "3", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    r = out["rehearsal"]
    assert {"rank", "params", "param_bytes", "peak_rss_gib", "seconds"} <= set(r)
    assert r["rank"] == 3 and r["llm_stage"] == 1
    assert r["params"] == out["stages"][1]["params"]["total"]
    bad = subprocess.run(cmd[:-3] + ["--rehearse-rank", "9"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--rehearse-rank=9" in bad.stderr
