"""MPO under LLM tensor (with and without sequence parallelism), pipeline (1F1B and interleaved),
head parallelism and balanced data parallelism (gloo, 2 processes) equals one process.

One spawn runs every layout in turn. Each rank computes the single-process reference itself
(``LocalRunner`` with the ``MPO`` objective) and the parallel runner's result from the same initial weights and pairs,
then returns the differences: reference log-probs (the frozen model's forward-only pipeline
pass), the step's loss parts and metrics, and every parameter's gradient (gathered over tp;
with pp each rank reports the parameters of its stages).
"""

from __future__ import annotations

import copy

import pytest
import torch

from dist_utils import run_distributed

LAYOUTS = {
    "llm_tp2": ({"llm": {"tp": 2}}, 1),
    "llm_tp2_sp": ({"llm": {"tp": 2, "sp": True}}, 1),
    "llm_pp2": ({"llm": {"pp": 2}}, 2),
    "llm_pp2_vpp2": ({"llm": {"pp": 2, "vpp": 2}}, 2),
    "llm_hp2": ({"llm": {"hp": 2}}, 1),
    "dp2_balanced": ({"llm": {}, "balance": True}, 2),  # the balancer places pairs like samples
}
METRICS = ("loss", "mpo/dpo", "mpo/bco", "mpo/lm", "rewards/chosen", "rewards/rejected", "rewards/accuracy",
           "rewards/margin", "vit_tiles")


def _config(data: str, parallel: dict, microbatches: int):
    from engine.config import config_from_dict

    parallel = copy.deepcopy(parallel)
    balance = parallel.pop("balance", False)
    parallel.setdefault("llm", {})["microbatches"] = microbatches
    return config_from_dict({"model": {"preset": "tiny"}, "parallel": parallel, "train": {"global_batch": 4},
                             "balance": {"enabled": balance},
                             "data": {"tokenizer": f"{data}/tokenizer.model", "max_packed_tokens": 512,
                                      "max_sample_tokens": 512, "max_dynamic_patch": 2, "loss_reduction": "square"}})


def _layouts(rank: int, world: int, data: str) -> dict:
    from engine.models.internvl import InternVLModel
    from engine.parallel.tensor_parallel import gather_full
    from engine.posttrain.config import MPOConfig
    from engine.posttrain.preference import PreferenceDataset
    from engine.posttrain.reference import ReferenceStore
    from engine.parallel.runner import ParallelRunner
    from engine.posttrain.objective import MPO, frozen_copy
    from engine.step import LocalRunner

    out = {}
    for name, (parallel, M) in LAYOUTS.items():
        cfg = _config(data, parallel, M)
        single = _config(data, {}, 1)
        ds = PreferenceDataset(f"{data}/preference_meta.json", cfg.data, cfg.model, 0)
        pairs = [ds.load(i) for i in range(4)]
        torch.manual_seed(0)
        model = InternVLModel(cfg.model)
        mpo = MPOConfig(beta=0.5)
        local = LocalRunner(copy.deepcopy(model), single, torch.device("cpu"), objective=MPO(mpo, single))
        par = ParallelRunner(copy.deepcopy(model), cfg, torch.device("cpu"), objective=MPO(mpo, cfg))
        for r in (local, par):
            r.objective.reference = r.shard_like(frozen_copy(model))
        ref_l, ref_p = (r.objective.reference_logps(pairs, r) for r in (local, par))
        # a reference away from the policy and a non-zero shift, so every term has a gradient
        shifted = ref_l + torch.tensor([[0.7, -0.4], [-1.1, 0.2], [0.3, 0.9], [-0.5, -0.6]], dtype=torch.float64)
        store = ReferenceStore(torch.tensor([p.index for p in pairs]), shifted, {})
        for r in (local, par):
            r.objective.set_reference_store(store)
            r.objective.shift.mean, r.objective.shift.count = 0.15, 2
        metrics = [r.forward_backward(pairs)["metrics"] for r in (local, par)]
        ref_grads = {n: p.grad for n, p in local.model.named_parameters()}
        topo = par.topo
        worst, names = 0.0, []
        scale = max(g.abs().max().item() for g in ref_grads.values())
        for n, p in par.model.named_parameters():
            grid = topo.llm if p.shard_info.grid == "llm" else topo.vit
            g = gather_full(p.grad, p.shard_info, grid.group("tp"))
            worst = max(worst, (g - ref_grads[n]).abs().max().item() / scale)
            names.append(n)
        out[name] = {"ref": (ref_l, ref_p), "metrics": tuple(metrics), "worst": worst,
                     "names": names, "all_names": sorted(ref_grads), "delta": (local.objective.shift.delta, par.objective.shift.delta),
                     "method": par.last_placement.method}
    return out


@pytest.fixture(scope="module")
def results(synthetic_data):
    return run_distributed(_layouts, 2, synthetic_data, timeout=600)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_mpo_matches_single_process(results, name):
    for rank, res in enumerate(results):
        r = res[name]
        ref_l, ref_p = r["ref"]
        assert torch.allclose(ref_l, ref_p, rtol=1e-5, atol=1e-4), (rank, ref_l, ref_p)
        single, parallel = r["metrics"]
        for key in METRICS:
            assert parallel[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), (rank, key)
        assert single["rewards/margin"] != 0 and single["mpo/bco"] > 0
        assert r["worst"] < 1e-4, (rank, r["worst"])
        # delta is a linear function of the step's mean rewards (each compared above at rel 1e-4);
        # those are differences of float32 sequence log-probs, so delta carries their noise too
        assert r["delta"][0] == pytest.approx(r["delta"][1], rel=1e-4, abs=1e-6)
        assert r["method"] == ("balanced" if name.endswith("balanced") else "naive")
    covered = set().union(*(set(res[name]["names"]) for res in results))
    assert covered == set(results[0][name]["all_names"])  # every gradient was compared on some rank
