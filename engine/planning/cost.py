"""FLOPs, communication bytes per group, and a roofline step time.

Roofline: each microbatch of a stage costs its GEMM and attention FLOPs at the GPU's bf16 peak
(backward 2x the forward for GEMMs, 2.5x for flash attention, one more forward with activation
checkpointing), plus its memory traffic at HBM bandwidth (saved activations written, read and
their gradients written: 3x; fp32 -> bf16 weight casts, bf16 weight reads in backward and fp32
gradient accumulation: 24 B per parameter per microbatch), plus its tp / hp / pp communication
at NVLink or network bandwidth, none of it overlapped (the engine's collectives are blocking).
The pipeline takes ``(M * vpp + pp - 1) / vpp`` microbatch times of its slowest stage; the ViT
runs before (forward) and after (backward) it; the data-parallel gradient sums (fp32) and the
optimizer follow. Peaks are datasheet figures, so the time is a lower bound and the MFU an upper
bound. MFU = model FLOPs (3x forward, no recomputation) / (step time x GPUs x bf16 peak).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.config import Config
from engine.parallel.topology import Grid, build_topology
from engine.planning.activations import (GPU_BACKEND, Backend, LLMDims, bf16_params, llm_layer_bytes, llm_tokens,
                                         vit_layer_bytes_per_tile, vit_matrix_params, vit_tile_tokens, vocab_local)
from engine.planning.hardware import GPU
from engine.planning.memory import Layout, Workload
from engine.parallel.plan import vit_padded_hidden
from engine.planning.shards import StageShards

WEIGHT_TRAFFIC = 24  # bytes per parameter per microbatch (cast, backward reads, fp32 accumulation)


# ----------------------------------------------------------------------------- groups


def group_spans(cfg: Config, world: int, gpus_per_node: int) -> dict[str, bool]:
    """Whether any group of each kind ("llm.tp", "vit.dp_hp", ...) spans more than one node;
    "world" for the world itself. Groups are those of ``build_topology``'s grids."""
    topo = build_topology(cfg, 0, world, create_groups=False)
    spans: dict[str, bool] = {"world": world > gpus_per_node}
    for grid in (topo.llm, topo.vit):
        coords = [Grid(grid.name, r, world, grid.sizes) for r in range(world)]
        for key in grid.group_ranks:
            dims = key.split("_")
            nodes: dict[tuple[int, ...], set[int]] = {}
            for r, g in enumerate(coords):
                fixed = tuple(g.coord(d) for d in grid.sizes if d not in dims)
                nodes.setdefault(fixed, set()).add(r // gpus_per_node)
            spans[f"{grid.name}.{key}"] = any(len(n) > 1 for n in nodes.values())
    return spans


def all_reduce(n_bytes: float, g: int) -> float:
    """Bytes a rank sends in a ring all-reduce over ``g`` ranks."""
    return 2 * (g - 1) / g * n_bytes if g > 1 else 0.0


def gather(n_bytes: float, g: int) -> float:
    """Bytes a rank sends in an all-gather / reduce-scatter / all-to-all of ``n_bytes`` in all."""
    return (g - 1) / g * n_bytes if g > 1 else 0.0


# ----------------------------------------------------------------------------- FLOPs


def llm_layer_flops(cfg: Config, S: int, span: int) -> tuple[float, float]:
    """(GEMM, attention) forward FLOPs of one decoder layer on one rank for ``S`` tokens."""
    d, (n, _) = LLMDims.of(cfg), llm_tokens(cfg, S)
    return 2.0 * n * d.matrix_params(), 4.0 * n * (span / 2) * d.Q


def vit_tile_flops(cfg: Config) -> tuple[float, float, float]:
    """(GEMM per layer, attention per layer, stem) forward FLOPs per tile on one ViT rank."""
    v, m = cfg.model.vision, cfg.model
    P, n, _ = vit_tile_tokens(cfg)
    Cl = vit_padded_hidden(cfg) // cfg.parallel.vit.tp
    stem = 2.0 * v.num_patches * v.hidden_size * 3 * v.patch_size**2
    stem += 2.0 * m.num_image_token * (m.projector_in * m.llm.hidden_size + m.llm.hidden_size**2)
    return 2.0 * n * vit_matrix_params(cfg), 4.0 * n * P * Cl, stem


def model_flops_per_step(cfg: Config, layout: Layout, work: Workload) -> float:
    """Training FLOPs of the whole model for one step: 3x forward (1x for a frozen ViT), no recomputation."""
    m = cfg.model
    c, v = m.llm, m.vision
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    llm_token = 2.0 * (c.num_layers * (2 * c.hidden_size * q + 2 * c.hidden_size * kv + 3 * c.hidden_size
                                       * c.intermediate_size) + c.hidden_size * c.vocab_size)
    llm_token += c.num_layers * 4.0 * (work.span / 2) * q
    T, C = v.num_patches + 1, v.hidden_size
    vit_tile = v.num_layers * (2.0 * T * (4 * C * C + 2 * C * v.intermediate_size) + 4.0 * T * T * C)
    vit_tile += 2.0 * v.num_patches * C * 3 * v.patch_size**2
    proj_tile = 2.0 * m.num_image_token * (m.projector_in * c.hidden_size + c.hidden_size**2)
    tokens = layout.llm_dp * cfg.parallel.llm.microbatches * work.tokens
    tiles = layout.tiles_per_step(cfg, work)
    vit_factor = 1.0 if cfg.train.freeze_vit else 3.0
    return 3.0 * tokens * llm_token + tiles * (vit_factor * vit_tile + 3.0 * proj_tile)


# ----------------------------------------------------------------------------- time


@dataclass
class StepCost:
    """Per-step figures of the slowest ranks."""

    seconds: dict[str, float] = field(default_factory=dict)  # vit, exchange, pipeline, dp, optimizer, step
    comm_bytes: dict[str, float] = field(default_factory=dict)  # per rank per step, by group
    stage_microbatch_s: list[float] = field(default_factory=list)
    bubble: float = 0.0
    model_flops: float = 0.0
    mfu: float = 0.0
    tokens_per_s: float = 0.0


def _link(gpu: GPU, spans: bool) -> float:
    return (gpu.network_gb_s if spans else gpu.nvlink_gb_s) * 1e9


def step_cost(cfg: Config, stages: list[StageShards], layout: Layout, work: Workload, gpu: GPU,
              spans: dict[str, bool], backend: Backend = GPU_BACKEND) -> StepCost:
    """``spans``: ``group_spans`` of the layout (which groups cross nodes)."""
    L, V, m = cfg.parallel.llm, cfg.parallel.vit, cfg.model
    c, v = m.llm, m.vision
    ckpt = cfg.train.activation_checkpointing
    peak, peak32, hbm = gpu.bf16_tflops * 1e12, gpu.fp32_tflops * 1e12, gpu.hbm_tb_s * 1e12
    S, M = work.tokens, L.microbatches
    n, n_s = llm_tokens(cfg, S)
    lsp = L.sp and L.tp > 1
    d = LLMDims.of(cfg)
    kv = d.kv_heads if d.kv_heads % L.hp == 0 else L.hp
    bytes_ = {k: 0.0 for k in ("llm.tp", "llm.hp", "llm.pp", "llm.dp", "vit.tp", "vit.hp", "vit.dp", "exchange")}

    # ---- one decoder layer, one microbatch
    gemm, attn = llm_layer_flops(cfg, S, work.span)
    fwd_factor = 1.0 if ckpt else 0.0
    layer_flops = (3.0 + fwd_factor) * gemm + (3.5 + fwd_factor) * attn
    layer_traffic = (3 + fwd_factor) * llm_layer_bytes(cfg, S, backend) + WEIGHT_TRAFFIC * d.matrix_params()
    X32, X16 = n * c.hidden_size * 4.0, n * c.hidden_size * 2.0
    if lsp:
        tp_fwd, tp_bwd = 2 * gather(X32 + X16, L.tp), 2 * gather(X32 + X16, L.tp)
    else:
        tp_fwd, tp_bwd = 2 * all_reduce(X16, L.tp), 2 * all_reduce(X32, L.tp)
    layer_tp = tp_bwd + (1 + fwd_factor) * tp_fwd
    layer_hp = (2 + fwd_factor) * gather(n * (2 * d.Q + 2 * kv * d.D) * 2.0, L.hp)
    layer_s = (layer_flops / peak + layer_traffic / hbm + layer_tp / _link(gpu, spans["llm.tp"])
               + layer_hp / _link(gpu, spans["llm.hp"]))

    # ---- head and tail
    head_flops = 2.0 * n * c.hidden_size * vocab_local(cfg)
    if L.tp == 1 and backend.triton_kernels:
        loss_s = 3 * head_flops / peak32  # the fused Triton loss runs in fp32 on fp32 weights
    else:
        loss_s = 3 * head_flops / peak
    edge_tp = all_reduce(X32, L.tp) if not lsp else gather(X32, L.tp)  # embedding reduce / head region entry
    pp_msg = n_s * c.hidden_size * 4.0

    stage_s, stage_bytes = [], []
    for sh in stages:
        t, tp_b, hp_b, pp_b = 0.0, 0.0, 0.0, 0.0
        for chunk, layers in enumerate(sh.layers):
            vs = chunk * L.pp + sh.stage
            t += len(layers) * layer_s
            tp_b += len(layers) * layer_tp
            hp_b += len(layers) * layer_hp
            if vs == 0:
                t += edge_tp / _link(gpu, spans["llm.tp"])
                tp_b += edge_tp
            if vs == L.pp * L.vpp - 1:
                t += loss_s + 2 * edge_tp / _link(gpu, spans["llm.tp"])
                tp_b += 2 * edge_tp
            else:
                pp_b += pp_msg  # the activation sent on
            if vs > 0:
                pp_b += pp_msg  # the gradient sent back
        t += pp_b / _link(gpu, spans["llm.pp"])
        stage_s.append(t)
        stage_bytes.append((tp_b, hp_b, pp_b))
    slowest = max(range(len(stages)), key=lambda i: stage_s[i])
    bytes_["llm.tp"], bytes_["llm.hp"], bytes_["llm.pp"] = (b * M for b in stage_bytes[slowest])
    pipeline_s = (M + (L.pp - 1) / L.vpp) * stage_s[slowest]
    bubble = (L.pp - 1) / (M * L.vpp + L.pp - 1)

    # ---- ViT
    tiles = layout.vit_tiles(cfg, work)
    vg, va, vstem = vit_tile_flops(cfg)
    _, vn, _ = vit_tile_tokens(cfg)
    vit_train = not cfg.train.freeze_vit
    vf = (3.0 + fwd_factor) if vit_train else 1.0
    vfa = (3.5 + fwd_factor) if vit_train else 1.0
    vit_flops = tiles * (v.num_layers * (vf * vg + vfa * va) + 3.0 * vstem)
    vit_traffic = tiles * v.num_layers * (3 + fwd_factor) * vit_layer_bytes_per_tile(cfg, backend)
    vit_traffic += WEIGHT_TRAFFIC * v.num_layers * vit_matrix_params(cfg)
    Y32, Y16 = vn * v.hidden_size * 4.0, vn * v.hidden_size * 2.0
    vsp = V.sp and V.tp > 1
    forwards = 1 + fwd_factor if vit_train else 1  # a frozen ViT runs forward once, no backward
    if vsp:  # per forward: 2 all-gathers (fp32 norm outputs) + 2 reduce-scatters (bf16); backward the same
        vtp_layer = (forwards + (1 if vit_train else 0)) * 2 * gather(Y32 + Y16, V.tp)
    else:  # per forward: 2 all-reduces (bf16 row-parallel outputs); backward: 2 (fp32 norm-output gradients)
        vtp_layer = forwards * 2 * all_reduce(Y16, V.tp) + (2 * all_reduce(Y32, V.tp) if vit_train else 0)
    Cl = vit_padded_hidden(cfg) // V.tp
    vhp_layer = (forwards + (1 if vit_train else 0)) * gather(vn * 4 * Cl * 2.0, V.hp)  # q, k, v, out
    bytes_["vit.tp"] = tiles * v.num_layers * vtp_layer
    bytes_["vit.hp"] = tiles * v.num_layers * vhp_layer
    vit_s = (vit_flops / peak + vit_traffic / hbm + bytes_["vit.tp"] / _link(gpu, spans["vit.tp"])
             + bytes_["vit.hp"] / _link(gpu, spans["vit.hp"]))

    # ---- ViT -> LLM exchange (bf16 embeddings), forward and backward
    E = m.num_image_token * c.hidden_size * 2.0
    tiles_replica = M * work.tiles_per_microbatch(cfg)
    # every consumer (llm tp x hp ranks of a replica's first stage) needs all the replica's tiles; the
    # vit tp x hp members of a ViT rank hold the same tiles and share the sending
    send = tiles * E * math.ceil(L.tp * L.hp / (V.tp * V.hp))
    recv = tiles_replica * E
    bytes_["exchange"] = 2 * max(send, recv)
    exchange_s = bytes_["exchange"] / _link(gpu, spans["world"])

    # ---- data parallelism and the optimizer
    first, biggest = stages[0], max(stages, key=lambda s: s.count("language_model."))
    llm_params = biggest.count("language_model.")
    vit_params = (first.count("vision_model.") if vit_train else 0) + first.count("projector.")
    llm_dp, vit_dp = layout.llm_dp * L.hp, layout.vit_dp * V.hp
    bytes_["llm.dp"] = all_reduce(4.0 * llm_params, llm_dp)
    bytes_["vit.dp"] = all_reduce(4.0 * vit_params, vit_dp)
    if cfg.parallel.zero1:  # the updated slices are all-gathered in the parameters' dtype
        param_bytes = 2.0 if bf16_params(cfg, backend) else 4.0
        bytes_["llm.dp"] += gather(param_bytes * llm_params, llm_dp)
        bytes_["vit.dp"] += gather(param_bytes * vit_params, vit_dp)
        opt_traffic = 28.0 * (llm_params + vit_params) + 32.0 * (llm_params / llm_dp + vit_params / vit_dp)
    else:
        opt_traffic = 28.0 * (llm_params + vit_params)
    dp_s = (bytes_["llm.dp"] / _link(gpu, spans["llm.dp_hp"]) + bytes_["vit.dp"] / _link(gpu, spans["vit.dp_hp"]))
    opt_s = opt_traffic / hbm

    step = vit_s + exchange_s + pipeline_s + dp_s + opt_s
    flops = model_flops_per_step(cfg, layout, work)
    return StepCost(
        seconds={"vit": vit_s, "exchange": exchange_s, "pipeline": pipeline_s, "dp": dp_s, "optimizer": opt_s,
                 "step": step},
        comm_bytes=bytes_, stage_microbatch_s=stage_s, bubble=bubble, model_flops=flops,
        mfu=flops / (step * layout.world * peak),
        tokens_per_s=layout.llm_dp * M * S / step)

