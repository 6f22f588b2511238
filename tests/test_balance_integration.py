"""The balancer in the engine: the real Trainer on 4 gloo processes with ``balance.enabled`` on and off.

A skewed mix (one-image questions next to 3-6 image, multi-turn conversations, and text documents of
1 to 12 paragraphs) trains the tiny preset for a few steps under two layouts. Placement must not
change the mathematics: loss and gradient-norm trajectories agree to 1e-4 (relative) with the naive
split, while the balanced runs really move samples and tiles. Also: metrics rows, the placement's
bookkeeping, the cost calibration tool and the cost file's errors.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys

import numpy as np
import pytest

from dist_utils import run_distributed, run_jobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
IMBALANCE_KEYS = ("balance/vit_imbalance_pred", "balance/llm_imbalance_pred", "balance/vit_imbalance_meas",
                  "balance/llm_imbalance_meas", "balance/vit_imbalance_meas_cpu", "balance/llm_imbalance_meas_cpu")
BALANCE_KEYS = IMBALANCE_KEYS + ("balance/exchange_bytes", "balance/balancer_ms", "balance/moved_samples",
                                 "balance/moved_tiles")


# ----------------------------------------------------------------------------- skewed data


def write_skewed_data(base: str, seed: int = 0, num_samples: int = 160) -> tuple[str, str]:
    """A skewed mix over the images of a ``tools/make_synthetic_data.py`` set in ``base``.

    Multimodal: 60% one image with one question, 20% the original one-image conversation, 20% 3-6
    images (the widest ones: up to 4 tiles each with ``data.max_dynamic_patch`` >= 3) with 2-6 extra
    turns. Text: documents of 1 paragraph (70%) or 6-12 paragraphs. Returns (meta path, corpus path).
    """
    from PIL import Image

    rng = random.Random(seed)
    with open(os.path.join(base, "train.jsonl")) as f:
        records = [json.loads(line) for line in f]
    single = [r for r in records if isinstance(r["image"], str)]

    def aspect(r: dict) -> float:
        with Image.open(os.path.join(base, "images", r["image"])) as im:
            w, h = im.size
        return max(w, h) / min(w, h)

    wide = sorted(single, key=aspect, reverse=True)[: max(8, len(single) // 3)]
    out = []
    for i in range(num_samples):
        u = rng.random()
        r = rng.choice(single)
        conv = r["conversations"]
        if u < 0.6:
            out.append({"id": i, "image": r["image"], "conversations": conv[:2]})
        elif u < 0.8:
            out.append({"id": i, "image": r["image"], "conversations": conv})
        else:
            imgs = rng.sample(wide, rng.randint(3, 6))
            j = rng.randrange(len(imgs))
            q = imgs[j]["conversations"][0]["value"].replace("<image>\n", "")
            head = "".join(f"Image-{k + 1}: <image>\n" for k in range(len(imgs)))
            turns = [{"from": "human", "value": f"{head}About image {j + 1}: {q}"},
                     {"from": "gpt", "value": imgs[j]["conversations"][1]["value"]}]
            for _ in range(rng.randint(2, 6)):
                other = rng.choice(single)["conversations"]
                turns += [{"from": "human", "value": other[0]["value"].replace("<image>\n", "")},
                          {"from": "gpt", "value": other[1]["value"]}]
            out.append({"id": i, "image": [x["image"] for x in imgs], "conversations": turns})
    with open(os.path.join(base, "skewed.jsonl"), "w") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    meta = os.path.join(base, "meta_skewed.json")
    with open(meta, "w") as f:
        json.dump({"skewed": {"root": "images", "annotation": "skewed.jsonl", "repeat_time": 1,
                              "length": len(out)}}, f)
    with open(os.path.join(base, "text.jsonl")) as f:
        docs = [json.loads(line)["text"] for line in f]
    corpus = os.path.join(base, "text_skewed.jsonl")
    with open(corpus, "w") as f:
        for _ in range(num_samples // 2):
            k = 1 if rng.random() < 0.7 else rng.randint(6, 12)
            f.write(json.dumps({"text": " ".join(rng.choice(docs) for _ in range(k))}) + "\n")
    return meta, corpus


@pytest.fixture(scope="module")
def skewed(tmp_path_factory) -> dict:
    from tools.make_synthetic_data import generate

    base = str(tmp_path_factory.mktemp("skewed"))
    generate(base, num_samples=96, seed=0)
    meta, corpus = write_skewed_data(base)
    return {"meta": meta, "corpus": corpus, "tokenizer": os.path.join(base, "tokenizer.model")}


def overrides(data: dict, run_dir: str, extra: list[str] = ()) -> list[str]:
    return [f"data.meta_path={data['meta']}", f"data.text_corpus={data['corpus']}",
            f"data.tokenizer={data['tokenizer']}", "data.max_packed_tokens=512", "data.max_sample_tokens=512",
            "data.max_dynamic_patch=4", f"train.steps={STEPS}", "train.global_batch=16", "train.warmup_steps=2",
            "train.save_interval=0", "train.progress=false", "train.tensorboard=false", f"run.dir={run_dir}",
            "parallel.llm.microbatches=2", *extra]


# ----------------------------------------------------------------------------- runs


def train(rank: int, world: int, opts: list[str]) -> dict:
    """Train with the real Trainer; rank 0 also records each step's samples and placement."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from engine.config import load_config
    from engine.trainer import Trainer

    trainer = Trainer(load_config(None, opts))
    runner, steps = trainer.runner, []
    step_fn = runner.forward_backward

    def recording(batch):
        stats = step_fn(batch)
        p = runner.last_placement
        steps.append({"tokens": list(batch.num_tokens), "tiles": batch.num_tiles,
                      "method": p.method, "groups": p.groups, "order": p.order(), "vit": p.vit,
                      "llm_dp": runner.topo.llm.size("dp"), "vit_dp": runner.topo.vit.size("dp")})
        return stats

    runner.forward_backward = recording
    history = [(h["loss"], h["grad_norm"]) for h in trainer.train()]
    return {"history": history, "steps": steps if rank == 0 else None}


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def naive_groups(n: int, dp: int, m: int) -> list[list[list[int]]]:
    from engine.data.packing import split_contiguous

    return [split_contiguous(rep, m) for rep in split_contiguous(list(range(n)), dp)]


def naive_tiles(tiles: list[int], vit_dp: int) -> list[list[int]]:
    from engine.data.packing import split_contiguous

    return split_contiguous(range(sum(tiles)), vit_dp)


def tile_ids(step: dict) -> list[list[int]]:
    start = np.concatenate([[0], np.cumsum(step["tiles"])]).tolist()
    return [[start[s] + k for s, a, b in ranges for k in range(a, b)] for ranges in step["vit"]]


@pytest.fixture(scope="module")
def runs(skewed, tmp_path_factory):
    """Naive and balanced runs of the same data: ``{name: (ranks' results, run dir)}``."""
    layouts = {"naive": ["parallel.llm.tp=2"],
               "balanced": ["parallel.llm.tp=2", "balance.enabled=true"],
               "balanced_pp": ["parallel.llm.pp=2", "parallel.vit.tp=2", "balance.enabled=true"]}
    dirs = {name: str(tmp_path_factory.mktemp(name) / "run") for name in layouts}
    jobs = {name: (train, (overrides(skewed, dirs[name], extra),)) for name, extra in layouts.items()}
    ranks = run_distributed(run_jobs, 4, jobs, timeout=600)  # one spawn, the layouts in turn
    for r in ranks:
        for name, res in r.items():
            assert "error" not in res, f"{name}: {res.get('error')}"
    return {name: ([r[name] for r in ranks], dirs[name]) for name in layouts}


@pytest.mark.parametrize("name", ["balanced", "balanced_pp"])
def test_balancing_keeps_the_trajectory(runs, name):
    """LLM tp2 x dp2 (ViT dp4), and LLM pp2 x dp2 (ViT tp2 x dp2), both against the naive tp2 x dp2 run."""
    ref, got = runs["naive"][0], runs[name][0]
    for ranks in (ref, got):
        assert all(r["history"] == ranks[0]["history"] for r in ranks), "ranks report different trajectories"
    assert len(got[0]["history"]) == STEPS
    for step, ((l0, g0), (l1, g1)) in enumerate(zip(ref[0]["history"], got[0]["history"]), start=1):
        assert abs(l1 - l0) <= 1e-4 * abs(l0), f"step {step}: loss {l1} balanced vs {l0} naive"
        assert abs(g1 - g0) <= 1e-4 * abs(g0), f"step {step}: grad norm {g1} balanced vs {g0} naive"


@pytest.mark.parametrize("name", ["naive", "balanced", "balanced_pp"])
def test_placement_covers_the_batch_and_balancing_moves_work(runs, name):
    from engine.balance.packing import tight_rows
    from engine.data.packing import first_fit

    steps = runs[name][0][0]["steps"]
    assert len(steps) == STEPS
    moved_samples = moved_tiles = 0
    for k, st in enumerate(steps, start=1):
        n, dp = len(st["tokens"]), st["llm_dp"]
        assert st["method"] == ("naive" if name == "naive" else "balanced")
        assert sorted(s for rep in st["groups"] for mb in rep for s in mb) == list(range(n)), f"step {k}"
        assert [len(rep) for rep in st["groups"]] == [2] * dp
        for rep, rep_order in zip(st["groups"], st["order"]):
            for mb, mb_order in zip(rep, rep_order):
                assert mb, f"step {k}: empty microbatch"
                rows, _ = tight_rows([st["tokens"][s] for s in mb], 512, first_fit)  # the packer's rule
                assert len(rows) == len(first_fit([st["tokens"][s] for s in mb], 512))
                assert [mb[i] for row in rows for i in row] == mb_order
                assert all(sum(st["tokens"][mb[i]] for i in row) <= 512 for row in rows)
        ids = tile_ids(st)
        assert sorted(t for v in ids for t in v) == list(range(sum(st["tiles"]))), f"step {k}: tiles"
        naive = naive_groups(n, dp, 2)
        if name == "naive":
            assert st["groups"] == naive and ids == naive_tiles(st["tiles"], st["vit_dp"])
        replica = {s: d for d, rep in enumerate(naive) for mb in rep for s in mb}
        moved_samples += sum(replica[s] != d for d, rep in enumerate(st["groups"]) for mb in rep for s in mb)
        moved_tiles += sum(set(a) != set(b) for a, b in zip(ids, naive_tiles(st["tiles"], st["vit_dp"])))
    if name != "naive":
        assert moved_samples > 0, "the balancer left every sample on its naive replica"
        assert moved_tiles > 0, "the balancer left every ViT rank with its naive tiles"


def test_metrics_rows_carry_balance_statistics(runs):
    rows = {name: metrics(run_dir) for name, (_, run_dir) in runs.items()}
    for name, rs in rows.items():
        assert [r["step"] for r in rs] == list(range(1, STEPS + 1))
        for r in rs:
            missing = [k for k in BALANCE_KEYS if k not in r]
            assert not missing, f"{name} step {r['step']}: missing {missing}"
            assert all(math.isfinite(r[k]) for k in BALANCE_KEYS)
            for k in IMBALANCE_KEYS:
                assert r[k] >= 1.0 - 1e-12, f"{name}: {k}={r[k]} below 1"
            assert r["balance/exchange_bytes"] >= 0 and r["balance/balancer_ms"] >= 0
        if name == "naive":
            assert all(r["balance/moved_samples"] == 0 and r["balance/moved_tiles"] == 0 for r in rs)
    naive, bal = rows["naive"], rows["balanced"]
    assert any(r["balance/moved_samples"] > 0 for r in bal) and any(r["balance/moved_tiles"] > 0 for r in bal)
    for a, b in zip(naive, bal):  # same samples per step, same layout: tile quotas are optimal
        assert b["balance/vit_imbalance_pred"] <= a["balance/vit_imbalance_pred"] + 1e-9
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(bal, "balance/llm_imbalance_pred") < mean(naive, "balance/llm_imbalance_pred")
    assert mean(bal, "balance/llm_imbalance_pred") <= 1.1


# ----------------------------------------------------------------------------- without processes


def test_naive_placement_matches_the_naive_exchange_plan():
    from engine.balance import CostModel, Layout, SampleShape
    from engine.balance.placement import naive_vit, place
    from engine.data.packing import first_fit
    from engine.parallel.exchange import ExchangePlan

    tiles = [0, 3, 1, 0, 5, 2, 0, 4, 1]
    samples = [SampleShape(t, 20 + 7 * i) for i, t in enumerate(tiles)]
    layout = Layout(world=4, microbatches=2, max_packed_tokens=200, num_image_token=16)
    p = place(samples, layout, first_fit, CostModel(), balanced=False)
    assert p.groups == naive_groups(len(tiles), 4, 2)
    plan = ExchangePlan.from_ranges(tiles, p.vit, p.order())
    assert plan.vit == naive_tiles(tiles, 4)
    assert naive_vit([0, 0, 2], 3) == [[(2, 0, 1)], [(2, 1, 2)], []]
    p.predicted.check([s.tiles for s in samples], [s.llm_tokens(16) for s in samples], layout)


def test_balanced_placement_keeps_the_balancers_rows_and_falls_back_when_short():
    from engine.balance import CostModel, Layout, SampleShape, balance
    from engine.balance.placement import place
    from engine.data.packing import first_fit

    rng = np.random.default_rng(0)
    samples = [SampleShape(int(t), int(x)) for t, x in zip(rng.integers(0, 6, 40), rng.integers(8, 120, 40))]
    layout = Layout(world=4, llm_tp=2, microbatches=2, max_packed_tokens=256, num_image_token=16)
    p = place(samples, layout, first_fit, CostModel(), balanced=True, seed=3)
    a = balance(samples, layout, CostModel(), seed=3)
    assert p.method == "balanced" and p.vit == a.vit
    for rep_p, rep_a in zip(p.rows, a.llm):  # the packer keeps the balancer's microbatches and row counts
        for mb_p, mb_a in zip(rep_p, rep_a):
            assert sorted(s for r in mb_p for s in r) == sorted(s for r in mb_a for s in r)
            assert len(mb_p) == len(mb_a)
            assert all(sum(samples[s].llm_tokens(16) for s in r) <= 256 for r in mb_p)
    assert p.checksum() == place(samples, layout, first_fit, CostModel(), balanced=True, seed=3).checksum()
    short = place(samples[:3], layout, first_fit, CostModel(), balanced=True)
    assert short.method == "naive" and sum(len(mb) == 0 for rep in short.groups for mb in rep) == 1


def test_tight_rows_keep_the_row_count_and_trim_padding():
    from engine.balance.packing import tight_rows
    from engine.data.packing import first_fit

    assert tight_rows([450, 150, 100], 512, first_fit) == ([[0], [1, 2]], 450)
    assert tight_rows([300, 200, 200], 512, first_fit) == ([[0], [1, 2]], 400)
    assert tight_rows([100, 100], 512, first_fit) == ([[0, 1]], 200)
    assert tight_rows([], 512, first_fit) == ([], 512)
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(1, 300, rng.integers(1, 12)).tolist()
        rows, cap = tight_rows(lengths, 512, first_fit)
        assert max(lengths) <= cap <= 512 and rows == first_fit(lengths, cap)
        assert len(rows) <= len(first_fit(lengths, 512))


def test_group_imbalance():
    from engine.balance.measure import group_imbalance

    assert group_imbalance([1.0, 3.0, 2.0, 2.0], [0, 0, 1, 1]) == pytest.approx(1.0)
    assert group_imbalance([1.0, 1.0, 3.0, 3.0], [0, 0, 1, 1]) == pytest.approx(1.5)
    assert group_imbalance([0.0, 0.0], [0, 1]) == 1.0
    with pytest.raises(ValueError, match="3 values for 2"):
        group_imbalance([1.0, 2.0, 3.0], [0, 1])


def test_calibrate_cost_writes_a_loadable_cost_file(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import calibrate_cost

    from engine.balance import CostModel
    from engine.config import load_config
    from engine.parallel.runner import load_cost_model

    out = tmp_path / "cost.json"
    assert calibrate_cost.main(["--out", str(out), "--repeats", "1", "--max-tiles", "3", "--max-tokens", "64"]) == 0
    text = capsys.readouterr().out
    assert "vit_per_tile=" in text and "exchange: defaults kept" in text
    cost = CostModel.load(out)
    assert cost.vit_per_tile + cost.vit_fixed > 0
    assert cost.llm_per_token + cost.llm_per_token_sq + cost.llm_per_row + cost.llm_per_row_sq > 0
    assert cost.exchange_bytes_per_token == 128 * 4  # tiny preset: hidden 128, float32 on CPU
    assert load_cost_model(load_config(None, [f"balance.cost_file={out}"])) == cost
    assert calibrate_cost.main(["--out", str(out), "--max-tokens", "8"]) == 2
    assert "--max-tokens=8 must be >= 16" in capsys.readouterr().err


def test_bad_cost_file_is_named(tmp_path):
    from engine.config import ConfigError, load_config
    from engine.parallel.runner import load_cost_model

    bad = tmp_path / "bad.json"
    bad.write_text('{"vit_per_tile": -1}')
    with pytest.raises(ConfigError, match=r"balance.cost_file=.*bad.json.*vit_per_tile=-1"):
        load_cost_model(load_config(None, [f"balance.cost_file={bad}"]))
    with pytest.raises(ConfigError, match="balance.cost_file=.*missing.json"):
        load_cost_model(load_config(None, [f"balance.cost_file={tmp_path / 'missing.json'}"]))


def test_single_process_accepts_balance_enabled():
    from engine.config import load_config, validate_config

    validate_config(load_config(None, ["balance.enabled=true"]), 1)


def calibrate_two_ranks(rank: int, world: int, out: str) -> int:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import calibrate_cost

    return calibrate_cost.main(["--out", out, "--repeats", "1", "--max-tiles", "1", "--max-tokens", "16"])


def test_calibrate_cost_times_the_exchange_under_two_processes(tmp_path):
    from engine.balance import CostModel

    out = str(tmp_path / "cost.json")
    assert run_distributed(calibrate_two_ranks, 2, out, timeout=120) == [0, 0]
    cost, default = CostModel.load(out), CostModel()
    assert cost.exchange_bandwidth != default.exchange_bandwidth and cost.exchange_bandwidth > 0
    assert cost.exchange_latency != default.exchange_latency
