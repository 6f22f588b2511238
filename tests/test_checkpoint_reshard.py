"""A checkpoint saved under one layout resumes under others, exactly.

World 4 (LLM tp2 pp2, ViT dp4, ZeRO-1) trains the tiny preset and saves at step 3. World 2
(LLM pp2, ViT tp2) and one process resume from that checkpoint. After loading, their weights,
AdamW moments and step counts are bitwise those the world-4 ranks held at step 3 (gathered there
independently of the checkpoint code); continuing, their losses and gradient norms match the
uninterrupted single-process run to the project's cross-layout parity tolerance (1e-4 relative:
the layouts sum in different orders), and the learning rate exactly.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from conftest import tiny_overrides
from dist_utils import run_distributed

STEPS, SAVE_AT = 6, 3
W4 = ["parallel.llm.tp=2", "parallel.llm.pp=2", "parallel.llm.microbatches=2", "parallel.zero1=true"]
W2 = ["parallel.llm.pp=2", "parallel.llm.microbatches=2", "parallel.vit.tp=2"]


def overrides(data: str, run_dir: str, extra: list[str]) -> list[str]:
    return tiny_overrides(data, run_dir, **{"train.steps": STEPS, "train.save_interval": SAVE_AT,
                                            "train.lr": 2e-3, "train.warmup_steps": 2}) + list(extra)


def full_state(runner) -> dict[str, dict[str, torch.Tensor]]:
    """Collective: full single-process weights, AdamW moments and steps per parameter, on rank 0,
    from the runner's own tensors (``gather_full`` over tp, ZeRO flat slices all-gathered over dp)."""
    from engine.parallel.data_parallel import ZeroAdamW
    from engine.parallel.tensor_parallel import gather_full, shard_info

    names = {id(p): n for n, p in runner.model.named_parameters()}
    topo = getattr(runner, "topo", None)
    out: dict[str, dict[str, torch.Tensor]] = {"weight": {}, "exp_avg": {}, "exp_avg_sq": {}, "step": {}}

    def full(t, p):
        if topo is None:
            return t.detach().clone()
        info = shard_info(p)
        return gather_full(t, info, (topo.llm if info.grid == "llm" else topo.vit).group("tp"))

    for n, p in runner.model.named_parameters():
        out["weight"][n] = full(p, p)
    opt = runner.optimizer
    if isinstance(opt, ZeroAdamW):
        for shard, group in zip(opt.shards, opt.param_groups):
            st = opt.state[group["params"][0]]
            for k in ("exp_avg", "exp_avg_sq"):
                parts = [st[k]]
                if shard.group is not None:
                    parts = [torch.empty_like(st[k]) for _ in range(dist.get_world_size(shard.group))]
                    dist.all_gather(parts, st[k], group=shard.group)
                flat, off = torch.cat(parts), 0
                for p in shard.params:
                    out[k][names[id(p)]] = full(flat[off:off + p.numel()].view_as(p), p)
                    out["step"][names[id(p)]] = st["step"].clone()
                    off += p.numel()
    else:
        for n, p in runner.model.named_parameters():
            for k in ("exp_avg", "exp_avg_sq"):
                out[k][n] = full(opt.state[p][k], p)
            out["step"][n] = opt.state[p]["step"].clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, out)
        for part in parts:
            for k in out:
                out[k].update(part[k])
    return out


def train(rank: int, world: int, config: str, opts: list[str], resume: str = "") -> dict:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from engine.config import load_config
    from engine.trainer import Trainer

    cfg = load_config(config, opts + ([f"train.resume={resume}"] if resume else []))
    trainer = Trainer(cfg)
    result: dict = {"start": trainer.step}
    if resume:
        result["loaded"] = full_state(trainer.runner)
    else:
        from conftest import record_at_save

        record_at_save(trainer, SAVE_AT, lambda: result.__setitem__("saved", full_state(trainer.runner)))
    result["history"] = [(r["loss"], r["grad_norm"], r["lr"]) for r in trainer.train()]
    return result if rank == 0 else {"history": result["history"]}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("reshard") / "tiny.yaml"
    path.write_text("model:\n  preset: tiny\n")
    return str(path)


@pytest.fixture(scope="module")
def runs(synthetic_data, config, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reshard_runs")
    ref = run_distributed(train, 1, config, overrides(synthetic_data, str(tmp / "ref"), ["train.save_interval=0"]),
                          timeout=300)[0]
    w4 = run_distributed(train, 4, config, overrides(synthetic_data, str(tmp / "w4"), W4), timeout=420)
    ckpt = str(tmp / "w4" / "checkpoints" / f"step_{SAVE_AT:08d}")
    w2 = run_distributed(train, 2, config, overrides(synthetic_data, str(tmp / "w2"), W2), ckpt, timeout=420)
    w1 = run_distributed(train, 1, config, overrides(synthetic_data, str(tmp / "w1"), []), ckpt, timeout=300)
    return {"ref": ref, "w4": w4, "w2": w2, "w1": w1, "dirs": {"w4": str(tmp / "w4"), "w2": str(tmp / "w2")}}


def assert_close(got, want, what: str, tol: float = 1e-4) -> None:
    assert len(got) == len(want), what
    for i, ((l1, g1, lr1), (l0, g0, lr0)) in enumerate(zip(got, want)):
        assert abs(l1 - l0) <= tol * abs(l0), f"{what} step {i}: loss {l1} vs {l0}"
        assert abs(g1 - g0) <= tol * abs(g0), f"{what} step {i}: grad norm {g1} vs {g0}"
        assert lr1 == lr0, f"{what} step {i}: lr {lr1} vs {lr0}"


def test_world4_layout_trains_like_one_process(runs):
    assert all(r["history"] == runs["w4"][0]["history"] for r in runs["w4"])
    assert_close(runs["w4"][0]["history"], runs["ref"]["history"], "world 4 vs one process")


@pytest.mark.parametrize("name", ["w2", "w1"])
def test_resume_under_another_layout_is_exact(runs, name):
    saved, got = runs["w4"][0]["saved"], runs[name][0]
    assert got["start"] == SAVE_AT
    loaded = got["loaded"]
    for kind in ("weight", "exp_avg", "exp_avg_sq", "step"):
        assert sorted(loaded[kind]) == sorted(saved[kind]), kind
        for n, t in saved[kind].items():
            assert torch.equal(loaded[kind][n], t), f"{name}: {kind} of {n} differs from the saving layout's"
    assert any(float(t) == SAVE_AT for t in loaded["step"].values())
    cont = got["history"]
    assert_close(cont, runs["ref"]["history"][SAVE_AT:], f"{name} resumed vs uninterrupted one process")
    assert_close(cont, runs["w4"][0]["history"][SAVE_AT:], f"{name} resumed vs uninterrupted world 4")


@pytest.mark.parametrize("name,world,layout", [("w4", 4, W4), ("w2", 2, W2)])
def test_live_ranks_store_the_pieces_the_offline_plan_predicts(runs, config, synthetic_data, name, world, layout):
    from engine.checkpoint import CheckpointManager, CheckpointReader
    from engine.checkpoint.plan import target_pieces
    from engine.config import load_config

    cfg = load_config(config, overrides(synthetic_data, "unused", layout))
    reader = CheckpointReader(CheckpointManager(os.path.join(runs["dirs"][name], "checkpoints")).latest())
    files = {p["file"] for e in reader.tensors.values() for p in e["pieces"]}
    assert files == {f"rank_{r:05d}.safetensors" for r in range(world)}
    for key in reader.keys("model/"):
        live = sorted((p["file"], tuple(p["offsets"]), tuple(p["sizes"])) for p in reader.tensors[key]["pieces"])
        plan = sorted((f"rank_{r:05d}.safetensors", b[0], b[1])
                      for r, b in target_pieces(key[len("model/"):], reader.shape(key), cfg, world))
        assert live == plan, key
