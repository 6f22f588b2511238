"""Peak device memory of one rank of a pipeline stage, phase by phase, as the engine allocates it.

What the engine keeps (``engine.trainer`` / ``engine.parallel.runner``), by ``train.param_dtype``
(``engine.precision``; ``auto`` is bf16 on a GPU):
- weights: fp32 parameters (4 B each); the forward runs under bf16 autocast, whose cache keeps a
  bf16 copy (2 B) of every weight a linear uses: saved by autograd until backward without
  activation checkpointing (one copy per microbatch in flight), transient with it. bf16
  parameters: 2 B per weight matrix element (norm gains and biases stay fp32) and no copies;
- gradients: fp32 ``.grad`` (4 B per trainable parameter), allocated in backward, freed at the
  next step's ``zero_grad(set_to_none=True)``. bf16 parameters: fp32 main grads (4 B), held from
  set-up on (``zero_grad`` zeroes them);
- optimizer: AdamW ``exp_avg`` + ``exp_avg_sq`` (8 B), plus fp32 masters (4 B) with bf16
  parameters; with ``parallel.zero1`` ZeroAdamW keeps an fp32 master slice and both moments of
  ``ceil(group / dp)`` elements per flattened group (12 B per owned element, dp = the grid's dp x
  hp ranks), and its step materialises the group's flattened gradient (4 B) and the all-gathered
  parameters (4 B, bf16 parameters 2 B) per element of the largest group;
- activations: ``engine.planning.activations``; the ViT encodes all of the rank's tiles of a step
  at once and keeps them until its backward after the LLM pipeline; pipeline stage p keeps the
  microbatches the schedule has in flight (up to pp - p under 1F1B, counted from the program);
- per step: every microbatch's boolean block mask ``[S, S]`` (``shard_batch``), and on the first
  stage the replica's image embeddings and their gradient (bf16).
Phases: ViT forward, LLM pipeline, ViT backward, optimizer step; the peak is the largest, plus a
fixed runtime reserve (CUDA context, cuBLAS workspaces, NCCL buffers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.config import Config
from engine.parallel.pipeline import Backward, Forward, build_program
from engine.planning.activations import (GPU_BACKEND, Backend, LLMDims, bf16_params, llm_checkpoint_bytes,
                                         llm_layer_bytes, llm_tokens, loss_bytes, vit_bytes_per_tile,
                                         vit_checkpoint_bytes_per_tile, vit_layer_bytes_per_tile, vit_matrix_params,
                                         vit_stem_bytes_per_tile, vocab_local)
from engine.planning.shards import StageShards, optimizer_groups

RUNTIME_RESERVE_GIB = 2.5  # CUDA context + cuBLAS workspaces + NCCL communicators (assumed, not measured)
GIB = 2**30


@dataclass(frozen=True)
class Workload:
    """What one step carries. The microbatch is one packed row of ``tokens``; ``visual_share`` of
    its tokens are image tokens (``num_image_token`` per 448px tile); attention spans samples
    of ``span`` tokens (causal)."""

    tokens: int
    visual_share: float
    span: int

    @classmethod
    def of(cls, cfg: Config, visual_share: float | None = None) -> "Workload":
        d = cfg.data
        share = (1.0 - d.lm_ratio) * 0.9 if visual_share is None else visual_share
        if not 0.0 <= share < 1.0:
            raise ValueError(f"visual share {share} must be in [0, 1)")
        return cls(d.max_packed_tokens, share, min(d.max_sample_tokens, d.max_packed_tokens))

    def tiles_per_microbatch(self, cfg: Config) -> float:
        return self.tokens * self.visual_share / cfg.model.num_image_token


@dataclass
class Layout:
    """Group sizes of the two grids."""

    world: int
    llm_dp: int
    vit_dp: int

    @classmethod
    def of(cls, cfg: Config, world: int) -> "Layout":
        L, V = cfg.parallel.llm, cfg.parallel.vit
        return cls(world, world // (L.tp * L.hp * L.pp), world // (V.tp * V.hp))

    def tiles_per_step(self, cfg: Config, work: Workload) -> float:
        return self.llm_dp * cfg.parallel.llm.microbatches * work.tiles_per_microbatch(cfg)

    def vit_tiles(self, cfg: Config, work: Workload) -> int:
        """Tiles one ViT data-parallel rank encodes per step."""
        return math.ceil(self.tiles_per_step(cfg, work) / self.vit_dp)


@dataclass
class StageMemory:
    stage: int
    params: dict[str, int]  # vit, projector, llm: elements held by this rank
    weights: int
    grads: int
    optimizer: int
    activations: dict[str, int]  # llm / vit saved activations at the peak, for checkpointing off and on
    phases: dict[str, int]  # bytes per phase (configured checkpointing), runtime reserve excluded
    breakdown: dict[str, int] = field(default_factory=dict)  # components of the peak phase

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def peak(self) -> int:
        return self.phases[self.peak_phase] + int(RUNTIME_RESERVE_GIB * GIB)


def inflight_peak(program, chunk_bytes: list[int]) -> int:
    """Largest sum of activations held by forwards whose backward has not run yet."""
    held = peak = 0
    for ins in program:
        if isinstance(ins, Forward):
            held += chunk_bytes[ins.chunk]
            peak = max(peak, held)
        elif isinstance(ins, Backward):
            held -= chunk_bytes[ins.chunk]
    return peak


def _llm_chunks(cfg: Config, sh: StageShards, S: int, ckpt: bool, backend: Backend) -> tuple[list[int], int]:
    """Bytes one forward of each chunk keeps until its backward, and the largest transient."""
    L, c = cfg.parallel.llm, cfg.model.llm
    d = LLMDims.of(cfg)
    n, n_s = llm_tokens(cfg, S)
    cast = 0 if bf16_params(cfg, backend) else 2  # bytes of autocast's copy of a weight
    layer, copies = llm_layer_bytes(cfg, S, backend), cast * d.matrix_params()
    saved_loss, loss_transient = loss_bytes(cfg, S, backend)
    head_copy = cast * vocab_local(cfg) * c.hidden_size if L.tp > 1 or not backend.triton_kernels else 0
    out = []
    for chunk, layers in enumerate(sh.layers):
        vs = chunk * L.pp + sh.stage
        b = len(layers) * (llm_checkpoint_bytes(cfg, S) if ckpt else layer + copies)
        if vs == L.pp * L.vpp - 1:
            b += saved_loss + head_copy
        else:
            b += n_s * 4 * c.hidden_size  # the stage output, kept for its backward
        out.append(b)
    transient = layer + copies if ckpt else layer
    if sh.stage == L.pp - 1:
        transient = max(transient, loss_transient)
    return out, transient


def stage_memory(cfg: Config, sh: StageShards, layout: Layout, work: Workload,
                 backend: Backend = GPU_BACKEND) -> StageMemory:
    L, m = cfg.parallel.llm, cfg.model
    ckpt_cfg, freeze = cfg.train.activation_checkpointing, cfg.train.freeze_vit
    P = {"vit": sh.count("vision_model."), "projector": sh.count("projector."), "llm": sh.count("language_model.")}
    vit_train = (0 if freeze else P["vit"]) + P["projector"]
    bf16 = bf16_params(cfg, backend)
    param_bytes, cast = (2, 0) if bf16 else (4, 2)
    weights = sum(t.numel() * (param_bytes if t.ndim >= 2 else 4) for t in sh.params.values())  # gains, biases fp32
    grads_llm, grads_vit = 4 * P["llm"], 4 * vit_train
    if cfg.parallel.zero1:
        dps = {"vit": layout.vit_dp * cfg.parallel.vit.hp, "llm": layout.llm_dp * L.hp}
        groups = optimizer_groups(sh, cfg)
        optimizer = sum(12 * math.ceil(n / dps[g]) for g, n in groups)
        step_transient = (4 + param_bytes) * max(math.ceil(n / dps[g]) * dps[g] for g, n in groups)
    else:
        optimizer, step_transient = (12 if bf16 else 8) * (P["llm"] + vit_train), 0
    held_grads = grads_llm + grads_vit if bf16 else 0  # main grads exist from set-up on
    largest = max(t.numel() for t in sh.params.values())
    bucket = int(cfg.parallel.bucket_mb * 2**20)
    step_transient = max(step_transient, 2 * max(bucket, 4 * largest), 8 * largest)  # dp buckets, fp64 norm

    tiles = layout.vit_tiles(cfg, work)
    S, M = work.tokens, L.microbatches
    vit_copies = cast * ((0 if freeze else P["vit"]) + P["projector"])  # autocast caches casts of trainable weights
    vit_layer = tiles * vit_layer_bytes_per_tile(cfg, backend)
    stem = tiles * vit_stem_bytes_per_tile(cfg) - (tiles * 3 * m.vision.image_size**2 * 2 if freeze else 0)
    tiles_replica = math.ceil(M * work.tiles_per_microbatch(cfg))
    exchange = 2 * tiles_replica * m.num_image_token * m.llm.hidden_size * 2 if sh.stage == 0 else 0
    masks = M * S * S
    program = build_program(L.pp, L.vpp, sh.stage, M)

    def vit_saved(ckpt: bool) -> int:
        if freeze:
            return stem
        per_tile = vit_checkpoint_bytes_per_tile(cfg) if ckpt else vit_bytes_per_tile(cfg, backend)
        return tiles * per_tile + stem

    def llm_peak(ckpt: bool) -> tuple[int, int]:
        chunks, transient = _llm_chunks(cfg, sh, S, ckpt, backend)
        return inflight_peak(program, chunks), transient

    activations = {}
    for ckpt in (False, True):
        key = "checkpointed" if ckpt else "full"
        activations[f"llm_{key}"] = llm_peak(ckpt)[0]
        activations[f"vit_{key}"] = vit_saved(ckpt)
    ckpt = ckpt_cfg
    vsaved = vit_saved(ckpt)
    vheld = 0 if ckpt else vit_copies  # bf16 weight copies saved by the ViT graph until its backward
    inflight, llm_transient = llm_peak(ckpt)
    vit_transient = vit_layer + (cast * vit_matrix_params(cfg) if ckpt else 0)
    parts = {
        "vit_forward": {"weights": weights, "optimizer": optimizer, "grads": held_grads, "vit_activations": vsaved,
                        "weight_copies": vit_copies, "transient": vit_layer},
        "pipeline": {"weights": weights, "optimizer": optimizer, "grads": held_grads or grads_llm,
                     "vit_activations": vsaved,
                     "weight_copies": vheld, "llm_activations": inflight, "exchange": exchange, "masks": masks,
                     "transient": llm_transient},
        "vit_backward": {"weights": weights, "optimizer": optimizer, "grads": grads_llm + grads_vit,
                         "vit_activations": vsaved, "weight_copies": vheld, "exchange": exchange, "masks": masks,
                         "transient": vit_transient},
        "optimizer_step": {"weights": weights, "optimizer": optimizer, "grads": grads_llm + grads_vit,
                           "transient": step_transient},
    }
    phases = {k: sum(v.values()) for k, v in parts.items()}
    mem = StageMemory(sh.stage, P, weights, grads_llm + grads_vit, optimizer, activations, phases)
    mem.breakdown = parts[mem.peak_phase]
    return mem
