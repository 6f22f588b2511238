"""Pipeline schedules (offline and over gloo), ZeRO-1 AdamW, the visual exchange and the global norm."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from engine.parallel.pipeline import (BWD, FWD, Backward, Comm, Forward, PipelineExecutor, build_program,
                                      partition_layers, program_1f1b, program_interleaved, rank_layers)

try:
    from tests.dist_utils import run_distributed
except ImportError:  # pragma: no cover - fallback until the shared helper exists
    run_distributed = None


def spawn(fn, world: int, *args):
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes; re-raise the first failure."""
    if run_distributed is not None:
        return run_distributed(fn, world, *args)
    import os
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(fn, r, world, port, errors, args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    if not errors.empty():
        raise AssertionError(errors.get())
    assert not alive, "distributed test timed out"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    os.environ.pop("MASTER_PORT", None)


def _worker(fn, rank, world, port, errors, args):
    import os
    import traceback

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        fn(rank, world, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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


def _pipeline_worker(rank, world, vpp, M, split):
    net, data = _toy(M=M)
    ref = copy.deepcopy(net)
    W = 7.0
    for x in data:
        h = x
        for layer in ref:
            h = torch.tanh(layer(h))
        (h.pow(2).sum() / W).backward()
    ranges = rank_layers(len(net), world, vpp, split)[rank]
    stages = ToyStages(net, ranges, world, rank, data, W)
    group = dist.new_group(list(range(world)))
    PipelineExecutor(group, list(range(world)), rank, vpp, torch.device("cpu")).run(
        build_program(world, vpp, rank, M), stages)
    owned = {i for r in ranges for i in r}
    for i, (a, b) in enumerate(zip(net, ref)):
        if i in owned:
            torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(a.bias.grad, b.bias.grad, rtol=1e-5, atol=1e-7)
        else:
            assert a.weight.grad is None
    assert len(stages.losses) == (M if rank == world - 1 else 0)


@pytest.mark.parametrize("world, vpp, M, split", [
    (2, 1, 4, [2, 4]),  # 1F1B, uneven split
    (2, 2, 4, [1, 2, 2, 1]),  # interleaved, uneven split
    (3, 1, 5, None),
])
def test_pipeline_gradients_match_single_process(world, vpp, M, split):
    spawn(_pipeline_worker, world, vpp, M, split)
