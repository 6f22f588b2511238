"""Pipeline parallelism for the LLM: layer partition, 1F1B and interleaved schedules, their executor.

Virtual stage ``vs = chunk * pp + rank``: with ``vpp`` chunks per rank, rank ``r`` holds virtual
stages ``r, r + pp, r + 2 pp, ...`` (interleaved assignment). A schedule is a per-rank *program* of
``Forward``, ``Backward`` and ``Comm`` instructions, generated without any process group, so its
ordering and its message matching can be checked offline; ``PipelineExecutor`` runs it.

Communication. Each ``Comm`` posts all its sends and receives at once (``batch_isend_irecv``) and
waits for all of them, in lockstep with the neighbours (the ordering of Megatron's schedules).
Every message has a tag unique within the step (direction, receiving virtual stage, microbatch),
so gloo matches each receive to its send even when two messages travel between the same ranks
(``pp = 2`` with virtual stages: activations wrap around to rank 0 while gradients flow back).
Inside a ``Comm`` ops are sorted activations first, so per pair of ranks sends and receives are
posted in the same order (checked offline) for backends that ignore tags. Shapes differ per
microbatch; receivers know them without a handshake since every rank of a pipeline packs the
same microbatches (``StageFunctions.recv_shape``).

Megatron-core's pipeline schedules assume CUDA tensors and its global parallel state, so the
schedules are written here over an explicitly passed pp group. The model side of a stage
(embedding, decoder layers, norm + LM head + loss) is ``engine.parallel.runner.LLMStages``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, Union

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------- partition


def partition_layers(num_layers: int, stages: int, layers_per_stage: Optional[Sequence[int]] = None) -> list[range]:
    """Contiguous layer ranges, one per (virtual) stage in pipeline order. Without
    ``layers_per_stage`` the split is even and the remainder goes one layer each to the first stages."""
    if stages < 1:
        raise ValueError(f"pipeline stages={stages} must be >= 1")
    if layers_per_stage is None:
        counts = [num_layers // stages + (1 if i < num_layers % stages else 0) for i in range(stages)]
    else:
        counts = [int(c) for c in layers_per_stage]
        if len(counts) != stages:
            raise ValueError(f"layers_per_stage={list(layers_per_stage)} has {len(counts)} entries for {stages} stages")
        if sum(counts) != num_layers:
            raise ValueError(f"layers_per_stage={counts} sums to {sum(counts)}, not num_layers={num_layers}")
    if any(c < 1 for c in counts):
        raise ValueError(f"every pipeline stage needs at least one layer: {counts} for {num_layers} layers")
    starts = [sum(counts[:i]) for i in range(stages)]
    return [range(a, a + c) for a, c in zip(starts, counts)]


def rank_layers(num_layers: int, pp: int, vpp: int = 1,
                layers_per_stage: Optional[Sequence[int]] = None) -> list[list[range]]:
    """``[rank][chunk]`` layer range of virtual stage ``chunk * pp + rank``."""
    ranges = partition_layers(num_layers, pp * vpp, layers_per_stage)
    return [[ranges[c * pp + r] for c in range(vpp)] for r in range(pp)]


# ----------------------------------------------------------------------------- programs

FWD, BWD = "fwd", "bwd"


@dataclass(frozen=True)
class Forward:
    chunk: int
    microbatch: int


@dataclass(frozen=True)
class Backward:
    chunk: int
    microbatch: int


@dataclass(frozen=True)
class P2P:
    """One message; ``chunk`` is this rank's chunk that produced (send) or will consume (recv) it."""

    op: str  # send | recv
    kind: str  # fwd (activation) | bwd (gradient)
    peer: int  # pp rank of the other side
    chunk: int
    microbatch: int


@dataclass(frozen=True)
class Comm:
    ops: tuple[P2P, ...]


Instruction = Union[Forward, Backward, Comm]


class _Builder:
    """Emits a program for rank ``s`` of ``P`` with ``V`` chunks; tracks which microbatch each
    chunk receives next (a chunk's forwards and backwards both run in microbatch order)."""

    def __init__(self, P: int, V: int, s: int):
        self.P, self.V, self.s = P, V, s
        self.prog: list[Instruction] = []
        self.next_in, self.next_grad = [0] * V, [0] * V

    def first(self, c: int) -> bool:
        return self.s == 0 and c == 0

    def last(self, c: int) -> bool:
        return self.s == self.P - 1 and c == self.V - 1

    def send_fwd(self, c: int, mb: int) -> list[P2P]:
        return [] if self.last(c) else [P2P("send", FWD, (self.s + 1) % self.P, c, mb)]

    def send_bwd(self, c: int, mb: int) -> list[P2P]:
        return [] if self.first(c) else [P2P("send", BWD, (self.s - 1) % self.P, c, mb)]

    def recv_fwd(self, c: int) -> list[P2P]:
        if self.first(c):
            return []
        self.next_in[c] += 1
        return [P2P("recv", FWD, (self.s - 1) % self.P, c, self.next_in[c] - 1)]

    def recv_bwd(self, c: int) -> list[P2P]:
        if self.last(c):
            return []
        self.next_grad[c] += 1
        return [P2P("recv", BWD, (self.s + 1) % self.P, c, self.next_grad[c] - 1)]

    def comm(self, ops: list[P2P]) -> None:
        if ops:
            self.prog.append(Comm(tuple(sorted(ops, key=lambda o: (o.kind != FWD, o.op, o.peer)))))


def program_1f1b(pp: int, rank: int, microbatches: int) -> list[Instruction]:
    """One-forward-one-backward: ``pp - rank - 1`` warm-up forwards, then alternate, then drain."""
    b = _Builder(pp, 1, rank)
    M = microbatches
    warm = min(pp - rank - 1, M)
    rest = M - warm
    for i in range(warm):
        b.comm(b.recv_fwd(0))
        b.prog.append(Forward(0, i))
        b.comm(b.send_fwd(0, i))
    if rest:
        b.comm(b.recv_fwd(0))
    for i in range(rest):
        f = warm + i
        b.prog.append(Forward(0, f))
        b.comm(b.send_fwd(0, f) + b.recv_bwd(0))
        b.prog.append(Backward(0, i))
        b.comm(b.send_bwd(0, i) + (b.recv_fwd(0) if i < rest - 1 else []))
    for i in range(rest, M):
        b.comm(b.recv_bwd(0))
        b.prog.append(Backward(0, i))
        b.comm(b.send_bwd(0, i))
    return b.prog


def program_interleaved(pp: int, vpp: int, rank: int, microbatches: int) -> list[Instruction]:
    """Interleaved 1F1B over ``vpp`` chunks per rank (Megatron's ordering): virtual microbatch
    ``k`` runs chunk ``(k mod pp*vpp) // pp`` forward (reversed for backward) on microbatch
    ``(k // (pp*vpp)) * pp + k mod pp``. Needs ``microbatches % pp == 0``."""
    P, V, s, M = pp, vpp, rank, microbatches
    if M % P:
        raise ValueError(f"interleaved schedule: microbatches={M} must be a multiple of pp={P}")
    b = _Builder(P, V, s)
    total = M * V

    fchunk = lambda k: (k % (P * V)) // P  # noqa: E731
    bchunk = lambda k: V - 1 - fchunk(k)  # noqa: E731
    mb_of = lambda k: (k // (P * V)) * P + k % P  # noqa: E731

    all_warm = M == P
    warm = total if all_warm else min((P - s - 1) * 2 + (V - 1) * P, total)
    rest = total - warm

    b.comm(b.recv_fwd(0))
    for k in range(warm):
        c = fchunk(k)
        b.prog.append(Forward(c, mb_of(k)))
        nxt = fchunk(k + 1)
        ops = b.send_fwd(c, mb_of(k))
        if k < total - 1 and not (s == 0 and nxt == 0):
            ops += b.recv_fwd(nxt)
        if k == warm - 1 and not all_warm and s != P - 1:
            ops += b.recv_bwd(V - 1)
        b.comm(ops)
    for j in range(rest):
        fk = j + warm
        cf, cb = fchunk(fk), bchunk(j)
        b.prog.append(Forward(cf, mb_of(fk)))
        b.prog.append(Backward(cb, mb_of(j)))
        ops = b.send_fwd(cf, mb_of(fk)) + b.send_bwd(cb, mb_of(j))
        if s == 0:
            nf = fchunk(fk - (P - 1))
            recv_prev, nf = nf != V - 1, nf + 1
        else:
            recv_prev, nf = True, fchunk(fk + 1)
        if s == P - 1:
            nb = bchunk(j - (P - 1))
            recv_next, nb = nb != 0, nb - 1
        else:
            recv_next, nb = True, bchunk(j + 1)
        if recv_prev and j < rest - 1:
            ops += b.recv_fwd(nf)
        if recv_next:
            ops += b.recv_bwd(nb)
        b.comm(ops)
    if all_warm:
        b.comm(b.recv_bwd(V - 1))
    for k in range(rest, total):
        c = bchunk(k)
        b.prog.append(Backward(c, mb_of(k)))
        ops = b.send_bwd(c, mb_of(k))
        nb = bchunk(k + 1)
        if k < total - 1 and not (s == P - 1 and nb == V - 1):
            ops += b.recv_bwd(nb)
        b.comm(ops)
    return b.prog


def build_program(pp: int, vpp: int, rank: int, microbatches: int) -> list[Instruction]:  # 1F1B if vpp == 1
    return program_1f1b(pp, rank, microbatches) if vpp == 1 else program_interleaved(pp, vpp, rank, microbatches)


def message_tag(kind: str, dest_virtual_stage: int, microbatch: int, virtual_stages: int) -> int:
    """Tag unique within a step: (microbatch, receiving virtual stage, direction)."""
    return (microbatch * virtual_stages + dest_virtual_stage) * 2 + (0 if kind == FWD else 1)


# ----------------------------------------------------------------------------- execution


class StageFunctions(Protocol):
    """The model side of this rank: ``forward`` returns the output activation of ``chunk`` (on the
    last virtual stage the scalar to back-propagate); ``recv_shape`` the shape entering ``chunk``."""

    def forward(self, chunk: int, microbatch: int, x: Optional[torch.Tensor]) -> torch.Tensor: ...
    def recv_shape(self, chunk: int, microbatch: int) -> tuple[int, ...]: ...


class PipelineExecutor:
    """Runs a program on this rank over ``group`` (the LLM pp group; None when pp = 1)."""

    def __init__(self, group: Optional[dist.ProcessGroup], pp_ranks: Sequence[int], rank: int, vpp: int,
                 device: torch.device, dtype: torch.dtype = torch.float32):
        self.group, self.pp_ranks, self.pp = group, list(pp_ranks), len(pp_ranks)  # global rank per pp rank
        self.rank, self.vpp, self.device, self.dtype = rank, vpp, device, dtype  # rank: this pp index

    def _vs(self, chunk: int) -> int:
        return chunk * self.pp + self.rank

    def run(self, program: Sequence[Instruction], stages: StageFunctions) -> None:
        """Forward and backward of every microbatch; gradients accumulate into the parameters."""
        last_vs = self.pp * self.vpp - 1
        inbox: dict[tuple[str, int, int], torch.Tensor] = {}  # received, keyed (kind, chunk, microbatch)
        outbox: dict[tuple[str, int, int], torch.Tensor] = {}  # to send
        saved: dict[tuple[int, int], tuple[Optional[torch.Tensor], torch.Tensor]] = {}
        for ins in program:
            if isinstance(ins, Forward):
                key = (ins.chunk, ins.microbatch)
                x = inbox.pop((FWD,) + key).requires_grad_() if self._vs(ins.chunk) > 0 else None
                out = stages.forward(ins.chunk, ins.microbatch, x)
                saved[key] = (x, out)
                if self._vs(ins.chunk) < last_vs:
                    outbox[(FWD,) + key] = out.detach()
            elif isinstance(ins, Backward):
                key = (ins.chunk, ins.microbatch)
                x, out = saved.pop(key)
                g = None if self._vs(ins.chunk) == last_vs else inbox.pop((BWD,) + key).to(out.dtype)
                if out.requires_grad:
                    torch.autograd.backward(out, g)
                if x is not None:
                    outbox[(BWD,) + key] = x.grad if x.grad is not None else torch.zeros_like(x)
            else:
                self._communicate(ins, inbox, outbox, saved, stages)
        if inbox or outbox or saved:
            raise RuntimeError(f"pipeline program left work: in {sorted(inbox)} out {sorted(outbox)} saved {sorted(saved)}")

    def _communicate(self, comm: Comm, inbox, outbox, saved, stages: StageFunctions) -> None:
        ops, received, n_vs = [], [], self.pp * self.vpp
        for m in comm.ops:
            vs = self._vs(m.chunk)
            if m.op == "send":
                t = outbox.pop((m.kind, m.chunk, m.microbatch)).to(self.dtype).contiguous()
                dest = vs + 1 if m.kind == FWD else vs - 1
                ops.append(dist.P2POp(dist.isend, t, self.pp_ranks[m.peer], self.group,
                                      message_tag(m.kind, dest, m.microbatch, n_vs)))
            else:
                fwd = m.kind == FWD
                shape = stages.recv_shape(m.chunk, m.microbatch) if fwd else saved[(m.chunk, m.microbatch)][1].shape
                buf = torch.empty(shape, dtype=self.dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, buf, self.pp_ranks[m.peer], self.group,
                                      message_tag(m.kind, vs, m.microbatch, n_vs)))
                received.append(((m.kind, m.chunk, m.microbatch), buf))
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        for key, buf in received:
            inbox[key] = buf
