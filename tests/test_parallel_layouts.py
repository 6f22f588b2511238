"""Every parallel layout trains like one process: the real ``Trainer`` in spawned gloo ranks.

From the same seed and data, each layout trains the tiny preset for 6 steps (float32) and must
reproduce the single-process loss and gradient-norm trajectory to 1e-4 (relative) at every step.
Final parameters are gathered (``full_state_dict``) and compared by how far they moved: AdamW
turns float noise in near-zero gradients into updates of up to ``lr`` per element, so the
parameters are checked through the update ``p - p_init`` (whole model to 1e-4, each tensor to
1e-3 plus 1e-6 absolute for tensors whose gradient is zero in exact arithmetic, e.g. the ViT's
k_proj bias under softmax).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dist_utils import run_distributed, run_jobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def overrides(data: str, run_dir: str, extra: list[str] = ()) -> list[str]:
    return [f"data.meta_path={data}/meta.json", f"data.text_corpus={data}/text.jsonl",
            f"data.tokenizer={data}/tokenizer.model", "data.max_packed_tokens=512", "data.max_sample_tokens=512",
            "data.max_dynamic_patch=2", f"train.steps={STEPS}", "train.global_batch=8", "train.warmup_steps=2",
            "train.save_interval=0", "train.progress=false", "train.tensorboard=false", f"run.dir={run_dir}",
            *extra]


def config_file(tmp: str, preset: str) -> str:
    path = os.path.join(tmp, f"{preset}.yaml")
    with open(path, "w") as f:
        f.write(f"model:\n  preset: {preset}\n")
    return path


def train(rank: int, world: int, config: str, opts: list[str], resume_at: int = 0) -> dict:
    """Train with the real Trainer; rank 0 also returns the gathered weights."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from engine.config import load_config
    from engine.trainer import Trainer

    cfg = load_config(config, opts)
    trainer = Trainer(cfg)
    rows = []
    if world > 1:  # record how many samples share a packed row
        pack_fn = trainer.runner.objective.pack

        def recording(items, order, group, ctx):
            packed = pack_fn(items, order, group, ctx)
            rows.append((packed.batch.num_samples, packed.batch.input_ids.shape[0]))
            return packed

        trainer.runner.objective.pack = recording
    history = [(h["loss"], h["grad_norm"]) for h in trainer.train()]
    full = trainer.runner.full_state_dict()
    out = {"history": history, "rows": rows, "weights": {k: v.clone() for k, v in full.items()} if rank == 0 else None}
    if resume_at:  # a fresh trainer resumes from the checkpoint of step ``resume_at`` and finishes
        ckpt = os.path.join(cfg.run_dir, "checkpoints", f"step_{resume_at:08d}")
        cfg = load_config(config, opts + ["train.resume=" + ckpt])
        again = Trainer(cfg)
        out["resumed"] = [(h["loss"], h["grad_norm"]) for h in again.train()]
        full = again.runner.full_state_dict()
        out["resumed_weights"] = {k: v.clone() for k, v in full.items()} if rank == 0 else None
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("layouts_data"))
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_synthetic_data.py"), "--out", out,
                    "--num-samples", "64"], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Single-process trajectories, initial and final weights, one per preset (computed lazily)."""
    cache: dict = {}

    def get(preset: str) -> dict:
        if preset not in cache:
            from engine.config import load_config
            from engine.trainer import build_model

            tmp = str(tmp_path_factory.mktemp(f"ref_{preset}"))
            config = config_file(tmp, preset)
            res = run_distributed(train, 1, config, overrides(data, os.path.join(tmp, "run")), timeout=300)[0]
            res["init"] = build_model(load_config(config, overrides(data, tmp))).state_dict()
            res["config"], res["run_dir"] = config, os.path.join(tmp, "run")
            cache[preset] = res
        return cache[preset]

    return get


def assert_same_training(ref: dict, ranks: list[dict], history_key: str = "history", weights_key: str = "weights"):
    for r, res in enumerate(ranks):
        assert res[history_key] == ranks[0][history_key], f"rank {r} reports a different trajectory"
    got = ranks[0][history_key]
    want = ref["history"][-len(got):]
    for step, ((l0, g0), (l1, g1)) in enumerate(zip(want, got), start=len(ref["history"]) - len(got) + 1):
        assert abs(l1 - l0) <= 1e-4 * abs(l0), f"step {step}: loss {l1} vs single-process {l0}"
        assert abs(g1 - g0) <= 1e-4 * abs(g0), f"step {step}: grad norm {g1} vs single-process {g0}"
    final, init, weights = ref["weights"], ref["init"], ranks[0][weights_key]
    assert sorted(weights) == sorted(final), "gathered parameter names differ from the single-process model"
    diff2 = upd2 = 0.0
    for name, want_w in final.items():
        d = (weights[name] - want_w).norm().item()
        u = (want_w - init[name]).norm().item()
        assert d <= 1e-3 * u + 1e-6, f"{name}: differs by {d:.3e} after an update of {u:.3e}"
        diff2, upd2 = diff2 + d * d, upd2 + u * u
    assert diff2 ** 0.5 <= 1e-4 * upd2 ** 0.5, f"parameters differ by {diff2 ** 0.5:.3e} (update {upd2 ** 0.5:.3e})"


# name -> (world, preset, overrides)
LAYOUTS = {
    "llm_tp2_sp__vit_dp2": (2, "tiny", ["parallel.llm.tp=2", "parallel.llm.sp=true"]),
    "llm_pp2_1f1b_mb4__vit_tp2": (2, "tiny", ["parallel.llm.pp=2", "parallel.llm.microbatches=4", "parallel.vit.tp=2"]),
    "llm_hp2__vit_hp2": (2, "tiny", ["parallel.llm.hp=2", "parallel.vit.hp=2"]),
    "llm_tp2_pp2_vpp2__vit_dp4__zero1": (4, "tiny", ["parallel.llm.tp=2", "parallel.llm.pp=2", "parallel.llm.vpp=2",
                                                     "parallel.llm.microbatches=4", "parallel.zero1=true",
                                                     "train.save_interval=3"]),
    "llm_tp4_kv_replicated__vit_tp2_padded_heads": (4, "tiny-6b-vit", ["parallel.llm.tp=4", "parallel.vit.tp=2"]),
    "llm_tp2_pp2_dp2_sp__vit_tp4_dp2": (8, "tiny", ["parallel.llm.tp=2", "parallel.llm.pp=2", "parallel.llm.sp=true",
                                                    "parallel.llm.microbatches=2", "parallel.vit.tp=4"]),
}


@pytest.fixture(scope="module")
def layout_runs(data, reference, tmp_path_factory):
    """Every rank's result of a layout; the layouts of one world size run in one spawn (computed lazily)."""
    cache: dict = {}

    def get(name: str) -> list[dict]:
        world = LAYOUTS[name][0]
        if world not in cache:
            jobs = {}
            for n, (w, preset, extra) in LAYOUTS.items():
                if w == world:
                    resume_at = 3 if "train.save_interval=3" in extra else 0
                    run = str(tmp_path_factory.mktemp(n) / "run")
                    jobs[n] = (train, (reference(preset)["config"], overrides(data, run, extra), resume_at))
            ranks = run_distributed(run_jobs, world, jobs, timeout=900)
            cache[world] = {n: [r[n] for r in ranks] for n in jobs}
        for r in cache[world][name]:
            assert "error" not in r, r.get("error")
        return cache[world][name]

    return get


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, layout_runs):
    world, preset, extra = LAYOUTS[name]
    ref = reference(preset)
    resume_at = 3 if "train.save_interval=3" in extra else 0
    ranks = layout_runs(name)
    assert_same_training(ref, ranks)
    if name == "llm_hp2__vit_hp2":
        assert max(n / rows for n, rows in ranks[0]["rows"]) >= 4, "packed rows should hold several samples"
    if resume_at:  # ZeRO-1 shards and the pipeline's stage weights survive a checkpoint round trip
        assert len(ranks[0]["resumed"]) == STEPS - resume_at
        assert_same_training(ref, ranks, "resumed", "resumed_weights")


def bad_layouts(rank: int, world: int, config: str, data: str, run_dir: str) -> list[str]:
    from engine.config import ConfigError

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from engine.config import load_config
    from engine.trainer import Trainer

    messages = []
    for extra in (["parallel.llm.tp=3"], ["parallel.llm.pp=2", "parallel.llm.microbatches=1"],
                  ["parallel.llm.pp=2", "parallel.llm.microbatches=2", "model.llm.tie_word_embeddings=true"]):
        try:
            Trainer(load_config(config, overrides(data, run_dir, extra), validate=False))
            messages.append("no error")
        except ConfigError as e:
            messages.append(str(e))
    return messages


def test_bad_layout_fails_clearly_without_hanging(data, tmp_path):
    config = config_file(str(tmp_path), "tiny")
    ranks = run_distributed(bad_layouts, 2, config, data, str(tmp_path / "run"), timeout=120)
    for messages in ranks:
        assert "parallel.llm.tp=3 must divide model.llm.num_heads=4" in messages[0], messages[0]
        assert "parallel.llm.microbatches=1 must be >= parallel.llm.pp=2" in messages[1], messages[1]
        assert "parallel.llm.pp=2 needs model.llm.tie_word_embeddings=false" in messages[2], messages[2]


def test_torchrun_cli_matches_single_process(data, reference, tmp_path):
    ref = reference("tiny")
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "engine.train", "--config", ref["config"]]
    for o in overrides(data, run_dir, ["parallel.llm.pp=2", "parallel.llm.microbatches=2"]):
        cmd += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def metrics(d: str) -> list[dict]:
        with open(os.path.join(d, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]

    got, want = metrics(run_dir), metrics(ref["run_dir"])
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, STEPS + 1))
    for a, b in zip(got, want):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-4 * abs(b[key]), f"step {a['step']}: {key} {a[key]} vs {b[key]}"
        assert a["tokens"] == b["tokens"] and a["samples"] == b["samples"]
