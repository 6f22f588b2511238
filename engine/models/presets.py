"""Model presets (defined beside the config types in ``engine.config``, re-exported here) and the
parameter count of a preset from its dimensions alone."""

from __future__ import annotations

from engine.config import PRESETS, VIT_6B, VIT_300M, ModelConfig, preset_model_config

__all__ = ["PRESETS", "VIT_300M", "VIT_6B", "analytic_param_count", "preset_model_config"]


def analytic_param_count(m: ModelConfig) -> dict[str, int]:
    """Parameter counts from the dimensions alone (no model is built)."""
    v, l = m.vision, m.llm
    C, P = v.hidden_size, v.num_patches
    vit = 3 * C * v.patch_size**2 + C + C + (P + 1) * C  # patch conv (w+b), cls, pos
    norm = 2 * C if v.norm_type == "layer_norm" else C
    layer = 2 * norm + 2 * C  # two norms, two layer-scale vectors
    layer += 3 * C * C + (3 * C if v.qkv_bias else 0) + C * C + C  # qkv, proj (bias)
    layer += (2 * C if v.qk_normalization else 0)
    layer += C * v.intermediate_size + v.intermediate_size + v.intermediate_size * C + C
    vit += v.num_layers * layer
    Din, H = m.projector_in, l.hidden_size
    proj = 2 * Din + Din * H + H + H * H + H
    kvd = l.num_kv_heads * l.head_dim
    llm_layer = 2 * H + H * H + H + 2 * (H * kvd + kvd) + H * H + 3 * H * l.intermediate_size
    llm = l.vocab_size * H * (1 if l.tie_word_embeddings else 2) + l.num_layers * llm_layer + H
    return {"vit": vit, "projector": proj, "llm": llm, "total": vit + proj + llm}
