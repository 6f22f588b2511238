"""MPO pieces on one process: closed forms of the loss parts, config, preference data, pair packing."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from engine.config import ConfigError, config_from_dict
from engine.data.loader import StepLoader
from engine.models.internvl import InternVLModel
from engine.posttrain.config import MPOConfig, load_posttrain_config
from engine.posttrain.losses import RewardShift, bco_pair_loss, dpo_loss, mpo_loss, pair_terms, summarize
from engine.posttrain.pairs import lm_weight_total, pack_pairs
from engine.posttrain.preference import PreferenceDataset
from engine.posttrain.objective import MPO, frozen_copy
from engine.step import LocalRunner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ----------------------------------------------------------------------------- closed forms

PC, PR, RC, RR = [-3.0, -7.5, -2.0], [-5.0, -6.0, -9.0], [-4.0, -7.0, -1.0], [-4.5, -6.5, -8.0]


def test_dpo_matches_closed_form():
    beta = 0.25
    got = dpo_loss(*(torch.tensor(v, dtype=torch.float64) for v in (PC, PR, RC, RR)), beta)
    for k in range(3):
        want = -logsig(beta * ((PC[k] - RC[k]) - (PR[k] - RR[k])))
        assert got[k].item() == pytest.approx(want, rel=1e-12)


def test_bco_matches_closed_form():
    beta, delta = 0.5, 0.3
    got = bco_pair_loss(*(torch.tensor(v, dtype=torch.float64) for v in (PC, PR, RC, RR)), beta, delta)
    for k in range(3):
        rc, rr = beta * (PC[k] - RC[k]), beta * (PR[k] - RR[k])
        assert got[k].item() == pytest.approx(-logsig(rc - delta) - logsig(-(rr - delta)), rel=1e-12)


def test_mpo_loss_combines_parts_with_global_normalisers():
    beta, delta = 0.1, -0.2
    policy = torch.tensor([PC, PR], dtype=torch.float64).T.requires_grad_()
    ref = torch.tensor([RC, RR], dtype=torch.float64).T
    lm_sum = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    N, W = 10.0, 4.0  # this microbatch holds 3 of 10 pairs; the batch's LM weight is 4
    loss, stats = mpo_loss(policy, ref, lm_sum, pref_weight=0.8, quality_weight=0.2, gen_weight=1.0, beta=beta,
                           delta=delta, num_pairs=N, lm_weight_total=W)
    dpo = sum(-logsig(beta * ((PC[k] - RC[k]) - (PR[k] - RR[k]))) for k in range(3))
    bco = sum(-logsig(beta * (PC[k] - RC[k]) - delta) - logsig(-(beta * (PR[k] - RR[k]) - delta)) for k in range(3))
    assert loss.item() == pytest.approx(0.8 * dpo / N + 0.2 * bco / N + 6.0 / W, rel=1e-12)
    assert stats["dpo"] == pytest.approx(dpo) and stats["bco"] == pytest.approx(bco)
    assert stats["lm"] == pytest.approx(6.0 / W)
    rewards_c = [beta * (PC[k] - RC[k]) for k in range(3)]
    rewards_r = [beta * (PR[k] - RR[k]) for k in range(3)]
    assert stats["reward_chosen"] == pytest.approx(sum(rewards_c))
    # pair 0 ranks chosen higher, pair 1 lower, pair 2 ties (not counted as correct)
    assert stats["reward_correct"] == sum(c > r for c, r in zip(rewards_c, rewards_r)) == 1
    loss.backward()
    # d/d pc of the DPO part: -0.8/N * beta * s(-z)
    z = beta * ((PC[0] - RC[0]) - (PR[0] - RR[0]))
    zc = beta * (PC[0] - RC[0]) - delta
    want = -0.8 / N * beta / (1 + math.exp(z)) - 0.2 / N * beta / (1 + math.exp(zc))
    assert policy.grad[0, 0].item() == pytest.approx(want, rel=1e-10)
    assert lm_sum.grad.item() == pytest.approx(1.0 / W)
    m = summarize(stats, 3, (0.8, 0.2, 1.0))
    assert m["rewards/accuracy"] == pytest.approx(1 / 3)
    assert m["rewards/margin"] == pytest.approx((sum(rewards_c) - sum(rewards_r)) / 3)
    assert m["loss"] == pytest.approx(0.8 * dpo / 3 + 0.2 * bco / 3 + 6.0 / W)


def test_reward_shift_is_running_mean_of_past_steps():
    s = RewardShift()
    assert s.delta == 0.0
    for x in (1.0, 2.0, 6.0):
        s.update(x)
    assert s.delta == pytest.approx(3.0)
    t = RewardShift()
    t.load_state_dict(s.state_dict())
    t.update(-1.0)
    assert (t.delta, t.count) == (pytest.approx(2.0), 4)
    with pytest.raises(ValueError, match="count"):
        t.load_state_dict({"mean": 0.0})


def test_pair_terms_rewards_detached():
    policy = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    t = pair_terms(policy, torch.tensor([[-1.5, -1.0]]), 1.0, 0.0)
    assert not t["reward_chosen"].requires_grad and t["dpo"].requires_grad
    assert t["reward_chosen"].item() == pytest.approx(0.5) and t["reward_rejected"].item() == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- config


def test_posttrain_config_sections_and_overrides(tmp_path):
    path = os.path.join(ROOT, "examples/configs/mpo_tiny.yaml")
    cfg, pt = load_posttrain_config(path, ["posttrain.mpo.beta=0.3", "train.steps=7", "posttrain.init="],
                                    validate=False)
    assert (pt.mode, pt.mpo.beta, cfg.train.steps) == ("mpo", 0.3, 7)
    assert (pt.mpo.pref_weight, pt.mpo.quality_weight, pt.mpo.gen_weight) == (0.8, 0.2, 1.0)
    with pytest.raises(ConfigError, match="posttrain.mpo.betta"):
        load_posttrain_config(path, ["posttrain.mpo.betta=1"], validate=False)
    with pytest.raises(ConfigError, match="posttrain.mpo.reference='frozen'"):
        load_posttrain_config(path, ["posttrain.mpo.reference=frozen", "posttrain.init="])
    with pytest.raises(ConfigError, match="posttrain.mpo.beta=-1"):
        load_posttrain_config(path, ["posttrain.mpo.beta=-1", "posttrain.init="])
    bad = tmp_path / "bad.yaml"
    bad.write_text("posttrain:\n  mode: rlhf\n")
    with pytest.raises(ConfigError, match="posttrain.mode='rlhf'"):
        load_posttrain_config(str(bad))


# ----------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def cfg(synthetic_data):
    c = config_from_dict({"model": {"preset": "tiny"}, "data": {
        "tokenizer": f"{synthetic_data}/tokenizer.model", "max_packed_tokens": 512, "max_sample_tokens": 512,
        "max_dynamic_patch": 2, "loss_reduction": "token"}})
    return c


@pytest.fixture(scope="module")
def pairs(cfg, synthetic_data):
    ds = PreferenceDataset(f"{synthetic_data}/preference_meta.json", cfg.data, cfg.model, 0)
    return [ds.load(i) for i in range(6)]


def test_preference_pairs_share_tiles_and_prompt(pairs):
    for p in pairs:
        assert p.chosen.pixel_values is p.rejected.pixel_values and p.num_tiles >= 1
        c, r = p.chosen.input_ids.tolist(), p.rejected.input_ids.tolist()
        first_sup = int((p.chosen.labels != -100).nonzero()[0])
        assert c[:first_sup] == r[:first_sup]  # same prompt
        assert c != r


def test_bad_preference_lines_are_skipped_and_counted(cfg, synthetic_data, tmp_path):
    good = json.loads(open(f"{synthetic_data}/preference.jsonl").readline())
    lines = [json.dumps({**good, "image": os.path.join(synthetic_data, "images", good["image"])}),
             "{not json",
             json.dumps({"image": "nope.png", "question": "q", "chosen": "a", "rejected": "b"}),
             json.dumps({"question": "q", "chosen": "same", "rejected": "same"}),
             json.dumps({"question": "", "chosen": "a", "rejected": "b"}),
             json.dumps({"question": "What colour?", "chosen": "red " * 1000, "rejected": "blue"}),
             json.dumps({"image": 5, "question": "q", "chosen": "a", "rejected": "b"}),
             json.dumps({"question": "no image here", "chosen": "yes", "rejected": "no"})]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    ds = PreferenceDataset(str(path), cfg.data, cfg.model, 0)
    loader = StepLoader(ds, len(lines))
    got = loader.next_step()
    assert len(got) == 2
    assert {p.source.rsplit(":", 1)[1] for p in got} == {"1", "8"}
    assert loader.stats == {"malformed": 4, "missing_image": 1, "too_long": 1}
    text_only = next(p for p in got if p.source.endswith(":8"))
    assert text_only.pixel_values is None and text_only.num_tiles == 0


def test_pack_pairs_lm_weights_and_feature_index(cfg, pairs):
    mb = pack_pairs(pairs, cfg, pad_to_multiple=4)
    assert mb.batch.input_ids.shape[1] % 4 == 0
    assert mb.num_tiles == sum(p.num_tiles for p in pairs)
    assert mb.feature_index.numel() == 2 * mb.num_tiles  # each pair's tiles consumed twice
    assert int(mb.batch.image_tiles.sum()) == 2 * mb.num_tiles
    # LM weights cover exactly the chosen responses (token reduction: weight 1 per target)
    assert float(mb.lm_weights.sum()) == pytest.approx(lm_weight_total(pairs, "token"))
    assert float(mb.lm_weights.sum()) == sum(p.chosen.num_targets for p in pairs)


def _direct_logp(model, sample) -> float:
    """Sum of log p(target) of one unpacked sample from the model's full forward."""
    logits = model(sample.input_ids[None], sample.pixel_values)[0]
    lp = torch.log_softmax(logits.double(), -1)
    tgt = sample.labels[1:]
    keep = tgt != -100
    return float(lp[:-1][keep].gather(1, tgt[keep][:, None]).sum())


def test_packed_pair_logps_equal_separate_forwards(cfg, pairs):
    from engine.posttrain.objective import pair_logps

    torch.manual_seed(0)
    model = InternVLModel(cfg.model)
    runner = LocalRunner(model, cfg, torch.device("cpu"), objective=MPO(MPOConfig(), cfg))
    group = pairs[:3]
    lm_sums = []

    def head(lm, layout, h, tokens, mb):
        logps, lm_sum = pair_logps(lm, layout, h, tokens, mb)
        lm_sums.append(float(lm_sum))
        return logps

    logps = runner.forward_only(group, head, 2)
    with torch.no_grad():
        want = [_direct_logp(model, s) for p in group for s in (p.chosen, p.rejected)]
    assert logps.flatten().tolist() == pytest.approx(want, rel=1e-4)
    chosen = sum(want[0::2])
    assert sum(lm_sums) == pytest.approx(-chosen, rel=1e-4)  # token weights: sum of chosen CE


def _local_runner(cfg, microbatches: int, mpo: MPOConfig = MPOConfig()):
    import copy

    c = copy.deepcopy(cfg)
    c.parallel.llm.microbatches = microbatches
    torch.manual_seed(0)
    model = InternVLModel(c.model)
    reference = frozen_copy(model)  # the initial policy
    runner = LocalRunner(model, c, torch.device("cpu"), objective=MPO(mpo, c))
    runner.objective.reference = runner.shard_like(reference)
    return runner


def test_local_step_encodes_each_image_once_and_split_does_not_matter(cfg, pairs):
    grads, losses = [], []
    for M in (1, 3):
        runner = _local_runner(cfg, M)
        with torch.no_grad():  # move the policy away from the reference so rewards are non-zero
            for p in runner.model.language_model.lm_head.parameters():
                p.add_(0.02 * torch.randn_like(p))
        runner.objective.shift.mean, runner.objective.shift.count = 0.05, 3
        tiles = []
        runner.model.vision_model.register_forward_hook(lambda m, i, o: tiles.append(i[0].shape[0]))
        stats = runner.forward_backward(pairs)
        assert sum(tiles) == sum(p.num_tiles for p in pairs) == stats["metrics"]["vit_tiles"]
        assert stats["weight_total"] == len(pairs) and stats["samples"] == 2 * len(pairs)
        losses.append(dict(stats["metrics"]))
        grads.append({n: p.grad.clone() for n, p in runner.model.named_parameters() if p.grad is not None})
        assert runner.objective.shift.count == 4  # updated after the step
    a, b = losses
    for key in ("loss", "mpo/dpo", "mpo/bco", "mpo/lm", "rewards/chosen", "rewards/accuracy", "rewards/margin"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert a["mpo/delta"] == pytest.approx(0.05)
    assert a["rewards/margin"] != 0.0
    assert a["loss"] == pytest.approx(0.8 * a["mpo/dpo"] + 0.2 * a["mpo/bco"] + a["mpo/lm"], rel=1e-6)
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7), name
    assert any(g.abs().sum() > 0 for n, g in grads[0].items() if n.startswith("vision_model."))
