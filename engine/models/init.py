"""Layout-independent initialisation: a parameter's initial values depend only on the seed, its
name and the position of each element, never on how the model is split across ranks.

Each parameter has a rule (``normal(std)`` or a constant). Normal values are drawn in blocks
along one dimension of the full tensor (the dimension tensor parallelism splits it along, see
``engine.parallel.plan``), each block from its own generator seeded by ``(seed, name, block)``.
A rank that holds rows ``[a, b)`` of a tensor draws only the blocks overlapping them, one block
at a time, so one process and any layout hold exactly the same numbers, and no rank ever holds
more than its own slice plus one block.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

BLOCK_ELEMENTS = 1 << 22  # values drawn per generator (16 MiB of float32)

# The dimension tensor parallelism splits a parameter along, a property of the architecture
# (Megatron's column-parallel outputs, row-parallel inputs, vocabulary rows); None: never split.
# Name suffixes within a decoder / ViT layer, and whole names.
_LLM_LAYER_SPLIT = {"self_attn.q_proj.weight": 0, "self_attn.q_proj.bias": 0, "self_attn.k_proj.weight": 0,
                    "self_attn.k_proj.bias": 0, "self_attn.v_proj.weight": 0, "self_attn.v_proj.bias": 0,
                    "self_attn.o_proj.weight": 1, "mlp.gate_proj.weight": 0, "mlp.up_proj.weight": 0,
                    "mlp.down_proj.weight": 1}
_VIT_LAYER_SPLIT = {"attn.q_proj.weight": 0, "attn.q_proj.bias": 0, "attn.k_proj.weight": 0, "attn.k_proj.bias": 0,
                    "attn.v_proj.weight": 0, "attn.v_proj.bias": 0, "attn.q_norm.weight": 0,
                    "attn.k_norm.weight": 0, "attn.proj.weight": 1, "mlp.fc1.weight": 0, "mlp.fc1.bias": 0,
                    "mlp.fc2.weight": 1}
_WHOLE_SPLIT = {"language_model.embed_tokens.weight": 0, "language_model.lm_head.weight": 0}


def split_dim(name: str) -> Optional[int]:
    """The dimension tensor parallelism splits parameter ``name`` along (None: replicated)."""
    if name in _WHOLE_SPLIT:
        return _WHOLE_SPLIT[name]
    for prefix, table in (("language_model.layers.", _LLM_LAYER_SPLIT), ("vision_model.layers.", _VIT_LAYER_SPLIT)):
        if name.startswith(prefix):
            rest = name[len(prefix):].split(".", 1)
            return table.get(rest[1]) if len(rest) == 2 else None
    return None


def draw_dim(name: str) -> int:
    """The dimension values are drawn along: the split dimension, so a rank draws only its rows."""
    d = split_dim(name)
    return 0 if d is None else d


@dataclass(frozen=True)
class InitRule:
    kind: str  # "normal" (value = std) or "constant"
    value: float

    def __str__(self) -> str:
        return f"normal(std={self.value})" if self.kind == "normal" else f"constant({self.value})"


def init_rules(model: nn.Module, std: float, layer_scale: float) -> dict[str, InitRule]:
    """The rule of every parameter of an (unsplit) InternVL model, by module type: linear,
    convolution and embedding weights and the ViT's class/position embeddings ``normal(std)``,
    biases 0, norm weights 1, the ViT's layer scales ``layer_scale``."""
    from engine.models.layers import RMSNorm

    normal, zero, one = InitRule("normal", std), InitRule("constant", 0.0), InitRule("constant", 1.0)
    out: dict[str, InitRule] = {}
    for prefix, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            name = f"{prefix}.{pname}" if prefix else pname
            if pname == "bias":
                rule = zero
            elif isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                rule = normal
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                rule = one
            elif pname in ("class_embedding", "position_embedding"):
                rule = normal
            elif pname in ("ls1", "ls2"):
                rule = InitRule("constant", layer_scale)
            else:
                raise ValueError(f"no initialisation rule for parameter {name} of {type(module).__name__}")
            out[name] = rule
    return out


def block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def scratch_buffer() -> torch.Tensor:
    """One block's worth of host memory; pass it to every ``fill_slice`` of a model so that blocks
    reuse it (freed and re-allocated blocks of varying sizes fragment the host heap: measured
    1.6x the held bytes when rehearsing a 78B rank without it)."""
    return torch.empty(BLOCK_ELEMENTS)


def block_rows(shape: tuple[int, ...], dim: int) -> int:
    """Slices along ``dim`` per block: as many as fit in ``BLOCK_ELEMENTS`` values (at least one)."""
    row = max(1, int(torch.Size(shape).numel()) // max(shape[dim], 1))
    return max(1, BLOCK_ELEMENTS // row)


def fill_slice(out: torch.Tensor, rule: InitRule, name: str, shape: tuple[int, ...], seed: int,
               dim: int = 0, start: int = 0, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Write into ``out`` the initial values of elements ``[start, start + out.shape[dim])`` along
    ``dim`` of the full tensor ``name`` of ``shape``; returns ``out``. ``scratch``: a float32 host
    buffer of at least ``BLOCK_ELEMENTS`` values to draw blocks into."""
    stop = start + out.shape[dim]
    if not 0 <= start <= stop <= shape[dim]:
        raise ValueError(f"{name}: slice [{start}, {stop}) along dim {dim} is outside shape {shape}")
    if rule.kind == "constant":
        return out.fill_(rule.value)
    per_block = block_rows(shape, dim)
    for block in range(start // per_block, -(-stop // per_block)):
        a, b = block * per_block, min((block + 1) * per_block, shape[dim])
        size = list(shape)
        size[dim] = b - a
        g = torch.Generator().manual_seed(block_seed(seed, name, block))
        n = int(torch.Size(size).numel())
        values = torch.empty(size) if scratch is None or scratch.numel() < n else scratch[:n].view(size)
        values.normal_(0.0, rule.value, generator=g)
        lo, hi = max(a, start), min(b, stop)
        out.narrow(dim, lo - start, hi - lo).copy_(values.narrow(dim, lo - a, hi - lo))
    return out


def initialize(model: nn.Module, seed: int, std: float, layer_scale: float) -> None:
    """Initialise every parameter of an unsplit model in place, exactly as any layout does its slices."""
    rules = init_rules(model, std, layer_scale)
    scratch = scratch_buffer()
    with torch.no_grad():
        for name, p in model.named_parameters():
            fill_slice(p.data, rules[name], name, tuple(p.shape), seed, draw_dim(name), scratch=scratch)


def initial_tensor(rule: InitRule, name: str, shape: tuple[int, ...], seed: int, dim: int = 0,
                   start: int = 0, stop: Optional[int] = None, device=None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A new tensor with the initial values of ``[start, stop)`` along ``dim`` of parameter ``name``."""
    stop = shape[dim] if stop is None else stop
    size = list(shape)
    size[dim] = stop - start
    out = torch.empty(size, dtype=dtype, device=device)
    return fill_slice(out, rule, name, shape, seed, dim, start)
