"""The MPO objective on sequence log-probabilities (sums over response tokens).

With policy log-probs ``pc, pr`` and reference log-probs ``rc, rr`` of the chosen and rejected
responses, rewards are ``r_c = beta (pc - rc)`` and ``r_r = beta (pr - rr)``, and per pair

    DPO (sigmoid):  -log s(r_c - r_r)
    BCO (pair):     -log s(r_c - delta) - log s(-(r_r - delta))

with ``delta`` the reward shift: the running mean of the mean reward (chosen and rejected) of
the past steps. The LM term is the weighted cross entropy of the chosen responses.
MPO = pref_weight * DPO + quality_weight * BCO + gen_weight * LM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def rewards(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor,
            beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards ``(beta (pc - rc), beta (pr - rr))`` per pair."""
    return beta * (pc - rc), beta * (pr - rr)


def dpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float) -> torch.Tensor:
    """Sigmoid DPO per pair: ``-log s(beta ((pc - rc) - (pr - rr)))``."""
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def bco_pair_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float,
                  delta: float) -> torch.Tensor:
    """BCO per pair: ``-log s(r_c - delta) - log s(-(r_r - delta))``."""
    r_c, r_r = rewards(pc, pr, rc, rr, beta)
    return -F.logsigmoid(r_c - delta) - F.logsigmoid(-(r_r - delta))


@dataclass
class RewardShift:
    """BCO's ``delta``: the mean over past steps of each step's mean reward (chosen and rejected
    alike). Starts at 0; ``update`` after each step; kept in the checkpoint."""

    mean: float = 0.0
    count: int = 0

    @property
    def delta(self) -> float:
        return self.mean

    def update(self, step_mean_reward: float) -> None:
        self.count += 1
        self.mean += (float(step_mean_reward) - self.mean) / self.count

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        for key in ("mean", "count"):
            if key not in state:
                raise ValueError(f"reward shift state lacks '{key}'")
        self.mean, self.count = float(state["mean"]), int(state["count"])


# The statistics a step accumulates (sums over pairs) and reports (means).
STAT_KEYS = ("dpo", "bco", "lm", "reward_chosen", "reward_rejected", "reward_correct", "logp_chosen",
             "logp_rejected")


def pair_terms(policy: torch.Tensor, reference: torch.Tensor, beta: float, delta: float) -> dict[str, torch.Tensor]:
    """Per-pair DPO and BCO losses and detached statistics. ``policy``/``reference``: ``[pairs, 2]``
    (chosen, rejected) sequence log-probs; ``reference`` carries no gradient."""
    pc, pr = policy[:, 0], policy[:, 1]
    rc, rr = reference[:, 0].to(policy.dtype), reference[:, 1].to(policy.dtype)
    r_c, r_r = rewards(pc.detach(), pr.detach(), rc, rr, beta)
    return {"dpo": dpo_loss(pc, pr, rc, rr, beta), "bco": bco_pair_loss(pc, pr, rc, rr, beta, delta),
            "reward_chosen": r_c, "reward_rejected": r_r, "reward_correct": (r_c > r_r).to(policy.dtype),
            "logp_chosen": pc.detach(), "logp_rejected": pr.detach()}


def mpo_loss(policy: torch.Tensor, reference: torch.Tensor, lm_sum: torch.Tensor, *, pref_weight: float,
             quality_weight: float, gen_weight: float, beta: float, delta: float, num_pairs: float,
             lm_weight_total: float) -> tuple[torch.Tensor, dict[str, float]]:
    """This microbatch's share of the step loss, and its statistic sums.

    ``num_pairs``: pairs in the global batch; ``lm_weight_total``: the summed LM token weights of
    all chosen responses of the global batch; ``lm_sum``: this microbatch's ``sum(w * ce)``.
    Summing the returned losses over all microbatches (and ranks) gives
    ``pref_weight * mean(DPO) + quality_weight * mean(BCO) + gen_weight * LM``."""
    t = pair_terms(policy, reference, beta, delta)
    lm = lm_sum / lm_weight_total if lm_weight_total > 0 else lm_sum * 0.0
    loss = (pref_weight * t["dpo"].sum() + quality_weight * t["bco"].sum()) / num_pairs + gen_weight * lm
    stats = {k: float(v.detach().sum()) for k, v in t.items()}
    stats["lm"] = float(lm.detach())  # already a share of the step's LM loss
    return loss, stats


def summarize(sums: dict[str, float], num_pairs: float, weights: tuple[float, float, float]) -> dict[str, float]:
    """Metrics of a step from the statistic sums over all its microbatches (``lm`` is summed
    as is, the per-pair statistics are averaged over ``num_pairs``)."""
    n = max(num_pairs, 1.0)
    out = {"mpo/dpo": sums.get("dpo", 0.0) / n, "mpo/bco": sums.get("bco", 0.0) / n, "mpo/lm": sums.get("lm", 0.0)}
    rc, rr = sums.get("reward_chosen", 0.0) / n, sums.get("reward_rejected", 0.0) / n
    out.update({"rewards/chosen": rc, "rewards/rejected": rr, "rewards/accuracy": sums.get("reward_correct", 0.0) / n,
                "rewards/margin": rc - rr, "logps/chosen": sums.get("logp_chosen", 0.0) / n,
                "logps/rejected": sums.get("logp_rejected", 0.0) / n})
    wp, wq, wg = weights
    out["loss"] = wp * out["mpo/dpo"] + wq * out["mpo/bco"] + wg * out["mpo/lm"]
    return out
