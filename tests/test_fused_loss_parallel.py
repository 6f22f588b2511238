"""The fused LM head + weighted cross entropy (``kernels.loss=triton``; the Triton interpreter on CPU)
under LLM tensor parallelism (vocab-parallel, with the tp group) and on the last stage of a pipeline
gives the loss and gradient norm of the reference loss (relative 1e-5)."""

from __future__ import annotations

import os

import pytest

from conftest import tiny_overrides
from dist_utils import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples/configs/tiny.yaml")


def two_steps(rank: int, world: int, data: str, run: str, layout: list[str]) -> dict:
    """Two training steps with the reference loss and two with the fused kernel, same start."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from engine.config import load_config
    from engine.trainer import Trainer

    out = {}
    for mode in ("reference", "triton"):
        opts = tiny_overrides(data, f"{run}/{mode}", **{
            "train.steps": 2, "train.global_batch": 4, "train.save_interval": 0, "data.max_packed_tokens": 256,
            "data.max_sample_tokens": 256, "kernels.loss": mode, "model.llm.tie_word_embeddings": "false"})
        trainer = Trainer(load_config(CONFIG, opts + layout))
        out[mode] = [(r["loss"], r["grad_norm"]) for r in trainer.train()]
    return out


@pytest.mark.parametrize("layout", [["parallel.llm.tp=2"], ["parallel.llm.pp=2", "parallel.llm.microbatches=2"]],
                         ids=["tp2", "pp2"])
def test_fused_loss_equals_the_reference(synthetic_data, tmp_path, layout):
    ranks = run_distributed(two_steps, 2, synthetic_data, str(tmp_path), layout, timeout=300)
    for r in ranks:
        assert r == ranks[0], "ranks report different trajectories"
    ref, fused = ranks[0]["reference"], ranks[0]["triton"]
    assert len(ref) == len(fused) == 2
    for (l0, g0), (l1, g1) in zip(ref, fused):
        assert abs(l1 - l0) <= 1e-5 * abs(l0), (l1, l0)
        assert abs(g1 - g0) <= 1e-5 * abs(g0), (g1, g0)
