"""Each rank loads only its share of a step, and the run still trains like one process.

4 gloo ranks, tiny preset, LLM tp2 x dp2 and ViT dp4, 10 steps, with balancing off (loading in the
training process) and on (one worker process per rank, prefetching). After the shape index is built,
one image is replaced by one of another shape (found by every rank that reads the record: stale
index) and one is cut short (its header still reads, so only the rank that decodes its pixels finds
it): every layout must skip both, identically. Checked: the loss and grad-norm trajectory equals
one process (relative 1e-4), the skip counts agree, and over the 10 steps the busiest rank decodes at
most 0.35 of the step's images (one process decodes all of them) and tokenises at most 0.6 of its samples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import tiny_overrides
from dist_utils import run_distributed, run_jobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10


def overrides(data: str, run_dir: str, extra: list[str] = ()) -> list[str]:
    return tiny_overrides(data, run_dir, **{"train.steps": STEPS, "train.global_batch": 16,
                                            "train.save_interval": 0}) + list(extra)


def train(rank: int, world: int, opts: list[str]) -> dict:
    """The real Trainer; records each step's data counters on this rank."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from engine.config import load_config
    from engine.trainer import Trainer

    trainer = Trainer(load_config(None, opts))
    step_fn, steps = trainer.runner.forward_backward, []

    def recording(batch):
        stats = step_fn(batch)
        steps.append({**batch.counters, "images": sum(len(t) for t in batch.image_tiles), "samples": len(batch)})
        return stats

    trainer.runner.forward_backward = recording
    history = [(h["loss"], h["grad_norm"]) for h in trainer.train()]
    return {"history": history, "steps": steps, "stats": dict(trainer.loader.stats)}


def image_path(ds, i: int) -> str:
    kind, a, line = ds.locate(i)
    rec = json.loads(ds.annotations[a].lines.read(line))
    return os.path.join(ds.annotations[a].root, rec["image"] if isinstance(rec["image"], str) else rec["image"][0])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """Synthetic data, its shape index, then two images changed behind the index's back."""
    from engine.config import load_config
    from engine.data.dataset import build_dataset

    out = str(tmp_path_factory.mktemp("sharded_data"))
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_synthetic_data.py"), "--out", out,
                    "--num-samples", "96"], check=True, capture_output=True)
    ds = build_dataset(load_config(None, overrides(out, "unused")))
    mm = [i for i in range(16, 64) if not ds.is_text(i)]
    stale, cut = image_path(ds, mm[0]), image_path(ds, mm[len(mm) // 2])
    w, h = Image.open(stale).size
    Image.new("RGB", (4 * max(w, h), max(8, min(w, h) // 2)), (9, 9, 9)).save(stale)
    with open(cut, "rb") as f:
        raw = f.read()
    with open(cut, "wb") as f:
        f.write(raw[: len(raw) // 2])
    return out


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict:
    layouts = {"one": (1, []),
               "naive": (4, ["parallel.llm.tp=2"]),
               "balanced": (4, ["parallel.llm.tp=2", "balance.enabled=true", "data.num_workers=1"])}
    opts = {name: overrides(data, str(tmp_path_factory.mktemp(name) / "run"), extra)
            for name, (_, extra) in layouts.items()}
    out = {"one": train(0, 1, opts["one"])}
    jobs = {name: (train, (opts[name],)) for name in layouts if name != "one"}
    ranks = run_distributed(run_jobs, 4, jobs, timeout=600)  # one spawn, the layouts in turn
    for name in jobs:
        assert all("error" not in r[name] for r in ranks), [r[name].get("error") for r in ranks]
        out[name] = [r[name] for r in ranks]
    return out


@pytest.mark.parametrize("name", ["naive", "balanced"])
def test_rank_shares_train_like_one_process(runs, name):
    ref, ranks = runs["one"], runs[name]
    assert ref["stats"] == {"stale_index": 1, "corrupt_image": 1}, ref["stats"]
    assert all(r["stats"] == ref["stats"] for r in ranks), [r["stats"] for r in ranks]
    assert all(r["history"] == ranks[0]["history"] for r in ranks), "ranks report different trajectories"
    assert len(ranks[0]["history"]) == STEPS
    for step, ((l0, g0), (l1, g1)) in enumerate(zip(ref["history"], ranks[0]["history"]), start=1):
        assert abs(l1 - l0) <= 1e-4 * abs(l0), f"step {step}: loss {l1} vs {l0} in one process"
        assert abs(g1 - g0) <= 1e-4 * abs(g0), f"step {step}: grad norm {g1} vs {g0} in one process"


@pytest.mark.parametrize("name", ["naive", "balanced"])
def test_each_rank_loads_only_its_share(runs, name):
    ref, ranks = runs["one"], runs[name]
    images = sum(s["images"] for s in ref["steps"])
    samples = sum(s["samples"] for s in ref["steps"])
    assert images > 50 and sum(s["images_decoded"] for s in ref["steps"]) == images  # one process: all
    assert [s["images"] for s in ranks[0]["steps"]] == [s["images"] for s in ref["steps"]]
    decoded = [sum(s["images_decoded"] for s in r["steps"]) for r in ranks]
    tokenised = [sum(s["samples_tokenised"] for s in r["steps"]) for r in ranks]
    assert max(decoded) <= 0.35 * images, f"images decoded per rank {decoded} of {images}"
    assert max(tokenised) <= 0.6 * samples, f"samples tokenised per rank {tokenised} of {samples}"
    assert min(decoded) > 0 and sum(decoded) >= images  # every image is decoded somewhere


def test_metrics_report_the_data_work(runs, tmp_path_factory):
    # the trainer's rows carry the busiest rank's data work (the last run's metrics file)
    base = tmp_path_factory.getbasetemp()
    path = next(p for p in (os.path.join(base, d, "run", "metrics.jsonl") for d in os.listdir(base)
                            if d.startswith("balanced")) if os.path.exists(p))
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == STEPS
    for key in ("data/images_decoded_max", "data/tiles_decoded_max", "data/samples_tokenised_max",
                "data/wait_seconds_max", "data/images"):
        assert all(key in r for r in rows), key
    assert rows[-1]["skipped_samples"] == 2
