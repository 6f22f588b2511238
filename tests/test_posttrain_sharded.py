"""MPO: each rank loads only its share of a step's preference pairs, and the run still trains like
one process.

2 gloo ranks, tiny preset, LLM dp2 and ViT dp2, 5 steps of 8 pairs through the real ``PostTrainer``:
with the frozen reference model (loading in the training process), and with the precomputed
reference (its first pass loads per rank too) under the balancer with one loader worker process per
rank, prefetching. After the shape index is built, in step 2 one pair's image is replaced by one of
another shape (every rank that reads the record finds it: stale index) and another pair's is cut
short (its header still reads, so only a rank that decodes its pixels finds it): every run must skip
both, identically. Checked: loss and grad norm equal one process at every step (relative 1e-5), the
skip counts agree on every rank, and over the 5 steps the busiest rank decodes at most 0.7 of the
steps' images and 0.6 of their tiles (``data/images_decoded_max``, ``data/tiles_decoded_max``; one
process decodes all of them; with two ViT ranks a rank makes half the tiles, plus whole images split
between the two, plus what a step placed again after a drop adds) and tokenises at most 0.7 of the pairs.
"""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from dist_utils import run_distributed, run_jobs
from test_preference_index import copy_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, BATCH, PAIRS = 5, 8, 40
QUIET = {"train.progress": "false", "train.tensorboard": "false", "train.save_interval": 0}


def overrides(data: str, run_dir: str, extra: dict) -> list[str]:
    opts = {**QUIET, "data.tokenizer": f"{data}/tokenizer.model", "data.system_prompt": "", "posttrain.init": "",
            "posttrain.data": f"{data}/meta.json", "run.dir": run_dir, "train.steps": STEPS,
            "train.global_batch": BATCH, "train.lr": 1e-3, "train.warmup_steps": 1, **extra}
    return [f"{k}={v}" for k, v in opts.items()]


def train(rank: int, world: int, opts: list[str]) -> dict:
    """The real PostTrainer; records each step's data counters on this rank."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from engine.posttrain.config import load_posttrain_config
    from engine.posttrain.trainer import PostTrainer

    trainer = PostTrainer(*load_posttrain_config(os.path.join(ROOT, "examples/configs/mpo_tiny.yaml"), opts))
    step_fn, steps = trainer.runner.forward_backward, []

    def recording(batch):
        stats = step_fn(batch)
        steps.append({**batch.counters, "images": sum(len(t) for t in batch.image_tiles), "tiles": sum(batch.num_tiles),
                      "pairs": len(batch)})
        return stats

    trainer.runner.forward_backward = recording
    rows = trainer.train()
    return {"history": [(r["loss"], r["grad_norm"]) for r in rows], "steps": steps, "stats": dict(trainer.loader.stats),
            "rows": [{k: v for k, v in r.items() if k.startswith("data/") or k == "skipped_samples"} for r in rows]}


@pytest.fixture(scope="module")
def data(synthetic_data, tmp_path_factory) -> str:
    """The first pairs of the synthetic preference data, their shape index, then two images changed."""
    from engine.posttrain.config import load_posttrain_config
    from engine.posttrain.preference import PreferenceDataset

    out = tmp_path_factory.mktemp("sharded_prefs")
    copy_pairs(synthetic_data, out, PAIRS)
    cfg, pt = load_posttrain_config(os.path.join(ROOT, "examples/configs/mpo_tiny.yaml"),
                                    overrides(str(out), "unused", {}))
    ds = PreferenceDataset(pt.data, cfg.data, cfg.model, cfg.train.seed)  # builds the index
    multi = [i for i in range(BATCH, 2 * BATCH) if sum(ds.shape(i)[3]) >= 3]  # in step 2

    def image(i: int) -> str:
        a, line = ds.locate(i)
        return os.path.join(ds.annotations[a].root, json.loads(ds.annotations[a].lines.read(line))["image"])

    stale, cut = image(multi[0]), image(multi[1])
    w, h = Image.open(stale).size
    Image.new("RGB", (max(w, h), max(w, h)), (9, 9, 9)).save(stale)  # square: one tile, not three
    raw = open(cut, "rb").read()
    with open(cut, "wb") as f:
        f.write(raw[: len(raw) // 2])
    return str(out)


LAYOUTS = {"dp2": {},
           "dp2_precomputed_workers": {"posttrain.mpo.reference": "precomputed", "balance.enabled": "true",
                                       "data.num_workers": 1}}


@pytest.fixture(scope="module")
def one(data, tmp_path_factory) -> dict:
    """The one-process run, in this process."""
    return train(0, 1, overrides(data, str(tmp_path_factory.mktemp("one") / "run"), {}))


@pytest.fixture(scope="module")
def two_rank_runs(data, tmp_path_factory) -> dict[str, list[dict]]:
    """Every layout's 2-rank run (every rank's record), in one spawn."""
    jobs = {name: (train, (overrides(data, str(tmp_path_factory.mktemp(name) / "run"), extra),))
            for name, extra in LAYOUTS.items()}
    ranks = run_distributed(run_jobs, 2, jobs, timeout=600)
    for r in ranks:
        for name, res in r.items():
            assert "error" not in res, f"{name}: {res.get('error')}"
    return {name: [r[name] for r in ranks] for name in LAYOUTS}


@pytest.fixture(params=list(LAYOUTS))
def ranks(request, two_rank_runs) -> tuple[str, list[dict]]:
    """(layout, every rank's record) of a 2-rank run."""
    return request.param, two_rank_runs[request.param]


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_rank_shares_train_like_one_process(one, ranks):
    name, results = ranks
    assert one["stats"] == {"stale_index": 1, "corrupt_image": 1}, one["stats"]
    assert [r["stats"] for r in results] == [one["stats"]] * len(results)  # every rank counts both skips
    assert results[0]["history"] == results[1]["history"], "ranks report different trajectories"
    assert len(one["history"]) == STEPS and results[0]["rows"][-1]["skipped_samples"] == 2
    diffs = [(relative(l1, l0), relative(g1, g0))
             for (l0, g0), (l1, g1) in zip(one["history"], results[0]["history"])]
    print(f"{name}: worst relative difference of loss / grad norm to one process "
          f"{max(d for pair in diffs for d in pair):.2e}")
    assert len(diffs) == STEPS and all(dl <= 1e-5 and dg <= 1e-5 for dl, dg in diffs), diffs


def test_each_rank_loads_only_its_share(one, ranks):
    name, results = ranks
    images, tiles = (sum(s[k] for s in one["steps"]) for k in ("images", "tiles"))
    pairs = sum(s["pairs"] for s in one["steps"])
    alone = [sum(r[f"data/{k}_decoded_max"] for r in one["rows"]) for k in ("images", "tiles")]
    assert alone == [images, tiles]  # one process decodes every image of the steps
    assert [s["images"] for s in results[0]["steps"]] == [s["images"] for s in one["steps"]]
    decoded = [sum(s["images_decoded"] for s in r["steps"]) for r in results]
    tiles_decoded = [sum(s["tiles_decoded"] for s in r["steps"]) for r in results]
    tokenised = [sum(s["samples_tokenised"] for s in r["steps"]) for r in results]
    busiest = [sum(r[f"data/{k}_decoded_max"] for r in results[0]["rows"]) for k in ("images", "tiles")]
    print(f"{name}: busiest rank decoded {busiest[0]:.0f} of {images} images, {busiest[1]:.0f} of {tiles} tiles "
          f"(per rank {decoded}, {tiles_decoded}), tokenised {max(tokenised)} of {pairs} pairs")
    assert busiest[0] >= max(decoded) and busiest[1] >= max(tiles_decoded)  # per step maxima, summed
    assert busiest[0] <= 0.7 * images and busiest[1] <= 0.6 * tiles, (busiest, images, tiles)
    assert max(tokenised) <= 0.7 * pairs, f"pairs tokenised per rank {tokenised} of {pairs}"
    assert min(decoded) > 0 and sum(tiles_decoded) >= tiles  # every tile is decoded somewhere
