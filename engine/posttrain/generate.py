"""Batched generation with a per-layer KV cache for the engine's Qwen LLM (single process).

Prompts are left-padded to one length; padded keys are masked out and every prompt keeps its
own V2PE positions (fixed ``delta``), so a batch decodes exactly as each prompt alone. Decoding
is greedy (``temperature == 0``) or samples from ``softmax(logits / temperature)`` with an
explicit ``torch.Generator``. A sequence stops at its first stop token (kept in the output).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from engine.data.v2pe import v2pe_positions_1d


@dataclass
class KVCache:
    """Keys and values of every layer, ``[B, T, kv_heads, head_dim]``, and the key padding mask."""

    keys: list[Optional[torch.Tensor]] = field(default_factory=list)
    values: list[Optional[torch.Tensor]] = field(default_factory=list)
    valid: Optional[torch.Tensor] = None  # [B, T] True for real (non-padding) keys

    @classmethod
    def empty(cls, num_layers: int) -> "KVCache":
        return cls([None] * num_layers, [None] * num_layers)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=1)
            v = torch.cat([self.values[layer], v], dim=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def _attend(layer, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, index: int,
            mask: torch.Tensor) -> torch.Tensor:
    """One decoder layer on new tokens ``x [B, S, H]`` against the cache plus themselves."""
    a = layer.self_attn
    B, S, _ = x.shape
    h = layer.input_layernorm(x)
    q = a.q_proj(h).view(B, S, -1, a.head_dim)
    k = a.k_proj(h).view(B, S, -1, a.head_dim)
    v = a.v_proj(h).view(B, S, -1, a.head_dim)
    q, k = a.rotary(q, k, positions, a.rope_theta)
    k, v = cache.append(index, k, v)
    rep = q.shape[2] // k.shape[2]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    x = x + a.o_proj(out.transpose(1, 2).reshape(B, S, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def forward_cached(model, embeds: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                   cache: KVCache) -> torch.Tensor:
    """Logits ``[B, S, vocab]`` of new tokens (embeddings ``[B, S, H]``, positions ``[B, S]``,
    ``valid [B, S]`` False at left padding); extends ``cache``."""
    B, S = valid.shape
    cache.valid = valid if cache.valid is None else torch.cat([cache.valid, valid], dim=1)
    T = cache.valid.shape[1]
    causal = torch.ones(S, T, dtype=torch.bool, device=valid.device).tril(T - S)
    mask = (causal[None] & cache.valid[:, None, :])[:, None]  # [B, 1, S, T]
    # a padded query row would attend to nothing: let it see itself (its output is never used)
    own = torch.zeros(S, T, dtype=torch.bool, device=valid.device)
    own[torch.arange(S), torch.arange(T - S, T)] = True
    mask = mask | own[None, None]
    lm = model.language_model
    h = embeds
    for i, layer in enumerate(lm.layers):
        h = _attend(layer, h, positions.float(), cache, i, mask)
    return lm.lm_head(lm.norm(h))


def _pad_left(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), L), dtype=torch.bool)
    for b, p in enumerate(prompts):
        if len(p):
            ids[b, L - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            valid[b, L - len(p):] = True
    return ids, valid


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], image_embeds: Optional[torch.Tensor] = None,
             max_new_tokens: int = 32, temperature: float = 0.0, stop_ids: Sequence[int] = (),
             generator: Optional[torch.Generator] = None, pad_id: int = 0,
             v2pe_delta: Optional[float] = None) -> list[list[int]]:
    """New tokens of each prompt. ``image_embeds [tiles, tokens, H]`` fill the prompts'
    ``<IMG_CONTEXT>`` runs in prompt order (a prompt may have none)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    cfg = model.config
    delta = cfg.v2pe_delta if v2pe_delta is None else v2pe_delta
    device = next(model.parameters()).device
    ids, valid = _pad_left(prompts, pad_id)
    positions = torch.zeros(ids.shape, dtype=torch.float32)
    for b, p in enumerate(prompts):
        positions[b, ids.shape[1] - len(p):] = torch.tensor(v2pe_positions_1d(list(p), cfg.img_context_token_id, delta))
    ids, valid, positions = ids.to(device), valid.to(device), positions.to(device)
    embeds = model.embed(ids, image_embeds)
    cache = KVCache.empty(len(model.language_model.layers))
    logits = forward_cached(model, embeds, positions, valid, cache)[:, -1]
    next_pos = positions[:, -1:] + 1
    stop = torch.tensor(sorted(set(int(s) for s in stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        if temperature == 0:
            tok = logits.float().argmax(-1)
        else:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            tok = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
        for b in range(len(prompts)):
            if not done[b]:
                out[b].append(int(tok[b]))
        done |= torch.isin(tok, stop)
        if bool(done.all()):
            break
        step_valid = torch.ones(len(prompts), 1, dtype=torch.bool, device=device)
        logits = forward_cached(model, model.language_model.embed_tokens(tok[:, None]), next_pos, step_valid, cache)[:, -1]
        next_pos = next_pos + 1
    return out
