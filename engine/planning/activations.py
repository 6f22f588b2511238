"""Bytes that autograd keeps per layer: formulas read off the engine's layers under bf16 autocast.

What the engine's code saves (fp32 parameters, ``torch.autocast(bf16)``): the residual stream and
the norms run in fp32; every linear saves its own bf16 cast of its input (q, k and v cast the
same norm output three times) and a bf16 copy of its weight (the autocast cache); attention
saves q, k, v, its output and the fp32 log-sum-exp. Per token of one layer, with H the LLM
hidden size, Q/K the local query/kv widths, F the local FFN width, n_h the local heads, D the
head dim and ``n_s`` the tokens of the residual region (``n / tp`` with sequence parallelism):

  LLM:        n_s (16H + 8) + n (10H + 4Q + 4K + 4 n_h + 8F + r)     (flash-attn; r = 4D with the
              PyTorch rotary, 0 with the Triton one; SDPA expands kv heads: 4K -> 4Q)
  ViT 300M:   n_s (12C + 16) + n (8C + 8C_l + 4 n_h + 4F_l)
  ViT 6B:     n_s (20C + 8)  + n (8C + 20C_l + 8 + 4 n_h + 4F_l)      (qk-norm over the full width)

With head parallelism the attention output saved by the core and the projection's input are
two tensors (+2Q, +2C_l); with ViT tp the row-parallel proj and fc2 add their bias in fp32 after
the reduce, so the layer scales save fp32 outputs (+4C); padded ViT tiles on the SDPA path keep
their mask as a bf16 bias (2P^2 per tile); the first ViT layer sees the bf16 embedding
(``vit_bytes_per_tile``).

``tests/test_plan.py`` checks these against the bytes actually saved by the engine's layers.
With activation checkpointing a layer keeps only its input (fp32 ``n_s * 4H``, bf16 for the first
ViT layer) and recomputes one layer at a time in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import Config


@dataclass(frozen=True)
class Backend:
    """Which implementation runs; the planner assumes the GPU defaults."""

    flash_attention: bool = True  # flash-attn varlen kernel for bf16 queries (else SDPA)
    triton_kernels: bool = True  # Triton rotary and fused LM-head loss (kernels=auto on a GPU)
    layer_norm_fp32: bool = True  # CUDA autocast runs LayerNorm in fp32; CPU autocast keeps a bf16 input bf16
    gpu: bool = True  # resolves ``auto`` settings (``train.param_dtype``: bf16 on a GPU, fp32 on a CPU)


GPU_BACKEND = Backend()
CPU_BACKEND = Backend(flash_attention=False, triton_kernels=False, layer_norm_fp32=False, gpu=False)


def bf16_params(cfg, backend: Backend) -> bool:
    """Whether parameters are stored in bf16 (``train.param_dtype``, ``auto`` resolved for ``backend``)."""
    p = cfg.train.param_dtype
    return p == "bfloat16" or (p == "auto" and backend.gpu)


# ----------------------------------------------------------------------------- LLM


@dataclass(frozen=True)
class LLMDims:
    """Local (per tp rank) widths of one decoder layer."""

    H: int
    D: int
    heads: int  # query heads per tp rank
    kv_heads: int  # kv heads per tp rank (replicated when kv < tp)
    F: int

    @classmethod
    def of(cls, cfg: Config) -> "LLMDims":
        c, tp = cfg.model.llm, cfg.parallel.llm.tp
        return cls(c.hidden_size, c.head_dim, c.num_heads // tp, max(c.num_kv_heads // tp, 1),
                   c.intermediate_size // tp)

    @property
    def Q(self) -> int:
        return self.heads * self.D

    def matrix_params(self) -> int:
        """Elements of the layer's weight matrices on one tp rank (the autocast copies)."""
        return 2 * self.H * self.Q + 2 * self.H * self.kv_heads * self.D + 3 * self.H * self.F


def llm_tokens(cfg: Config, S: int) -> tuple[int, int]:
    """(n, n_s): tokens per rank in the tensor-parallel region and in the residual region."""
    L = cfg.parallel.llm
    n = S // L.hp
    return n, (n // L.tp if L.sp and L.tp > 1 else n)


def llm_layer_bytes(cfg: Config, S: int, backend: Backend = GPU_BACKEND) -> int:
    """Saved activations of one decoder layer for a microbatch of ``S`` tokens, on one rank."""
    d, hp = LLMDims.of(cfg), cfg.parallel.llm.hp
    n, n_s = llm_tokens(cfg, S)
    kv = d.kv_heads if d.kv_heads % hp == 0 else hp  # Ulysses repeats kv heads up to hp
    attn = 4 * d.Q + 4 * kv * d.D + 4 * d.heads  # every backend attends grouped heads to their k/v unrepeated
    if hp > 1:
        attn += 2 * d.Q  # the output's all-to-all back makes o_proj save a copy of its own
    rotary = 0 if backend.triton_kernels else 4 * d.D
    return n_s * (16 * d.H + 8) + n * (10 * d.H + attn + 8 * d.F + rotary)


def llm_checkpoint_bytes(cfg: Config, S: int) -> int:
    """What a checkpointed decoder layer keeps: its fp32 input."""
    return llm_tokens(cfg, S)[1] * 4 * cfg.model.llm.hidden_size


def vocab_local(cfg: Config) -> int:
    tp = cfg.parallel.llm.tp
    return -(-cfg.model.llm.vocab_size // tp)


def loss_bytes(cfg: Config, S: int, backend: Backend = GPU_BACKEND) -> tuple[int, int]:
    """(saved, transient) of the final norm + LM head + loss for one microbatch, weight copy aside.
    tp > 1: vocab-parallel cross entropy keeps the fp32 softmax ``[n, V/tp]``; tp = 1 with the
    Triton kernel: the fused loss runs in fp32 and keeps the gradients of the hidden states and
    of the whole LM head (formed in forward), with one ``[chunk, V]`` logits buffer."""
    H, V = cfg.model.llm.hidden_size, cfg.model.llm.vocab_size
    n, n_s = llm_tokens(cfg, S)
    norm = n_s * (8 * H + 4)
    if cfg.parallel.llm.tp > 1 or not backend.triton_kernels:
        Vl = vocab_local(cfg)
        return norm + n * (2 * H + 4 * Vl), n * 6 * Vl
    chunk = max(1024, 2 * (1 << max(0, -(-n * H // V) - 1).bit_length()))
    return norm + n * 4 * H + 4 * V * H, 4 * min(chunk, n) * V


# ----------------------------------------------------------------------------- ViT


def vit_tile_tokens(cfg: Config) -> tuple[int, int, int]:
    """(P, n, n_s): a tile's tokens padded to the split multiple, and the tokens per tile on one
    rank in the tp region and in the residual region."""
    v, V = cfg.model.vision, cfg.parallel.vit
    sp = V.sp and V.tp > 1
    m = V.hp * (V.tp if sp else 1)
    T = v.num_patches + 1
    P = -(-T // m) * m
    return P, P // V.hp, P // m


def vit_layer_bytes_per_tile(cfg: Config, backend: Backend = GPU_BACKEND) -> int:
    """Saved activations of one ViT layer per tile, on one rank."""
    v, V = cfg.model.vision, cfg.parallel.vit
    from engine.parallel.plan import vit_padded_hidden

    C, Cl = v.hidden_size, vit_padded_hidden(cfg) // V.tp
    heads, Fl = vit_padded_hidden(cfg) // v.head_dim // V.tp, v.intermediate_size // V.tp
    P, n, n_s = vit_tile_tokens(cfg)
    core = 8 * Cl + 4 * heads + 4 * Fl + 8 * C
    if v.norm_type == "rms_norm":
        residual = 20 * C + 8
    else:
        residual = 12 * C + 16
    if V.tp > 1:
        residual += 4 * C  # row-parallel proj / fc2 add their fp32 bias after the reduce: ls1, ls2 save fp32
    if v.qk_normalization:
        core += 12 * Cl + 8
    if V.hp > 1:
        core += 2 * Cl  # the output's all-to-all back makes proj save a copy of its own
    mask = 0
    padded = P > v.num_patches + 1
    sdpa = v.qk_normalization or not backend.flash_attention  # fp32 queries after qk-norm never take flash-attn
    if padded and sdpa:
        mask = 2 * P * P  # the padding segments' mask, kept by SDPA as a bf16 bias
    return n_s * residual + n * core + mask


def vit_bytes_per_tile(cfg: Config, backend: Backend = GPU_BACKEND) -> int:
    """Saved activations of all ViT layers per tile. The first layer's input is the bf16 embedding:
    RMSNorm returns its input's dtype, so its normalised copy is bf16 (2C, not 4C); where LayerNorm
    keeps bf16 (CPU autocast) it saves that input as is (2C, not 4C) and its bf16 output is the one
    input q, k and v all save (2C, not 6C)."""
    v = cfg.model.vision
    total = v.num_layers * vit_layer_bytes_per_tile(cfg, backend)
    _, n, n_s = vit_tile_tokens(cfg)
    if v.norm_type == "rms_norm":
        total -= n_s * 2 * v.hidden_size
    elif not backend.layer_norm_fp32:
        total -= n_s * 2 * v.hidden_size + n * 4 * v.hidden_size
    return total


def vit_matrix_params(cfg: Config) -> int:
    v, V = cfg.model.vision, cfg.parallel.vit
    from engine.parallel.plan import vit_padded_hidden

    C, Cl = v.hidden_size, vit_padded_hidden(cfg) // V.tp
    return 4 * C * Cl + 2 * C * (v.intermediate_size // V.tp)


def vit_checkpoint_bytes_per_tile(cfg: Config) -> int:
    """Inputs kept by the checkpointed ViT layers per tile (the first one is bf16)."""
    v = cfg.model.vision
    n_s = vit_tile_tokens(cfg)[2]
    layers = cfg.model.vision.num_layers
    return n_s * v.hidden_size * (2 + 4 * (layers - 1))


def vit_stem_bytes_per_tile(cfg: Config) -> int:
    """Patch embedding (bf16 copy of the pixels) and pixel shuffle + projector, per tile."""
    m = cfg.model
    v, H = m.vision, m.llm.hidden_size
    pixels = 3 * v.image_size**2 * 2
    return pixels + m.num_image_token * (24 * v.hidden_size + 4 * H + 8)
