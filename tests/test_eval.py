"""Held-out evaluation: ``eval_loss`` every ``eval.interval`` steps in metrics.jsonl, the same
under LLM tp=2 and pp=2 as in one process; bad evaluation settings fail before training."""

from __future__ import annotations

import os

import pytest

from conftest import tiny_overrides
from dist_utils import run_distributed, run_jobs
from engine.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples/configs/tiny.yaml")


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> str:
    """Samples the training run never sees (another seed)."""
    from tools.make_synthetic_data import generate

    out = str(tmp_path_factory.mktemp("heldout"))
    generate(out, num_samples=40, seed=5, num_text_docs=20)
    return out


def _opts(data: str, heldout: str, run: str, extra: dict) -> list[str]:
    return tiny_overrides(data, run, **{"train.steps": 10, "train.save_interval": 0, "eval.interval": 5,
                                        "eval.samples": 16, "eval.meta_path": f"{heldout}/meta.json",
                                        "eval.text_corpus": f"{heldout}/text.jsonl", **extra})


def _train(rank: int, world: int, opts: list[str]) -> list:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from engine.trainer import Trainer

    return [(r["loss"], r.get("eval_loss")) for r in Trainer(load_config(CONFIG, opts)).train()]


def test_eval_loss_every_interval_and_the_same_under_any_layout(synthetic_data, heldout, tmp_path):
    from engine.metrics import read_metrics

    single = run_distributed(_train, 1, _opts(synthetic_data, heldout, str(tmp_path / "one"), {}))[0]
    rows = read_metrics(str(tmp_path / "one"))
    assert [r["step"] for r in rows if "eval_loss" in r] == [5, 10]
    want = [e for _, e in single if e is not None]
    assert len(want) == 2 and want[1] < want[0]  # the held-out loss falls while training
    layouts = ({"parallel.llm.tp": 2}, {"parallel.llm.pp": 2, "parallel.llm.microbatches": 2})
    jobs = {k: (_train, (_opts(synthetic_data, heldout, str(tmp_path / f"layout{k}"), extra),))
            for k, extra in enumerate(layouts)}
    results = run_distributed(run_jobs, 2, jobs, timeout=300)  # one spawn, the layouts in turn
    for k, extra in enumerate(layouts):
        for got in (r[k] for r in results):
            assert isinstance(got, list), got  # a failed run returns {"error": traceback}
            evals = [e for _, e in got if e is not None]
            assert len(evals) == 2, extra
            print(f"{extra}: eval losses {evals}, one process {want}, worst relative difference "
                  f"{max(abs(g - w) / abs(w) for g, w in zip(evals, want)):.1e}")
            for g, w in zip(evals, want):
                assert g == pytest.approx(w, rel=1e-5), (extra, g, w)


def test_bad_eval_settings_fail_before_training(synthetic_data, tmp_path):
    with pytest.raises(ConfigError, match="eval.meta_path"):
        load_config(CONFIG, tiny_overrides(synthetic_data, str(tmp_path), **{"eval.interval": 5}))
    with pytest.raises(ConfigError, match="eval.meta_path=.*not found"):
        load_config(CONFIG, tiny_overrides(synthetic_data, str(tmp_path), **{
            "eval.interval": 5, "eval.meta_path": str(tmp_path / "missing.json")}))
    with pytest.raises(ConfigError, match="eval.samples=12"):
        load_config(CONFIG, tiny_overrides(synthetic_data, str(tmp_path), **{
            "eval.interval": 5, "eval.meta_path": f"{synthetic_data}/meta.json", "eval.samples": 12}))
