"""The layout planner: parameter totals, shards against the real sharding, activation formulas
against the bytes autograd saves, schedule in-flight counts, the shipped layouts, the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from dist_utils import run_distributed
from engine.config import Config, apply_override, config_from_dict, load_config
from engine.models.presets import PRESETS, analytic_param_count
from engine.parallel.pipeline import build_program
from engine.planning import get_gpu, make_plan, plan_dict, plan_text
from engine.planning.activations import (CPU_BACKEND, LLMDims, llm_layer_bytes, vit_bytes_per_tile,
                                         vit_layer_bytes_per_tile, vit_matrix_params, vit_stem_bytes_per_tile)
from engine.planning.memory import GIB, inflight_peak
from engine.planning.shards import build_meta_model, optimizer_groups, stage_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100 = get_gpu("h100")


def make_cfg(preset: str, overrides: list[str]) -> Config:
    cfg = config_from_dict({"model": {"preset": preset}})
    for o in overrides:
        apply_override(cfg, o)
    return cfg


def saved_bytes(fn, params) -> int:
    """Bytes of the distinct tensors autograd saves while ``fn`` runs, parameters excluded."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


# ----------------------------------------------------------------------------- parameters


SHARDED = {  # a layout with tensor and pipeline parallelism that every preset accepts
    "tiny": ["parallel.llm.tp=2", "parallel.llm.pp=2", "parallel.llm.microbatches=2", "parallel.vit.tp=2"],
    "tiny-6b-vit": ["parallel.llm.tp=4", "parallel.llm.pp=2", "parallel.llm.microbatches=2", "parallel.vit.tp=4"],
    "internvl3-1b": ["parallel.llm.tp=2", "parallel.llm.pp=2", "parallel.llm.microbatches=2", "parallel.vit.tp=2"],
    "internvl3-2b": ["parallel.llm.tp=4", "parallel.llm.pp=2", "parallel.llm.microbatches=2", "parallel.vit.tp=4"],
    "internvl3-8b": ["parallel.llm.tp=4", "parallel.llm.pp=2", "parallel.llm.microbatches=2", "parallel.vit.tp=4"],
    "internvl3-14b": ["parallel.llm.tp=8", "parallel.llm.pp=2", "parallel.llm.microbatches=2", "parallel.vit.tp=8"],
    "internvl3-38b": ["parallel.llm.tp=8", "parallel.llm.pp=4", "parallel.llm.microbatches=4", "parallel.vit.tp=8"],
    "internvl3-78b": ["parallel.llm.tp=8", "parallel.llm.pp=8", "parallel.llm.microbatches=8", "parallel.vit.tp=8"],
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_total_params_equal_analytic_count(preset):
    assert set(SHARDED) == set(PRESETS)
    want = analytic_param_count(PRESETS[preset])["total"]
    cfg = make_cfg(preset, SHARDED[preset] + ["train.global_batch=64"])
    L, V = cfg.parallel.llm, cfg.parallel.vit
    world = L.tp * L.pp * V.tp  # the ViT's dp = LLM's pp
    plan = make_plan(cfg, 1, world, H100, margin=0.0)
    assert plan.layout is not None, plan.problems
    assert plan.total_params == want
    # The shards themselves: every tp rank of a stage holds the same shapes; tp x the local
    # elements covers each full tensor once (zero padding of vocab and ViT heads aside, kv replicas
    # counted once), and the stages cover the LLM's layers exactly once.
    layers = sorted(i for s in plan.stages for r in s.layers for i in r)
    assert layers == list(range(cfg.model.llm.num_layers))
    llm_local = sum(s.count("language_model.") for s in plan.stages)
    assert llm_local * L.tp >= analytic_param_count(PRESETS[preset])["llm"]


def test_single_gpu_plan_holds_the_whole_model():
    cfg = make_cfg("internvl3-8b", [])
    plan = make_plan(cfg, 1, 1, H100)
    counts = analytic_param_count(cfg.model)
    assert plan.memory[0].params == {"vit": counts["vit"], "projector": counts["projector"], "llm": counts["llm"]}
    # train.param_dtype=auto on a GPU: bf16 weight matrices; norm gains and biases (< 0.1%) stay fp32
    assert 2 * counts["total"] < plan.memory[0].weights < 2.001 * counts["total"]
    assert plan.memory[0].grads == 4 * counts["total"]  # fp32 main grads
    assert plan.memory[0].optimizer == 12 * counts["total"]  # fp32 masters + AdamW moments
    assert not plan.ok and "needs" in plan.problems[0]  # 18 B/param x 8B does not fit one H100
    fp32 = make_plan(make_cfg("internvl3-8b", ["train.param_dtype=float32"]), 1, 1, H100).memory[0]
    assert (fp32.weights, fp32.grads, fp32.optimizer) == (4 * counts["total"], 4 * counts["total"],
                                                          8 * counts["total"])  # fp32 parameters, AdamW moments


# ----------------------------------------------------------------------------- shards vs the engine


def _shards_and_saved(rank: int, preset: str, overrides: list[str]) -> dict:
    from engine.parallel.runner import ParallelRunner
    from engine.parallel.tensor_parallel import shard_info
    from engine.trainer import build_model

    from engine.parallel.tensor_parallel import shard_tensor

    cfg = make_cfg(preset, overrides)
    runner = ParallelRunner(build_model(cfg, meta=True), cfg, torch.device("cpu"))  # materialises its own shards
    got = {n: (tuple(p.shape), shard_info(p)) for n, p in runner.model.named_parameters()}
    full = build_model(cfg).state_dict()  # the one-process model, same seed
    grids = {"llm": runner.topo.llm, "vit": runner.topo.vit}
    differ = []
    for n, p in runner.model.named_parameters():
        info, grid = shard_info(p), grids[shard_info(p).grid]
        want = shard_tensor(full[n], info, grid.coord("tp"), grid.size("tp")) if info.dim is not None else full[n]
        if not torch.equal(p.detach(), want):
            differ.append(n)
    sh = stage_shards(build_meta_model(cfg), cfg, runner.pp_rank)
    want = {n: (tuple(t.shape), sh.infos[n]) for n, t in sh.params.items()}
    out = {"got": got, "want": want, "stage": runner.pp_rank, "differ": differ}
    if cfg.parallel.zero1:
        dps = {"vit": runner.topo.vit.size("dp_hp"), "llm": runner.topo.llm.size("dp_hp")}
        out["zero_got"] = sum(m.numel() for m in runner.optimizer._masters())
        out["zero_want"] = sum(math.ceil(n / dps[g]) for g, n in optimizer_groups(sh, cfg))

    # Bytes saved for backward under bf16 autocast, by one sharded decoder layer and by the sharded
    # ViT + pixel shuffle + projector, against the planner's formulas (CPU: SDPA, PyTorch rotary).
    from engine.models.llm import SequenceContext

    lm, c, L = runner.model.language_model, cfg.model.llm, cfg.parallel.llm
    layer = lm.layers[runner.ranges[0][0]]
    S = 32
    n = S // L.hp
    n_s = n // L.tp if L.sp else n
    x = torch.randn(1, n_s, c.hidden_size, requires_grad=True) * 1.0
    ctx = SequenceContext(torch.arange(n, dtype=torch.float32)[None] + rank * 0, None, None)
    params = list(runner.model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out["llm_saved"] = saved_bytes(lambda: layer(x, ctx), params)
    out["llm_formula"] = llm_layer_bytes(cfg, S, CPU_BACKEND) + 2 * LLMDims.of(cfg).matrix_params()
    v, m = cfg.model.vision, cfg.model
    tiles = 3
    pixels = torch.randn(tiles, 3, v.image_size, v.image_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out["vit_saved"] = saved_bytes(lambda: runner.model.extract_feature(pixels), params)
    copies = v.num_layers * vit_matrix_params(cfg) + v.hidden_size * 3 * v.patch_size**2
    copies += m.projector_in * c.hidden_size + c.hidden_size**2
    out["vit_formula"] = tiles * (vit_bytes_per_tile(cfg, CPU_BACKEND) + vit_stem_bytes_per_tile(cfg)) + 2 * copies
    return out


LAYOUTS = {
    # tp + sequence parallelism in both grids, pipeline, ZeRO-1; ViT tokens padded 65 -> 66
    "tp2-sp-pp2-zero": ("tiny", ["parallel.llm.tp=2", "parallel.llm.sp=true", "parallel.llm.pp=2",
                                 "parallel.llm.microbatches=2", "parallel.vit.tp=2", "parallel.vit.sp=true",
                                 "parallel.zero1=true", "train.global_batch=4"]),
    # kv heads replicated over tp, 5 ViT heads padded to 8, qk-norm over the padded width
    "tp4-kv-replicas-vit-padding": ("tiny-6b-vit", ["parallel.llm.tp=4", "parallel.vit.tp=4",
                                                    "train.global_batch=4"]),
    # head parallelism (Ulysses) in both grids, kv heads repeated up to hp, ViT tokens padded to a
    # multiple of hp (its mask), ZeRO-1 over each grid's dp x hp
    "tp2-hp2": ("tiny", ["parallel.llm.tp=2", "parallel.llm.hp=2", "parallel.vit.tp=1", "parallel.vit.hp=2",
                         "parallel.zero1=true", "train.global_batch=4"]),
}


def _all_layouts(rank: int, world: int, layouts: dict) -> dict:
    return {name: _shards_and_saved(rank, preset, overrides) for name, (preset, overrides) in layouts.items()}


def test_shards_and_activations_match_the_engine():
    """Per rank, for each layout: ``ParallelRunner`` built from a meta model materialises exactly
    the one-process model's slices; the planner's meta shards have the shapes and ``ShardInfo`` of
    the parameters it builds, ZeRO-1 owns as many elements as planned, and the
    activation formulas give the bytes the sharded layers save."""
    per_rank = run_distributed(_all_layouts, 4, LAYOUTS, timeout=300)
    for name, (preset, overrides) in LAYOUTS.items():
        results = [r[name] for r in per_rank]
        for rank, r in enumerate(results):
            where = f"{name}, rank {rank}"
            assert r["got"].keys() == r["want"].keys(), f"{where}: {sorted(r['got'].keys() ^ r['want'].keys())}"
            assert not r["differ"], f"{where}: shards differ from the one-process slices: {r['differ'][:5]}"
            for key, (shape, info) in r["got"].items():
                assert (shape, info) == r["want"][key], f"{where} {key}: engine {shape} {info}, plan {r['want'][key]}"
            if "zero_got" in r:
                assert r["zero_got"] == r["zero_want"], where
            assert r["llm_saved"] == r["llm_formula"], where
            assert r["vit_saved"] == r["vit_formula"], where
        assert {r["stage"] for r in results} == set(range(make_cfg(preset, overrides).parallel.llm.pp))


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_state_bytes_match_the_engine(param_dtype):
    """Weights, gradients and optimizer state the planner counts equal what one engine process holds
    after a step: fp32 (4 + 4 + 8 B/param) or bf16 parameters (2 B, fp32 main grads 4 B, fp32 masters
    and moments 12 B)."""
    from engine.data.batch import Sample
    from engine.planning.memory import Layout, Workload, stage_memory
    from engine.step import LocalRunner
    from engine.trainer import build_model

    cfg = make_cfg("tiny", [f"train.param_dtype={param_dtype}", "train.freeze_vit=true"])
    runner = LocalRunner(build_model(cfg), cfg, torch.device("cpu"))
    m = cfg.model  # one sample with one image tile, so every trainable parameter gets a gradient
    ids = torch.full((24 + m.num_image_token,), (m.img_context_token_id + 1) % m.llm.vocab_size)
    ids[4:4 + m.num_image_token] = m.img_context_token_id
    pixels = torch.randn(1, 3, m.vision.image_size, m.vision.image_size)
    runner.forward_backward([Sample(input_ids=ids, labels=ids.clone(), pixel_values=pixels, image_tiles=[1], index=0)])
    runner.optimizer.step()

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if t is not None and t.numel() > 1)

    params = list(runner.model.parameters())
    trainable = [p for p in params if p.requires_grad]
    grads = [getattr(p, "main_grad", p.grad) for p in trainable]
    state = [t for st in runner.optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
    state += list(getattr(runner.optimizer, "masters", []))
    sh = stage_shards(build_meta_model(cfg), cfg, 0)
    mem = stage_memory(cfg, sh, Layout.of(cfg, 1), Workload.of(cfg), CPU_BACKEND)
    assert (mem.weights, mem.grads, mem.optimizer) == (nbytes(params), nbytes(grads), nbytes(state))
    assert mem.weights == sum(p.numel() * (2 if param_dtype == "bfloat16" and p.ndim >= 2 else 4) for p in params)
    assert len(trainable) < len(params)  # the frozen ViT: weights only


def test_activation_formulas_single_process():
    """One layer of each kind at tp = 1: the formula is the bytes autograd keeps."""
    from engine.models.llm import DecoderLayer, SequenceContext
    from engine.models.vit import VisionLayer

    for preset in ("tiny", "tiny-6b-vit"):
        cfg = make_cfg(preset, [])
        S = 48
        layer = DecoderLayer(cfg.model.llm)
        x = torch.randn(1, S, cfg.model.llm.hidden_size, requires_grad=True) * 1.0
        ctx = SequenceContext(torch.arange(S, dtype=torch.float32)[None], None, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = saved_bytes(lambda: layer(x, ctx), list(layer.parameters()))
        assert got == llm_layer_bytes(cfg, S, CPU_BACKEND) + 2 * LLMDims.of(cfg).matrix_params()
        vl = VisionLayer(cfg.model.vision)
        xv = torch.randn(2, cfg.model.vision.num_patches + 1, cfg.model.vision.hidden_size, requires_grad=True) * 1.0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = saved_bytes(lambda: vl(xv), list(vl.parameters()))
        assert got == 2 * vit_layer_bytes_per_tile(cfg, CPU_BACKEND) + 2 * vit_matrix_params(cfg)


# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("pp,M", [(4, 8), (4, 2), (8, 32)])
def test_1f1b_in_flight_microbatches(pp, M):
    """Stage p of 1F1B holds min(pp - p, M) microbatches at its peak."""
    for p in range(pp):
        assert inflight_peak(build_program(pp, 1, p, M), [1]) == min(pp - p, M)


def test_interleaved_in_flight_chunks():
    """Interleaved 1F1B: rank p warms up with 2 (pp - p - 1) + (vpp - 1) pp chunk forwards, plus one."""
    pp, vpp, M = 4, 2, 8
    for p in range(pp):
        assert inflight_peak(build_program(pp, vpp, p, M), [1, 1]) == 2 * (pp - p - 1) + (vpp - 1) * pp + 1


def test_bubble_fraction():
    cfg = load_config(os.path.join(ROOT, "examples/configs/pretrain_78b.yaml"))
    plan = make_plan(cfg, 32, 8, H100)
    L = cfg.parallel.llm
    assert plan.cost.bubble == pytest.approx((L.pp - 1) / (L.microbatches * L.vpp + L.pp - 1))
    # the pipeline takes (M + (pp - 1) / vpp) microbatch times of the slowest stage
    assert plan.cost.seconds["pipeline"] == pytest.approx(
        (L.microbatches + (L.pp - 1) / L.vpp) * max(plan.cost.stage_microbatch_s))


# ----------------------------------------------------------------------------- shipped layouts


SHIPPED = [("pretrain_1b", 1), ("pretrain_2b", 1), ("pretrain_8b", 1), ("sft_8b", 1), ("pretrain_38b", 8),
           ("pretrain_38b", 16), ("pretrain_78b", 32), ("sft_78b", 32)]


@pytest.mark.parametrize("name,nodes", SHIPPED)
def test_shipped_layouts_fit_their_clusters(name, nodes):
    cfg = load_config(os.path.join(ROOT, f"examples/configs/{name}.yaml"))
    plan = make_plan(cfg, nodes, 8, H100)
    assert plan.ok, plan.message()
    assert plan.max_rank_memory <= 0.9 * H100.memory_gib * GIB
    assert 0.1 < plan.cost.mfu < 0.7
    assert plan.total_params == analytic_param_count(cfg.model)["total"]


def test_78b_plan_cli_json_fast_and_fits():
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "engine.plan", "--config", "examples/configs/pretrain_78b.yaml",
                          "--nodes", "32", "--gpus-per-node", "8", "--gpu", "h100", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    assert elapsed < 60, f"the 78B plan on 256 GPUs took {elapsed:.1f} s"
    d = json.loads(out.stdout)
    assert d["ok"] is True
    assert d["total_params"] == analytic_param_count(PRESETS["internvl3-78b"])["total"]
    assert d["max_rank_memory_gb"] == max(s["peak_memory_gb"] for s in d["stages"])
    assert d["max_rank_memory_gb"] < 80
    assert d["cluster"]["world"] == 256
    assert [s["stage"] for s in d["stages"]] == list(range(8))
    assert sum(s["ranks"] for s in d["stages"]) == 256
    for s in d["stages"]:
        assert set(s["params"]) == {"vit", "projector", "llm", "total"}
        assert {"weights", "grads", "optimizer", "activations", "peak"} <= set(s["memory_gib"])
        act = s["memory_gib"]["activations"]
        assert act["llm_checkpointed"] < act["llm_full"] and act["vit_checkpointed"] < act["vit_full"]
    assert set(d["comm_gb_per_rank_step"]) == {"llm.tp", "llm.hp", "llm.pp", "llm.dp", "vit.tp", "vit.hp",
                                               "vit.dp", "exchange"}
    assert 0 < d["step"]["bubble_fraction"] < 0.2 and 0 < d["step"]["mfu"] < 1


def test_cli_text_tables(capsys):
    from engine.plan import main

    assert main(["--config", os.path.join(ROOT, "examples/configs/pretrain_8b.yaml"), "--nodes", "1",
                 "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    for needle in ("Per rank, GiB", "weights", "optim", "peak", "MFU", "Communication per rank per step",
                   "llm.tp", "exchange", "layout fits"):
        assert needle in out


def test_78b_on_one_node_fails_with_one_clear_message(capsys):
    from engine.plan import main

    base = ["--config", os.path.join(ROOT, "examples/configs/pretrain_78b.yaml"), "--nodes", "1",
            "--gpus-per-node", "8"]
    assert main(base) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "world size 8 is not divisible by parallel.llm.tp*pp*hp=8*8*1=64" in lines[0]
    plan = make_plan(load_config(os.path.join(ROOT, "examples/configs/pretrain_78b.yaml")), 1, 8, H100)
    assert plan.layout is None and plan.total_params == analytic_param_count(PRESETS["internvl3-78b"])["total"]
    assert plan_dict(plan)["total_params"] == plan.total_params and plan_dict(plan)["max_rank_memory_gb"] is None
    # a layout that is valid for 8 GPUs but does not fit their memory
    assert main(base + ["--set", "parallel.llm.pp=1", "--set", "parallel.llm.vpp=1", "--set",
                        "parallel.llm.microbatches=1", "--set", "train.global_batch=8", "--json"]) == 1
    out = capsys.readouterr()
    d = json.loads(out.out)
    assert d["ok"] is False and d["max_rank_memory_gb"] > 80
    msg = out.err.strip()
    assert "\n" not in msg and msg.startswith("layout does not work: pipeline stage 0 needs")
    assert "GiB usable" in msg and "H100" in msg


def test_tp_group_across_nodes_is_refused():
    cfg = load_config(os.path.join(ROOT, "examples/configs/pretrain_8b.yaml"))
    plan = make_plan(cfg, 2, 4, H100)  # tp = 4 on nodes of 4 fits; on nodes of 2 it would not
    assert not any("span nodes" in p for p in plan.problems)
    plan = make_plan(cfg, 4, 2, H100)
    assert any("parallel.llm.tp=4 groups span nodes of 2 GPUs" in p for p in plan.problems)
    assert "parallel.llm.tp=4 groups span nodes" in plan.message()
    assert "layout does not work" in plan_text(plan) and plan_dict(plan)["ok"] is False


def test_bad_arguments(capsys):
    from engine.plan import main

    assert main(["--config", os.path.join(ROOT, "examples/configs/pretrain_8b.yaml"), "--nodes", "1",
                 "--gpus-per-node", "8", "--set", "parallel.llm.tq=2"]) == 2
    assert "unknown config key 'parallel.llm.tq'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--nodes=0"):
        make_plan(load_config(os.path.join(ROOT, "examples/configs/pretrain_8b.yaml")), 0, 8, H100)
    with pytest.raises(ValueError, match="unknown"):
        get_gpu("v100")
