"""Pipeline schedules (offline and over gloo), ZeRO-1 AdamW, the visual exchange and the global norm."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from dist_utils import run_distributed, run_jobs
from engine.parallel.pipeline import (BWD, FWD, Comm, Forward, PipelineExecutor, build_program,
                                      partition_layers, program_1f1b, program_interleaved, rank_layers)


# ----------------------------------------------------------------------------- partition


def test_partition_even_and_remainder():
    assert partition_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert partition_layers(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert partition_layers(5, 2, [1, 4]) == [range(0, 1), range(1, 5)]


def test_partition_interleaved_assignment():
    # virtual stage vs = chunk * pp + rank: rank 0 holds stages 0 and 2
    assert rank_layers(8, 2, 2) == [[range(0, 2), range(4, 6)], [range(2, 4), range(6, 8)]]
    assert rank_layers(6, 2, 2, [1, 2, 2, 1]) == [[range(0, 1), range(3, 5)], [range(1, 3), range(5, 6)]]


@pytest.mark.parametrize("layers, stages, split, message", [
    (3, 4, None, "at least one layer"),
    (6, 2, [2, 2], "sums to 4"),
    (6, 3, [3, 3], "2 entries for 3 stages"),
])
def test_partition_errors(layers, stages, split, message):
    with pytest.raises(ValueError, match=message):
        partition_layers(layers, stages, split)


# ----------------------------------------------------------------------------- orderings


def compute_order(prog) -> str:
    return " ".join(("F" if isinstance(i, Forward) else "B") + f"{i.chunk}.{i.microbatch}"
                    for i in prog if not isinstance(i, Comm))


def test_1f1b_ordering():
    assert compute_order(program_1f1b(4, 0, 6)) == "F0.0 F0.1 F0.2 F0.3 B0.0 F0.4 B0.1 F0.5 B0.2 B0.3 B0.4 B0.5"
    assert compute_order(program_1f1b(4, 2, 6)) == "F0.0 F0.1 B0.0 F0.2 B0.1 F0.3 B0.2 F0.4 B0.3 F0.5 B0.4 B0.5"
    assert compute_order(program_1f1b(4, 3, 3)) == "F0.0 B0.0 F0.1 B0.1 F0.2 B0.2"
    # fewer microbatches than stages: all forwards first
    assert compute_order(program_1f1b(4, 0, 2)) == "F0.0 F0.1 B0.0 B0.1"


def test_interleaved_ordering():
    # Megatron's interleaved order for pp=2, vpp=2, 4 microbatches
    assert compute_order(program_interleaved(2, 2, 0, 4)) == (
        "F0.0 F0.1 F1.0 F1.1 F0.2 B1.0 F0.3 B1.1 F1.2 B0.0 F1.3 B0.1 B1.2 B1.3 B0.2 B0.3")
    assert compute_order(program_interleaved(2, 2, 1, 4)) == (
        "F0.0 F0.1 F1.0 B1.0 F1.1 B1.1 F0.2 B0.0 F0.3 B0.1 F1.2 B1.2 F1.3 B1.3 B0.2 B0.3")
    with pytest.raises(ValueError, match="multiple of pp"):
        program_interleaved(2, 2, 0, 3)


def _message(P: int, rank: int, op) -> tuple:
    vs = op.chunk * P + rank
    dest = (vs + 1 if op.kind == FWD else vs - 1) if op.op == "send" else vs
    return op.kind, dest, op.microbatch


def simulate(P: int, V: int, M: int) -> None:
    """Run every rank's program against the others with batched p2p semantics (a Comm completes
    once each of its sends and receives is matched by the peer's posted op). Checks: no deadlock,
    each (stage, microbatch) runs forward then backward once with its input present, no message
    is left over, and per pair of ranks sends and receives are posted in the same order."""
    progs = [build_program(P, V, r, M) for r in range(P)]
    pc, pending, unmatched = [0] * P, {}, {"send": {}, "recv": {}}
    have, done_f, done_b, order = set(), set(), set(), {}
    while any(pc[r] < len(progs[r]) for r in range(P)):
        progress = False
        for r in range(P):
            while pc[r] < len(progs[r]):
                ins = progs[r][pc[r]]
                vs = getattr(ins, "chunk", 0) * P + r
                if isinstance(ins, Comm):
                    if r not in pending:
                        pending[r] = []
                        for o in ins.ops:
                            key = _message(P, r, o)
                            entry = [o.op, key, False]
                            pending[r].append(entry)
                            pair = (r, o.peer) if o.op == "send" else (o.peer, r)
                            order.setdefault((o.op, pair), []).append(key)
                            other = unmatched["recv" if o.op == "send" else "send"]
                            if key in other:
                                other.pop(key)[2] = entry[2] = True
                            else:
                                assert key not in unmatched[o.op], f"duplicate message {key}"
                                unmatched[o.op][key] = entry
                    if not all(e[2] for e in pending[r]):
                        break
                    have.update(e[1] for e in pending.pop(r) if e[0] == "recv")
                elif isinstance(ins, Forward):
                    assert vs == 0 or (FWD, vs, ins.microbatch) in have, (r, ins)
                    assert (vs, ins.microbatch) not in done_f
                    done_f.add((vs, ins.microbatch))
                else:
                    assert (vs, ins.microbatch) in done_f, (r, ins)
                    assert vs == P * V - 1 or (BWD, vs, ins.microbatch) in have, (r, ins)
                    done_b.add((vs, ins.microbatch))
                pc[r] += 1
                progress = True
        assert progress, f"deadlock pp={P} vpp={V} microbatches={M} at {pc}"
    assert len(done_f) == len(done_b) == P * V * M
    assert not unmatched["send"] and not unmatched["recv"]
    for (op, pair), keys in order.items():
        assert keys == order.get(("recv" if op == "send" else "send", pair)), f"order differs for {pair}"


@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_programs_match_and_never_deadlock(P):
    for V in (1, 2, 3):
        if V > 1 and P == 1:
            continue
        for M in range(1 if V == 1 else P, 4 * P + 1):
            if V > 1 and M % P:
                continue
            simulate(P, V, M)


# ----------------------------------------------------------------------------- gloo pipeline


class ToyStages:
    """Chain of linears split into virtual stages; microbatch m has ``2 + m % 3`` rows (shapes
    differ per microbatch). Loss per microbatch: sum(out^2) / W."""

    def __init__(self, layers: nn.ModuleList, ranges, pp: int, rank: int, data, W: float):
        self.layers, self.ranges, self.pp, self.rank, self.data, self.W = layers, ranges, pp, rank, data, W
        self.losses = []

    def forward(self, chunk, mb, x):
        vs = chunk * self.pp + self.rank
        h = self.data[mb] if x is None else x
        for i in self.ranges[chunk]:
            h = torch.tanh(self.layers[i](h))
        if vs == len(self.ranges) * self.pp - 1:
            loss = h.pow(2).sum()
            self.losses.append(float(loss))
            return loss / self.W
        return h

    def recv_shape(self, chunk, mb):
        return tuple(self.data[mb].shape)


def _toy(layers=6, width=5, M=4):
    torch.manual_seed(0)
    net = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
    data = [torch.randn(2 + m % 3, width) for m in range(M)]
    return net, data



def _pipeline(rank: int, world: int, vpp: int, M: int, split) -> float:
    """Largest relative gradient difference of this rank's layers against one process."""
    net, data = _toy(layers=8, M=M)
    ref = copy.deepcopy(net)
    W = 7.0
    for x in data:
        h = x
        for layer in ref:
            h = torch.tanh(layer(h))
        (h.pow(2).sum() / W).backward()
    ranges = rank_layers(len(net), world, vpp, split)[rank]
    stages = ToyStages(net, ranges, world, rank, data, W)
    PipelineExecutor(dist.group.WORLD, list(range(world)), rank, vpp, torch.device("cpu")).run(
        build_program(world, vpp, rank, M), stages)
    assert len(stages.losses) == (M if rank == world - 1 else 0)
    owned = {i for r in ranges for i in r}
    worst = 0.0
    for i, (a, b) in enumerate(zip(net, ref)):
        for pa, pb in ((a.weight, b.weight), (a.bias, b.bias)):
            if i not in owned:
                assert pa.grad is None, f"layer {i} is not on rank {rank} but got a gradient"
                continue
            worst = max(worst, ((pa.grad - pb.grad).abs().max() / pb.grad.abs().max()).item())
    return worst


def _toy_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def _toy_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).pow(2).sum() / 10.0


def _zero1(rank: int, world: int) -> dict:
    """ZeRO-1 over the world vs plain AdamW on one process, with LambdaLR, clipping and a
    state_dict round trip in the middle."""
    from engine.config import TrainConfig
    from engine.optim import build_optimizer
    from engine.optim import clip_grad_norm
    from engine.parallel.data_parallel import GradReducer, build_zero_optimizer

    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.99, eps=1e-8)
    ref, par = _toy_model(), _toy_model()
    ref_opt = build_optimizer(ref.named_parameters(), cfg, torch.device("cpu"))
    opt = build_zero_optimizer([(par.named_parameters(), dist.group.WORLD)], cfg)
    factor = lambda s: 1.0 / (s + 1)  # noqa: E731
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, factor)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    reducer = GradReducer(par.parameters(), dist.group.WORLD, bucket_mb=1e-4)  # tiny buckets: several of them
    g = torch.Generator().manual_seed(2)
    out = {"buckets": len(reducer.buckets), "norm_rel": 0.0, "param_err": 0.0}
    for step in range(4):
        xs = [torch.randn(3, 6, generator=g) for _ in range(world)]
        ref_opt.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
        sum(_toy_loss(ref, x) for x in xs).backward()
        _toy_loss(par, xs[rank]).backward()
        reducer.reduce()
        want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5).item()
        got = clip_grad_norm(list(par.parameters()), 0.5, list(par.parameters()) if rank == 0 else [], dist.group.WORLD)
        out["norm_rel"] = max(out["norm_rel"], abs(got - want) / want)
        ref_opt.step()
        opt.step()
        ref_sched.step()
        sched.step()
        if step == 1:  # a fresh optimizer resumes from this rank's shard
            state = copy.deepcopy(opt.state_dict())
            opt = build_zero_optimizer([(par.named_parameters(), dist.group.WORLD)], cfg)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            opt.load_state_dict(state)
            sched.load_state_dict(ref_sched.state_dict())
        err = max((a - b).abs().max().item() for a, b in zip(par.parameters(), ref.parameters()))
        out["param_err"] = max(out["param_err"], err)
    out["lrs"] = ([grp["lr"] for grp in opt.param_groups], [grp["lr"] for grp in ref_opt.param_groups])
    total = sum(p.numel() for p in par.parameters())
    out["state_numel"] = sum(s["exp_avg"].numel() for s in opt.state.values())
    out["total_numel"] = total
    return out


def _exchange(rank: int, world: int, parallel: dict, assignment) -> dict:
    """Tile t encodes to f(t); consumers must receive f(t) in plan order, and the ViT must get
    back each tile's gradient (t + 1) exactly once though every consumer holds a copy."""
    from engine.config import config_from_dict
    from engine.parallel.exchange import ExchangePlan, VisualExchange
    from engine.parallel.topology import build_topology

    cfg = config_from_dict({"parallel": parallel, "train": {"global_batch": 8}})
    topo = build_topology(cfg, rank, world)
    tiles = [2, 0, 3, 1, 1, 2]
    plan = ExchangePlan.naive(tiles, topo, assignment)
    ex = VisualExchange(topo)
    f = lambda t: t + 0.01 * torch.arange(6.0).view(2, 3)  # noqa: E731
    mine = plan.vit[topo.vit.coord("dp")]
    x = torch.stack([f(t) for t in mine]) if mine else torch.zeros(0, 2, 3)
    x.requires_grad_()
    y = ex.forward(x, plan)
    order = [t for mb in plan.llm[topo.llm.coord("dp")] for t in mb] if ex.is_consumer() else []
    want = torch.stack([f(t) for t in order]) if order else torch.zeros(0, 2, 3)
    grad = torch.stack([torch.full((2, 3), t + 1.0) for t in order]) if order else torch.zeros(0, 2, 3)
    y.backward(grad)
    want_grad = torch.stack([torch.full((2, 3), t + 1.0) for t in mine]) if mine else torch.zeros(0, 2, 3)
    pixels = ex.local_pixels(plan, [torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) + 10 * s if n else None
                                    for s, n in enumerate(tiles)])
    ids = ExchangePlan.sample_tile_ids(tiles)
    want_pixels = [10 * s + k for t in mine for s, ts in enumerate(ids) for k, u in enumerate(ts) if u == t]
    return {"forward": y.shape == want.shape and bool(torch.equal(y, want)),
            "backward": bool(torch.equal(x.grad, want_grad)), "consumer": ex.is_consumer(),
            "pixels": pixels.flatten().tolist() == want_pixels,
            "rows": [(r.start, r.stop) for r in ex.microbatch_rows(plan)]}




@pytest.fixture(scope="module")
def world2():
    return run_distributed(run_jobs, 2, {
        "1f1b_uneven": (_pipeline, (1, 4, [3, 5])),
        "interleaved_uneven": (_pipeline, (2, 4, [1, 3, 2, 2])),
        "zero1": (_zero1, ()),
    }, timeout=240)


@pytest.fixture(scope="module")
def world4():
    return run_distributed(run_jobs, 4, {
        "1f1b_more_microbatches": (_pipeline, (1, 6, None)),
        "interleaved": (_pipeline, (2, 8, None)),
        "exchange_tp_pp": (_exchange, ({"llm": {"tp": 2, "pp": 2, "microbatches": 2}, "vit": {"tp": 2}},
                                       [[[1, 0, 2], [5, 3, 4]]])),
        "exchange_dp": (_exchange, ({"llm": {"pp": 2, "microbatches": 2}}, [[[2, 0], [1]], [[4, 3], [5]]])),
    }, timeout=240)


def _results(ranks: list[dict], name: str) -> list:
    res = [r[name] for r in ranks]
    for i, r in enumerate(res):
        assert not (isinstance(r, dict) and "error" in r), f"rank {i}: {r['error']}"
    return res


@pytest.mark.parametrize("name", ["1f1b_uneven", "interleaved_uneven"])
def test_pipeline_gradients_world2(world2, name):
    for worst in _results(world2, name):
        assert worst <= 1e-5, f"{name}: gradients differ from one process by {worst:.2e} (rel.)"


@pytest.mark.parametrize("name", ["1f1b_more_microbatches", "interleaved"])
def test_pipeline_gradients_world4(world4, name):
    for worst in _results(world4, name):
        assert worst <= 1e-5, f"{name}: gradients differ from one process by {worst:.2e} (rel.)"


def test_zero1_matches_adamw(world2):
    for r in _results(world2, "zero1"):
        assert r["buckets"] > 1
        assert r["param_err"] <= 1e-6, f"ZeRO-1 parameters differ from AdamW by {r['param_err']:.2e}"
        assert r["norm_rel"] <= 1e-6, f"global norm differs by {r['norm_rel']:.2e} (rel.)"
        assert r["lrs"][0][0] == r["lrs"][1][0] and r["lrs"][0][0] < 1e-2, "LambdaLR must drive the shards' lr"
        # state for this rank's slices only: about half of the parameters (padding included)
        assert r["total_numel"] // 2 <= r["state_numel"] <= r["total_numel"] // 2 + 2


@pytest.mark.parametrize("name", ["exchange_tp_pp", "exchange_dp"])
def test_exchange_routes_embeddings_and_gradients(world4, name):
    res = _results(world4, name)
    for i, r in enumerate(res):
        assert r["forward"], f"rank {i}: embeddings arrive wrong"
        assert r["backward"], f"rank {i}: gradients of the encoded tiles are wrong (missing or counted twice)"
        assert r["pixels"], f"rank {i}: local pixel tiles are not the plan's"
    # consumers: the first pipeline stage, ranks 0 and 1 in both layouts (tp pair / one per replica)
    assert [i for i, r in enumerate(res) if r["consumer"]] == [0, 1]
    # rows per microbatch on rank 0: samples [1, 0, 2] hold 5 tiles, [5, 3, 4] 4; [2, 0] 5, [1] none
    assert res[0]["rows"] == ([(0, 5), (5, 9)] if name == "exchange_tp_pp" else [(0, 5), (5, 5)])
    assert all(r["rows"] == [(0, 0), (0, 0)] for r in res[2:])


def test_exchange_plan_validation():
    from engine.parallel.exchange import ExchangePlan

    with pytest.raises(ValueError, match="vit side must cover tiles 0..2 exactly once"):
        ExchangePlan(3, [[0, 1], [1]], [[[0, 1, 2]]])
    with pytest.raises(ValueError, match=r"llm side .*missing \[2\]"):
        ExchangePlan(3, [[0, 1, 2]], [[[0, 1]]])
    # a balancer's tile ranges: sample 1 (tiles 2..4) split over two ViT ranks, sample 0 after
    plan = ExchangePlan.from_ranges([2, 3], [[(1, 0, 2)], [(1, 2, 3), (0, 0, 2)]], [[[1], [0]]])
    assert plan.vit == [[2, 3], [4, 0, 1]] and plan.llm == [[[2, 3, 4], [0, 1]]]
