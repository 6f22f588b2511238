"""Model presets: the InternVL3 family with its real dimensions, and a tiny CPU model."""

from __future__ import annotations

import copy

from engine.config import ConfigError, LLMConfig, ModelConfig, VisionConfig

VIT_300M = VisionConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                        norm_type="layer_norm", qkv_bias=True, qk_normalization=False)
VIT_6B = VisionConfig(hidden_size=3200, num_layers=45, num_heads=25, intermediate_size=12800,
                      norm_type="rms_norm", qkv_bias=False, qk_normalization=True)


def _qwen(hidden: int, layers: int, heads: int, kv: int, ffn: int) -> LLMConfig:
    return LLMConfig(vocab_size=151674, hidden_size=hidden, num_layers=layers, num_heads=heads,
                     num_kv_heads=kv, intermediate_size=ffn, rope_theta=1_000_000.0, rms_norm_eps=1e-6)


PRESETS: dict[str, ModelConfig] = {
    "internvl3-1b": ModelConfig(preset="internvl3-1b", vision=VIT_300M, llm=_qwen(896, 24, 14, 2, 4864)),
    "internvl3-2b": ModelConfig(preset="internvl3-2b", vision=VIT_300M, llm=_qwen(1536, 28, 12, 2, 8960)),
    "internvl3-8b": ModelConfig(preset="internvl3-8b", vision=VIT_300M, llm=_qwen(3584, 28, 28, 4, 18944)),
    "internvl3-14b": ModelConfig(preset="internvl3-14b", vision=VIT_300M, llm=_qwen(5120, 48, 40, 8, 13824)),
    "internvl3-38b": ModelConfig(preset="internvl3-38b", vision=VIT_6B, llm=_qwen(5120, 64, 40, 8, 27648)),
    "internvl3-78b": ModelConfig(preset="internvl3-78b", vision=VIT_6B, llm=_qwen(8192, 80, 64, 8, 29568)),
    # Trains on a 2-core CPU: 112px tiles (8x8 patches -> 16 visual tokens per tile).
    # Token ids are those of the synthetic sentencepiece tokenizer (tools/make_synthetic_data.py).
    "tiny": ModelConfig(
        preset="tiny",
        vision=VisionConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, image_size=112,
                            patch_size=14, norm_type="layer_norm", qkv_bias=True, qk_normalization=False),
        llm=LLMConfig(vocab_size=512, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                      intermediate_size=256, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=8192),
        img_context_token_id=7, img_start_token_id=5, img_end_token_id=6,
    ),
    # Tiny model with the 6B-style ViT (RMSNorm, qk-norm over the full hidden size, no qkv bias).
    "tiny-6b-vit": ModelConfig(
        preset="tiny-6b-vit",
        vision=VisionConfig(hidden_size=60, num_layers=2, num_heads=5, intermediate_size=128, image_size=112,
                            patch_size=14, norm_type="rms_norm", qkv_bias=False, qk_normalization=True),
        llm=LLMConfig(vocab_size=512, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                      intermediate_size=256, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=8192),
        img_context_token_id=7, img_start_token_id=5, img_end_token_id=6,
    ),
}


def preset_model_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"model.preset={name!r} is unknown (known: {', '.join(PRESETS)})")
    return copy.deepcopy(PRESETS[name])


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
