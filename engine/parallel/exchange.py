"""The ViT -> LLM exchange of visual embeddings, and of their gradients back.

The ViT runs on its own grid, outside the LLM pipeline. Tiles of a step are numbered
``0 .. T-1`` in the step's sample order. An ``ExchangePlan`` says which ViT data-parallel rank
encodes which tiles (in which order) and which tiles each microbatch of each LLM data-parallel
replica consumes (in packed order); a load balancer supplies its own plan, ``ExchangePlan.naive``
splits the tiles contiguously over the ViT data-parallel ranks.

Routing. A ViT data-parallel rank is a group of ``vit tp*hp`` ranks that all hold the
embeddings of its tiles; the consumers of a replica are the ``llm tp*hp`` ranks of its first
pipeline stage, each of which needs every tile of the replica. Forward: destination ``i`` of a
replica takes a tile from itself when it encoded it, else from member ``i mod (vit tp*hp)``.
Backward: the LLM ranks of a replica hold identical gradients, so ViT member ``j`` takes each
tile's gradient from exactly one of them (itself if it is one, else consumer
``j mod (llm tp*hp)``), so nothing is counted twice. Both directions are one
``all_to_all_single`` over the world with variable split sizes (in tiles); within each pair of
ranks tiles travel in increasing tile number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from engine.parallel.topology import Topology
from engine.data.packing import split_contiguous


@dataclass
class ExchangePlan:
    """``vit[v]``: tiles ViT data-parallel rank ``v`` encodes, in order. ``llm[d][m]``: tiles
    microbatch ``m`` of LLM data-parallel replica ``d`` consumes, in packed order."""

    num_tiles: int
    vit: list[list[int]]
    llm: list[list[list[int]]]

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name, lists in (("vit", self.vit), ("llm", [t for rep in self.llm for t in rep])):
            seen = sorted(t for tiles in lists for t in tiles)
            if seen != list(range(self.num_tiles)):
                missing = sorted(set(range(self.num_tiles)) - set(seen))
                extra = sorted(t for t in set(seen) if seen.count(t) > 1 or not 0 <= t < self.num_tiles)
                raise ValueError(f"exchange plan: {name} side must cover tiles 0..{self.num_tiles - 1} exactly once "
                                 f"(missing {missing[:8]}, repeated or out of range {extra[:8]})")

    @staticmethod
    def sample_tile_ids(sample_tiles: Sequence[int]) -> list[list[int]]:
        """Global tile numbers of each sample."""
        out, start = [], 0
        for n in sample_tiles:
            out.append(list(range(start, start + int(n))))
            start += int(n)
        return out

    @classmethod
    def naive(cls, sample_tiles: Sequence[int], topology: Topology,
              llm_assignment: Sequence[Sequence[Sequence[int]]]) -> "ExchangePlan":
        """``sample_tiles[i]``: tiles of sample ``i``; ``llm_assignment[d][m]``: sample indices of
        microbatch ``m`` of replica ``d`` in packed order. Tiles go contiguously to ViT ranks."""
        ids = cls.sample_tile_ids(sample_tiles)
        total = sum(len(t) for t in ids)
        vit = split_contiguous(range(total), topology.vit.size("dp"))
        llm = [[[t for s in mb for t in ids[s]] for mb in rep] for rep in llm_assignment]
        return cls(total, vit, llm)

    @classmethod
    def from_ranges(cls, sample_tiles: Sequence[int], vit_ranges: Sequence[Sequence[tuple[int, int, int]]],
                    llm_assignment: Sequence[Sequence[Sequence[int]]]) -> "ExchangePlan":
        """A balancer's plan: ``vit_ranges[v]`` lists ``(sample, first tile, end tile)`` ranges
        (``engine.balance.Assignment.vit``); ``llm_assignment`` as in ``naive``."""
        ids = cls.sample_tile_ids(sample_tiles)
        vit = [[ids[s][k] for s, a, b in ranges for k in range(a, b)] for ranges in vit_ranges]
        llm = [[[t for s in mb for t in ids[s]] for mb in rep] for rep in llm_assignment]
        return cls(sum(len(t) for t in ids), vit, llm)


@dataclass
class Route:
    """One direction of the exchange for this rank: rows of the input to send to each world
    rank (concatenated in rank order), and where the rows received from each rank go."""

    send_rows: list[list[int]]
    recv_rows: list[list[int]]
    out_rows: int


def _all_to_all_rows(x: torch.Tensor, route: Route, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    send_counts = [len(r) for r in route.send_rows]
    recv_counts = [len(r) for r in route.recv_rows]
    idx = torch.tensor([i for rows in route.send_rows for i in rows], dtype=torch.long, device=x.device)
    send = x.index_select(0, idx).contiguous()
    recv = x.new_empty((sum(recv_counts),) + tuple(x.shape[1:]))
    dist.all_to_all_single(recv, send, recv_counts, send_counts, group=group)
    out = x.new_zeros((route.out_rows,) + tuple(x.shape[1:]))
    pos = torch.tensor([i for rows in route.recv_rows for i in rows], dtype=torch.long, device=x.device)
    return out.index_copy(0, pos, recv) if pos.numel() else out


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward_route, backward_route, group):
        ctx.route, ctx.group = backward_route, group
        return _all_to_all_rows(x, forward_route, group)

    @staticmethod
    def backward(ctx, g):
        return _all_to_all_rows(g.contiguous(), ctx.route, ctx.group), None, None, None


class VisualExchange:
    """Moves ViT outputs to the LLM ranks that consume them (and their gradients back).
    ``group``: the group spanning both grids (None: the default group, i.e. the world)."""

    def __init__(self, topology: Topology, group: Optional[dist.ProcessGroup] = None):
        self.topo = topology
        self.group = group
        self.sent_bytes = 0  # to other ranks in the last ``forward`` and its backward
        llm, vit = topology.llm, topology.vit
        self.world = llm.world
        self.rank = llm.rank
        # ranks of each ViT data-parallel rank (members ordered by their tp_hp index)
        self.vit_members = [[vit.rank_of(tp=t, hp=h, dp=v) for h in range(vit.size("hp")) for t in range(vit.size("tp"))]
                            for v in range(vit.size("dp"))]
        # first-stage ranks of each LLM replica (ordered by their tp_hp index)
        self.llm_consumers = [[llm.rank_of(tp=t, hp=h, dp=d, pp=0) for h in range(llm.size("hp"))
                               for t in range(llm.size("tp"))] for d in range(llm.size("dp"))]

    # ------------------------------------------------------------------ routing
    def _forward_source(self, v: int, dest: int, dest_index: int) -> int:
        members = self.vit_members[v]
        return dest if dest in members else members[dest_index % len(members)]

    def _backward_source(self, d: int, member: int, member_index: int) -> int:
        consumers = self.llm_consumers[d]
        return member if member in consumers else consumers[member_index % len(consumers)]

    def routes(self, plan: ExchangePlan) -> tuple[Route, Route]:
        """(forward, backward) routes of this rank for ``plan``."""
        if len(plan.vit) != len(self.vit_members) or len(plan.llm) != len(self.llm_consumers):
            raise ValueError(f"exchange plan has {len(plan.vit)} ViT ranks and {len(plan.llm)} LLM replicas; the "
                             f"topology has {len(self.vit_members)} and {len(self.llm_consumers)}")
        encoder = {t: (v, i) for v, tiles in enumerate(plan.vit) for i, t in enumerate(tiles)}
        consumer = {t: (d, i) for d, rep in enumerate(plan.llm) for i, t in enumerate(x for mb in rep for x in mb)}
        W, me = self.world, self.rank
        fwd_send, fwd_recv = [[] for _ in range(W)], [[] for _ in range(W)]
        bwd_send, bwd_recv = [[] for _ in range(W)], [[] for _ in range(W)]
        for t in range(plan.num_tiles):
            v, row_v = encoder[t]
            d, row_d = consumer[t]
            for i, dest in enumerate(self.llm_consumers[d]):
                src = self._forward_source(v, dest, i)
                if src == me:
                    fwd_send[dest].append(row_v)
                if dest == me:
                    fwd_recv[src].append(row_d)
            for j, member in enumerate(self.vit_members[v]):
                src = self._backward_source(d, member, j)
                if src == me:
                    bwd_send[member].append(row_d)
                if member == me:
                    bwd_recv[src].append(row_v)
        n_out = self.num_consumed(plan)
        n_in = self.num_encoded(plan)
        return Route(fwd_send, fwd_recv, n_out), Route(bwd_send, bwd_recv, n_in)

    def vit_rank(self) -> int:
        return self.topo.vit.coord("dp")

    def is_consumer(self) -> bool:
        return self.rank in self.llm_consumers[self.topo.llm.coord("dp")]

    def num_encoded(self, plan: ExchangePlan) -> int:
        return len(plan.vit[self.vit_rank()])

    def num_consumed(self, plan: ExchangePlan) -> int:
        rep = plan.llm[self.topo.llm.coord("dp")]
        return sum(len(mb) for mb in rep) if self.is_consumer() else 0

    def microbatch_rows(self, plan: ExchangePlan) -> list[slice]:
        """Rows of ``forward``'s output per microbatch (empty slices off the first stage)."""
        out, start = [], 0
        for mb in plan.llm[self.topo.llm.coord("dp")]:
            n = len(mb) if self.is_consumer() else 0
            out.append(slice(start, start + n))
            start += n
        return out

    # ------------------------------------------------------------------ data
    def forward(self, local_vit_out: torch.Tensor, plan: ExchangePlan) -> torch.Tensor:
        """``[encoded tiles, tokens, hidden]`` on every rank -> ``[consumed tiles, tokens, hidden]``
        (this replica's microbatches in order on its first-stage ranks, zero rows elsewhere).
        Collective over the world; its backward runs the reverse exchange."""
        n = self.num_encoded(plan)
        if local_vit_out.shape[0] != n:
            raise ValueError(f"ViT rank {self.vit_rank()} encoded {local_vit_out.shape[0]} tiles; the plan gives it {n}")
        fwd, bwd = self.routes(plan)
        row = math.prod(local_vit_out.shape[1:]) * local_vit_out.element_size()
        rows = sum(len(r) for route in (fwd, bwd) for k, r in enumerate(route.send_rows) if k != self.rank)
        self.sent_bytes = row * rows
        return _Exchange.apply(local_vit_out, fwd, bwd, self.group)

    def local_pixels(self, plan: ExchangePlan, sample_pixels: Sequence[Optional[torch.Tensor]],
                     sample_tiles: Optional[Sequence[int]] = None,
                     sample_tile_ids: Optional[Sequence[Optional[Sequence[int]]]] = None) -> torch.Tensor:
        """Pixel tiles this rank's ViT data-parallel rank encodes, in plan order. When a sample's
        pixels hold only some of its tiles, ``sample_tiles`` gives every sample's tile count and
        ``sample_tile_ids[s]`` the tiles ``sample_pixels[s]`` holds (None: all)."""
        if sample_tiles is None:
            sample_tiles = [0 if px is None else px.shape[0] for px in sample_pixels]
        where = [(s, k) for s, n in enumerate(sample_tiles) for k in range(n)]
        tiles = plan.vit[self.vit_rank()]
        if not tiles:
            ref = next((px for px in sample_pixels if px is not None and px.dim() == 4), None)
            shape = (0,) + (tuple(ref.shape[1:]) if ref is not None else (3, 1, 1))
            return torch.zeros(shape)
        rows = []
        for t in tiles:
            s, k = where[t]
            ids = None if sample_tile_ids is None else sample_tile_ids[s]
            if sample_pixels[s] is None or (ids is not None and k not in ids):
                raise RuntimeError(f"tile {k} of sample {s} is to be encoded on this rank but was not loaded here")
            rows.append(sample_pixels[s][k if ids is None else list(ids).index(k)])
        return torch.stack(rows)
