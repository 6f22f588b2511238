"""Checkpoint interop with transformers' ``internvl`` and the original remote-code ``internvl_chat``.

Each on-disk format is a ``KeyMap``: a table of name patterns (``{i}`` = layer index,
``{w}`` = ``weight|bias``) from checkpoint names to engine names. A rule with several engine
names is a fused tensor whose rows are the engine tensors concatenated along dim 0
(``attn.qkv = [q; k; v]``). The maps work one tensor at a time (``map_key`` / ``export_key``)
so that a streaming converter never needs the whole state dict in memory.

Formats:

* ``hf``: transformers ``InternVLForConditionalGeneration``. On disk (what ``save_pretrained``
  writes): ``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``,
  ``language_model.lm_head.*``. In memory: ``model.vision_tower.*``, ``model.multi_modal_projector.*``,
  ``model.language_model.*``, ``lm_head.*``. Both are accepted when loading.
* ``internvl_chat``: ``vision_model.embeddings.*``, ``vision_model.encoder.layers.{i}.attn.qkv``
  (fused), ``mlp1.{0,1,3}``, ``language_model.model.*``, ``language_model.lm_head.*``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import torch

from engine.config import ConfigError, LLMConfig, ModelConfig, VisionConfig, _build, validate_model
from engine.models.internvl import InternVLModel

HF = "hf"
CHAT = "internvl_chat"
FORMATS = (HF, CHAT)

SliceFn = Callable[[torch.Tensor], torch.Tensor]


# ============================================================================ key maps


@dataclass(frozen=True)
class RowChunk:
    """Part ``index`` of ``parts`` equal row blocks of a fused tensor (dim 0)."""

    index: int
    parts: int

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] % self.parts:
            raise ValueError(f"fused tensor of shape {tuple(t.shape)} does not split into {self.parts} equal row blocks")
        return t.chunk(self.parts, dim=0)[self.index].clone()


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


_FIELDS = {"i": r"(?P<i>\d+)", "w": r"(?P<w>weight|bias)"}


def _compile(pattern: str) -> re.Pattern:
    regex = re.escape(pattern)
    for name, group in _FIELDS.items():
        regex = regex.replace(re.escape("{" + name + "}"), group)
    return re.compile(regex + r"\Z")


@dataclass(frozen=True)
class Rule:
    ckpt: str  # checkpoint name pattern
    engine: tuple[str, ...]  # engine name pattern(s); several = fused rows [a; b; ...]


class KeyMap:
    """Checkpoint names <-> engine names for one format."""

    def __init__(self, name: str, rules: list[Rule], aliases: tuple[tuple[str, str], ...] = (),
                 ignored: tuple[str, ...] = ()):
        self.name = name
        self.rules = rules
        self.aliases = aliases  # (alternative prefix, canonical prefix), tried in order
        self._forward = [(_compile(r.ckpt), r) for r in rules]
        self._backward = [(_compile(e), r, j) for r in rules for j, e in enumerate(r.engine)]
        self._ignored = [_compile(p) for p in ignored]

    def canonical(self, name: str) -> str:
        """The on-disk spelling of ``name`` (in-memory prefixes rewritten)."""
        for alt, canon in self.aliases:
            if name.startswith(alt):
                return canon + name[len(alt):]
        return name

    def is_ignored(self, name: str) -> bool:
        name = self.canonical(name)
        return any(p.match(name) for p in self._ignored)

    def to_engine(self, name: str) -> Optional[list[tuple[str, SliceFn]]]:
        """Engine names (and how to cut each from the tensor) for a checkpoint name; None if unknown."""
        name = self.canonical(name)
        for regex, rule in self._forward:
            m = regex.match(name)
            if m:
                fields = m.groupdict()
                n = len(rule.engine)
                return [(e.format(**fields), _identity if n == 1 else RowChunk(j, n)) for j, e in enumerate(rule.engine)]
        return None

    def to_checkpoint(self, engine_name: str) -> Optional[tuple[str, int, int]]:
        """``(checkpoint name, part, parts)`` for an engine name; ``parts > 1`` marks a fused tensor."""
        for regex, rule, j in self._backward:
            m = regex.match(engine_name)
            if m:
                return rule.ckpt.format(**m.groupdict()), j, len(rule.engine)
        return None


def _llm_rules() -> list[Rule]:
    """Qwen2 decoder; the names are the same in both formats."""
    src, dst = "language_model.model.layers.{i}.", "language_model.layers.{i}."
    subs = ["self_attn.q_proj.{w}", "self_attn.k_proj.{w}", "self_attn.v_proj.{w}", "self_attn.o_proj.weight",
            "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
            "input_layernorm.weight", "post_attention_layernorm.weight"]
    return [Rule("language_model.model.embed_tokens.weight", ("language_model.embed_tokens.weight",)),
            *(Rule(src + s, (dst + s,)) for s in subs),
            Rule("language_model.model.norm.weight", ("language_model.norm.weight",)),
            Rule("language_model.lm_head.weight", ("language_model.lm_head.weight",))]


_LLM_IGNORED = ("language_model.model.layers.{i}.self_attn.rotary_emb.inv_freq",)


def _hf_rules() -> list[Rule]:
    L, E = "vision_tower.encoder.layer.{i}.", "vision_model.layers.{i}."
    layer = [("layernorm_before.{w}", "norm1.{w}"), ("layernorm_after.{w}", "norm2.{w}"),
             ("lambda_1", "ls1"), ("lambda_2", "ls2"),
             ("attention.q_proj.{w}", "attn.q_proj.{w}"), ("attention.k_proj.{w}", "attn.k_proj.{w}"),
             ("attention.v_proj.{w}", "attn.v_proj.{w}"),
             ("attention.q_norm.weight", "attn.q_norm.weight"), ("attention.k_norm.weight", "attn.k_norm.weight"),
             ("attention.projection_layer.{w}", "attn.proj.{w}"),
             ("mlp.fc1.{w}", "mlp.fc1.{w}"), ("mlp.fc2.{w}", "mlp.fc2.{w}")]
    return [Rule("vision_tower.embeddings.cls_token", ("vision_model.embeddings.class_embedding",)),
            Rule("vision_tower.embeddings.position_embeddings", ("vision_model.embeddings.position_embedding",)),
            Rule("vision_tower.embeddings.patch_embeddings.projection.{w}", ("vision_model.embeddings.patch_embedding.{w}",)),
            *(Rule(L + a, (E + b,)) for a, b in layer),
            *(Rule(f"multi_modal_projector.{m}.{{w}}", (f"projector.{m}.{{w}}",))
              for m in ("layer_norm", "linear_1", "linear_2")),
            *_llm_rules()]


def _chat_rules() -> list[Rule]:
    L, E = "vision_model.encoder.layers.{i}.", "vision_model.layers.{i}."
    same = ["norm1.{w}", "norm2.{w}", "ls1", "ls2", "attn.q_norm.weight", "attn.k_norm.weight", "attn.proj.{w}",
            "mlp.fc1.{w}", "mlp.fc2.{w}"]
    return [Rule("vision_model.embeddings.class_embedding", ("vision_model.embeddings.class_embedding",)),
            Rule("vision_model.embeddings.position_embedding", ("vision_model.embeddings.position_embedding",)),
            Rule("vision_model.embeddings.patch_embedding.{w}", ("vision_model.embeddings.patch_embedding.{w}",)),
            Rule(L + "attn.qkv.{w}", (E + "attn.q_proj.{w}", E + "attn.k_proj.{w}", E + "attn.v_proj.{w}")),
            *(Rule(L + s, (E + s,)) for s in same),
            Rule("mlp1.0.{w}", ("projector.layer_norm.{w}",)),
            Rule("mlp1.1.{w}", ("projector.linear_1.{w}",)),
            Rule("mlp1.3.{w}", ("projector.linear_2.{w}",)),
            *_llm_rules()]


KEY_MAPS: dict[str, KeyMap] = {
    HF: KeyMap(HF, _hf_rules(),
               aliases=(("model.vision_tower.", "vision_tower."),
                        ("model.multi_modal_projector.", "multi_modal_projector."),
                        ("model.language_model.", "language_model.model."),
                        ("lm_head.", "language_model.lm_head.")),
               ignored=_LLM_IGNORED),
    CHAT: KeyMap(CHAT, _chat_rules(), ignored=_LLM_IGNORED),
}


def _key_map(fmt: str) -> KeyMap:
    if fmt not in KEY_MAPS:
        raise ValueError(f"format={fmt!r} is unknown (known: {', '.join(FORMATS)})")
    return KEY_MAPS[fmt]


def map_key(name: str, fmt: str = HF) -> list[tuple[str, SliceFn]]:
    """Checkpoint tensor name -> ``[(engine name, slice_fn)]``; ``[]`` for tensors the engine
    does not use (rotary caches). Raises KeyError for names the format does not know."""
    km = _key_map(fmt)
    if km.is_ignored(name):
        return []
    out = km.to_engine(name)
    if out is None:
        raise KeyError(f"{name!r} is not a known {fmt} checkpoint tensor")
    return out


def export_key(engine_name: str, fmt: str = HF) -> tuple[str, int, int]:
    """Engine tensor name -> ``(checkpoint name, part, parts)``; parts > 1: rows of a fused tensor."""
    out = _key_map(fmt).to_checkpoint(engine_name)
    if out is None:
        raise KeyError(f"engine tensor {engine_name!r} has no {fmt} name")
    return out


def detect_key_format(names: list[str]) -> Optional[str]:
    """``hf`` / ``internvl_chat`` from the vision and projector tensor names, None if they say neither."""
    hf = any(n.startswith(("vision_tower.", "model.vision_tower.", "multi_modal_projector.",
                           "model.multi_modal_projector.")) for n in names)
    chat = any(n.startswith(("vision_model.", "mlp1.")) for n in names)
    if hf and chat:
        raise ValueError("checkpoint mixes transformers (vision_tower.*, multi_modal_projector.*) and "
                         "internvl_chat (vision_model.*, mlp1.*) tensor names")
    return HF if hf else CHAT if chat else None


# ============================================================================ state dicts


def expected_tensors(config: ModelConfig) -> dict[str, torch.Size]:
    """Engine tensor names and shapes for ``config`` (built on the meta device)."""
    with torch.device("meta"):
        model = InternVLModel(config, init=False)
    return {k: v.shape for k, v in model.state_dict().items()}


_VIT_LAYER = re.compile(r"vision_model\.layers\.(\d+)\.")


def _unused_vit_layer(engine_name: str, built_layers: int) -> bool:
    m = _VIT_LAYER.match(engine_name)
    return m is not None and int(m.group(1)) >= built_layers


def _vit_built_layers(expected: Mapping[str, Any]) -> int:
    return len({m.group(1) for k in expected if (m := _VIT_LAYER.match(k))})


def _to_engine(state_dict: Mapping[str, torch.Tensor], config: ModelConfig, fmt: str) -> dict[str, torch.Tensor]:
    expected = expected_tensors(config)
    built = _vit_built_layers(expected)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in state_dict.items():
        try:
            targets = map_key(name, fmt)
        except KeyError:
            unknown.append(name)
            continue
        for engine_name, cut in targets:
            if not _unused_vit_layer(engine_name, built):
                out[engine_name] = cut(tensor)
    if unknown:
        raise KeyError(f"unknown {fmt} tensors: {_names(unknown)}")
    if config.llm.tie_word_embeddings and "language_model.embed_tokens.weight" in out:
        out["language_model.lm_head.weight"] = out["language_model.embed_tokens.weight"]
    return out


def _from_engine(state_dict: Mapping[str, torch.Tensor], config: ModelConfig, fmt: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    parts_of: dict[str, int] = {}
    for name, tensor in state_dict.items():
        if config.llm.tie_word_embeddings and name == "language_model.lm_head.weight":
            continue
        ckpt, part, parts = export_key(name, fmt)
        if parts == 1:
            out[ckpt] = tensor
        else:
            fused.setdefault(ckpt, {})[part] = tensor
            parts_of[ckpt] = parts
    for ckpt, pieces in fused.items():
        if len(pieces) != parts_of[ckpt]:
            raise KeyError(f"{ckpt}: only parts {sorted(pieces)} of {parts_of[ckpt]} are in the state dict")
        out[ckpt] = torch.cat([pieces[j] for j in range(parts_of[ckpt])], dim=0)
    return out


def hf_to_engine(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers names (on-disk or in-memory) -> engine names. ViT layers past the selected one are dropped."""
    return _to_engine(state_dict, config, HF)


def engine_to_hf(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Engine names -> transformers on-disk names (a tied LM head is left out)."""
    return _from_engine(state_dict, config, HF)


def chat_to_engine(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """internvl_chat names -> engine names (fused qkv split into q/k/v)."""
    return _to_engine(state_dict, config, CHAT)


def engine_to_chat(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Engine names -> internvl_chat names (q/k/v fused into qkv)."""
    return _from_engine(state_dict, config, CHAT)


def _names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# ============================================================================ configs


def _get(d: Mapping[str, Any], key: str, default: Any, where: str) -> Any:
    """``d[key]`` or ``default``; raises when the key is required (default is ``...``)."""
    if key in d and d[key] is not None:
        return d[key]
    if default is ...:
        raise ConfigError(f"{where}.{key} is missing")
    return default


def _square(value: Any, key: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{key}={value!r}: only square sizes are supported")
        value = value[0]
    return int(value)


def _expect(value: Any, allowed: tuple, key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not supported (supported: {', '.join(map(repr, allowed))})")


def _qwen2_from(t: Mapping[str, Any], where: str, tie_default: bool) -> LLMConfig:
    """Qwen2 text config (transformers field names; missing fields take Qwen2Config's defaults)."""
    _expect(t.get("model_type", "qwen2"), ("qwen2",), f"{where}.model_type")
    _expect(_get(t, "hidden_act", "silu", where), ("silu",), f"{where}.hidden_act")
    if t.get("use_sliding_window"):
        raise ConfigError(f"{where}.use_sliding_window=True is not supported")
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    _expect(rope.get("rope_type", rope.get("type", "default")), ("default",), f"{where}.rope_parameters.rope_type")
    theta = rope.get("rope_theta", t.get("rope_theta", 10000.0))
    hidden = int(_get(t, "hidden_size", 4096, where))
    heads = int(_get(t, "num_attention_heads", 32, where))
    head_dim = t.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        raise ConfigError(f"{where}.head_dim={head_dim} is not hidden_size/num_attention_heads={hidden}/{heads}")
    return LLMConfig(
        vocab_size=int(_get(t, "vocab_size", 151936, where)),
        hidden_size=hidden,
        num_layers=int(_get(t, "num_hidden_layers", 32, where)),
        num_heads=heads,
        num_kv_heads=int(_get(t, "num_key_value_heads", heads, where)),
        intermediate_size=int(_get(t, "intermediate_size", 22016, where)),
        rope_theta=float(theta),
        rms_norm_eps=float(_get(t, "rms_norm_eps", 1e-6, where)),
        max_position_embeddings=int(_get(t, "max_position_embeddings", 32768, where)),
        tie_word_embeddings=bool(_get(t, "tie_word_embeddings", tie_default, where)),
    )


def _qwen2_to(l: LLMConfig) -> dict[str, Any]:
    return {
        "model_type": "qwen2",
        "vocab_size": l.vocab_size,
        "hidden_size": l.hidden_size,
        "intermediate_size": l.intermediate_size,
        "num_hidden_layers": l.num_layers,
        "num_attention_heads": l.num_heads,
        "num_key_value_heads": l.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": l.max_position_embeddings,
        "rms_norm_eps": l.rms_norm_eps,
        "rope_theta": l.rope_theta,
        "rope_parameters": {"rope_theta": l.rope_theta, "rope_type": "default"},
        "use_sliding_window": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": l.tie_word_embeddings,
    }


def _match_preset(cfg: ModelConfig) -> ModelConfig:
    """Name the config after the preset it equals, if any (keeps ``preset`` meaningful)."""
    from engine.models.presets import PRESETS

    for name, p in PRESETS.items():
        if (p.vision, p.llm) == (cfg.vision, cfg.llm):
            cfg.preset = name
            break
    return cfg


def _image_token_ids(d: Mapping[str, Any], context_id: int) -> dict[str, int]:
    """InternVL tokenizers add ``<img>``, ``</img>``, ``<IMG_CONTEXT>`` as consecutive tokens."""
    return {"img_context_token_id": context_id,
            "img_start_token_id": int(d.get("img_start_token_id", context_id - 2)),
            "img_end_token_id": int(d.get("img_end_token_id", context_id - 1))}


def _extra_image_ids(cfg: ModelConfig) -> dict[str, int]:
    out = {}
    if cfg.img_start_token_id != cfg.img_context_token_id - 2:
        out["img_start_token_id"] = cfg.img_start_token_id
    if cfg.img_end_token_id != cfg.img_context_token_id - 1:
        out["img_end_token_id"] = cfg.img_end_token_id
    return out


def hf_config_to_engine(d: Mapping[str, Any]) -> ModelConfig:
    """transformers ``InternVLConfig`` dict -> ModelConfig (missing fields take transformers' defaults)."""
    _expect(d.get("model_type", "internvl"), ("internvl",), "model_type")
    v = d.get("vision_config") or {}
    t = d.get("text_config") or {}
    _expect(_get(d, "projector_hidden_act", "gelu", "config"), ("gelu",), "projector_hidden_act")
    _expect(_get(d, "vision_feature_select_strategy", "default", "config"), ("default",),
            "vision_feature_select_strategy")
    feature_layer = _get(d, "vision_feature_layer", -1, "config")
    if not isinstance(feature_layer, int):
        raise ConfigError(f"vision_feature_layer={feature_layer!r}: only a single layer index is supported")
    _expect(_get(v, "hidden_act", "gelu", "vision_config"), ("gelu",), "vision_config.hidden_act")
    _expect(_get(v, "num_channels", 3, "vision_config"), (3,), "vision_config.num_channels")
    _expect(_get(v, "use_absolute_position_embeddings", True, "vision_config"), (True,),
            "vision_config.use_absolute_position_embeddings")
    _expect(_get(v, "use_mean_pooling", True, "vision_config"), (True,), "vision_config.use_mean_pooling")
    vision = VisionConfig(
        hidden_size=int(_get(v, "hidden_size", 1024, "vision_config")),
        num_layers=int(_get(v, "num_hidden_layers", 24, "vision_config")),
        num_heads=int(_get(v, "num_attention_heads", 16, "vision_config")),
        intermediate_size=int(_get(v, "intermediate_size", 4096, "vision_config")),
        image_size=_square(_get(v, "image_size", 448, "vision_config"), "vision_config.image_size"),
        patch_size=_square(_get(v, "patch_size", 14, "vision_config"), "vision_config.patch_size"),
        norm_type=str(_get(v, "norm_type", "layer_norm", "vision_config")),
        qkv_bias=bool(_get(v, "attention_bias", False, "vision_config")),
        qk_normalization=bool(_get(v, "use_qk_norm", False, "vision_config")),
        layer_norm_eps=float(_get(v, "layer_norm_eps", 1e-6, "vision_config")),
        layer_scale_init=float(_get(v, "layer_scale_init_value", 0.1, "vision_config")),
    )
    _check_qk_norm_eps(vision, "vision_config.layer_norm_eps")
    tie = bool(_get(d, "tie_word_embeddings", True, "config"))  # transformers ties on the top-level flag
    llm = _qwen2_from(t, "text_config", tie)
    llm.tie_word_embeddings = tie
    cfg = ModelConfig(vision=vision, llm=llm, downsample_ratio=float(_get(d, "downsample_ratio", 0.5, "config")),
                      ps_version="v2", select_layer=feature_layer,
                      initializer_range=float(t.get("initializer_range", 0.02)),
                      **_image_token_ids(d, int(_get(d, "image_token_id", 151667, "config"))))
    return _match_preset(cfg)


def _check_qk_norm_eps(v: VisionConfig, key: str) -> None:
    # transformers builds the ViT q_norm/k_norm with eps 1e-6 whatever layer_norm_eps says;
    # InternViT (and the engine) use layer_norm_eps.
    if v.qk_normalization and v.layer_norm_eps != 1e-6:
        raise ConfigError(f"{key}={v.layer_norm_eps} with qk-norm: transformers' InternVL uses eps 1e-6 for "
                          f"q_norm/k_norm, the engine uses layer_norm_eps; only 1e-6 converts exactly")


def engine_config_to_hf(cfg: ModelConfig, vit_layers: Optional[int] = None, dtype: str = "float32") -> dict[str, Any]:
    """ModelConfig -> transformers ``InternVLConfig`` dict. ``vit_layers``: the ViT layers actually
    built (the layers up to ``select_layer``); they are written as the whole tower with
    ``vision_feature_layer=-1``, which computes the same features."""
    if cfg.ps_version != "v2":
        raise ConfigError(f"ps_version={cfg.ps_version!r}: transformers' InternVL implements only pixel shuffle "
                          f"v2; save with format='internvl_chat'")
    v, l = cfg.vision, cfg.llm
    _check_qk_norm_eps(v, "model.vision.layer_norm_eps")
    vision = {
        "model_type": "internvl_vision",
        "hidden_size": v.hidden_size,
        "num_hidden_layers": vit_layers if vit_layers is not None else v.num_layers,
        "num_attention_heads": v.num_heads,
        "intermediate_size": v.intermediate_size,
        "image_size": [v.image_size, v.image_size],
        "patch_size": [v.patch_size, v.patch_size],
        "num_channels": 3,
        "norm_type": v.norm_type,
        "attention_bias": v.qkv_bias,
        "use_qk_norm": v.qk_normalization,
        "layer_norm_eps": v.layer_norm_eps,
        "layer_scale_init_value": v.layer_scale_init,
        "hidden_act": "gelu",
        "use_mean_pooling": True,
        "use_absolute_position_embeddings": True,
        "use_mask_token": False,
        "initializer_range": cfg.initializer_range,
    }
    text = _qwen2_to(l)
    text["initializer_range"] = cfg.initializer_range
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "vision_config": vision,
        "text_config": text,
        "downsample_ratio": cfg.downsample_ratio,
        "image_token_id": cfg.img_context_token_id,
        "image_seq_length": cfg.num_image_token,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1 if vit_layers is not None else cfg.select_layer,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": l.tie_word_embeddings,
        "dtype": dtype,
        **_extra_image_ids(cfg),
    }


def chat_config_to_engine(d: Mapping[str, Any]) -> ModelConfig:
    """Remote-code ``InternVLChatConfig`` dict -> ModelConfig (missing fields take its defaults)."""
    _expect(d.get("model_type", "internvl_chat"), ("internvl_chat",), "model_type")
    v = d.get("vision_config") or {}
    t = dict(d.get("llm_config") or {})
    arch = (t.get("architectures") or ["Qwen2ForCausalLM"])[0]
    _expect(arch, ("Qwen2ForCausalLM",), "llm_config.architectures[0]")
    t.setdefault("model_type", "qwen2")
    _expect(_get(v, "hidden_act", "gelu", "vision_config"), ("gelu",), "vision_config.hidden_act")
    _expect(_get(v, "num_channels", 3, "vision_config"), (3,), "vision_config.num_channels")
    image_size = _square(_get(v, "image_size", 224, "vision_config"), "vision_config.image_size")
    forced = d.get("force_image_size")
    if forced is not None and _square(forced, "force_image_size") != image_size:
        raise ConfigError(f"force_image_size={forced} differs from vision_config.image_size={image_size}; "
                          f"the engine ties the tile size to the ViT's position embedding")
    if d.get("use_backbone_lora") or d.get("use_llm_lora"):
        raise ConfigError("use_backbone_lora/use_llm_lora: merge the LoRA weights before loading")
    vision = VisionConfig(
        hidden_size=int(_get(v, "hidden_size", 3200, "vision_config")),
        num_layers=int(_get(v, "num_hidden_layers", 48, "vision_config")),
        num_heads=int(_get(v, "num_attention_heads", 25, "vision_config")),
        intermediate_size=int(_get(v, "intermediate_size", 12800, "vision_config")),
        image_size=image_size,
        patch_size=_square(_get(v, "patch_size", 14, "vision_config"), "vision_config.patch_size"),
        norm_type=str(_get(v, "norm_type", "rms_norm", "vision_config")),
        qkv_bias=bool(_get(v, "qkv_bias", False, "vision_config")),
        qk_normalization=bool(_get(v, "qk_normalization", True, "vision_config")),
        layer_norm_eps=float(_get(v, "layer_norm_eps", 1e-6, "vision_config")),
        layer_scale_init=float(_get(v, "initializer_factor", 0.1, "vision_config")),
    )
    llm = _qwen2_from(t, "llm_config", False)
    cfg = ModelConfig(vision=vision, llm=llm, downsample_ratio=float(_get(d, "downsample_ratio", 0.5, "config")),
                      ps_version=str(_get(d, "ps_version", "v1", "config")),
                      select_layer=int(_get(d, "select_layer", -1, "config")),
                      initializer_range=float(t.get("initializer_range", 0.02)),
                      **_image_token_ids(d, int(d.get("img_context_token_id", 151667))))
    return _match_preset(cfg)


def engine_config_to_chat(cfg: ModelConfig, vit_layers: Optional[int] = None, dtype: str = "float32") -> dict[str, Any]:
    """ModelConfig -> remote-code ``InternVLChatConfig`` dict (Qwen2 LLM)."""
    v, l = cfg.vision, cfg.llm
    llm = _qwen2_to(l)
    del llm["rope_parameters"]
    llm.update({"architectures": ["Qwen2ForCausalLM"], "initializer_range": cfg.initializer_range,
                "torch_dtype": dtype})
    vision = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": v.hidden_size,
        "num_hidden_layers": vit_layers if vit_layers is not None else v.num_layers,
        "num_attention_heads": v.num_heads,
        "intermediate_size": v.intermediate_size,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": 3,
        "norm_type": v.norm_type,
        "qkv_bias": v.qkv_bias,
        "qk_normalization": v.qk_normalization,
        "layer_norm_eps": v.layer_norm_eps,
        "initializer_factor": v.layer_scale_init,
        "initializer_range": cfg.initializer_range,
        "hidden_act": "gelu",
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "use_flash_attn": True,
        "torch_dtype": dtype,
    }
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "vision_config": vision,
        "llm_config": llm,
        "force_image_size": v.image_size,
        "downsample_ratio": cfg.downsample_ratio,
        "ps_version": cfg.ps_version,
        "select_layer": -1 if vit_layers is not None else cfg.select_layer,
        "template": "internvl2_5",
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "pad2square": False,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "tie_word_embeddings": l.tie_word_embeddings,
        "torch_dtype": dtype,
        "img_context_token_id": cfg.img_context_token_id,
        **_extra_image_ids(cfg),
    }


def config_to_engine(d: Mapping[str, Any]) -> tuple[ModelConfig, str]:
    """ModelConfig and format (``hf`` / ``internvl_chat``) from a config.json dict."""
    mt = d.get("model_type")
    if mt == "internvl":
        return hf_config_to_engine(d), HF
    if mt == "internvl_chat":
        return chat_config_to_engine(d), CHAT
    raise ConfigError(f"config.json model_type={mt!r} is not supported (supported: 'internvl', 'internvl_chat')")


def _apply_overrides(cfg: ModelConfig, overrides: Optional[Mapping[str, Any]]) -> ModelConfig:
    """Nested dict or dotted keys (``{"llm.rope_theta": 1e6, "select_layer": -2}``) over the config.
    A new ``img_context_token_id`` moves the derived ``<img>`` / ``</img>`` ids along with it."""
    if not overrides:
        return cfg
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    derived = _image_token_ids({}, cfg.img_context_token_id)
    cfg = _build(ModelConfig, nested, "model", base=cfg)
    for key in ("img_start_token_id", "img_end_token_id"):
        if key not in nested and getattr(cfg, key) == derived[key]:
            setattr(cfg, key, _image_token_ids({}, cfg.img_context_token_id)[key])
    return cfg


# ============================================================================ files


def _shard_files(path: str) -> tuple[list[str], str]:
    """Weight files of a checkpoint directory and their kind (``safetensors`` / ``bin``)."""
    for index, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        p = os.path.join(path, index)
        if os.path.exists(p):
            with open(p) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{p}: 'weight_map' is missing or empty")
            return [os.path.join(path, s) for s in dict.fromkeys(weight_map.values())], kind
    for single, kind in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        p = os.path.join(path, single)
        if os.path.exists(p):
            return [p], kind
    raise FileNotFoundError(f"{path}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json) "
                            f"(found: {', '.join(sorted(os.listdir(path)))})")


def iter_checkpoint(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor of a checkpoint directory, one shard at a time."""
    files, kind = _shard_files(path)
    for file in files:
        if not os.path.exists(file):
            raise FileNotFoundError(f"shard {file} named by the index is missing")
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            yield from sd.items()
            del sd


def checkpoint_names(path: str) -> list[str]:
    files, kind = _shard_files(path)
    if kind == "safetensors" and len(files) > 1:
        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            return list(json.load(f)["weight_map"])
    if kind == "safetensors":
        from safetensors import safe_open

        with safe_open(files[0], framework="pt") as f:
            return list(f.keys())
    return [n for n, _ in iter_checkpoint(path)]


def read_config(path: str) -> dict[str, Any]:
    p = os.path.join(path, "config.json")
    if not os.path.exists(p):
        raise FileNotFoundError(f"{path}: config.json is missing")
    with open(p) as f:
        return json.load(f)


# ============================================================================ load


@dataclass
class LoadingInfo:
    format: str
    missing: list[str] = field(default_factory=list)  # engine tensors the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)  # checkpoint tensors the engine has no place for
    ignored: list[str] = field(default_factory=list)  # checkpoint tensors deliberately not used, with reasons


def _as_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r} is unknown (known: {', '.join(table)})")
    return table[dtype]


def load_pretrained(path: str, dtype: Union[None, str, torch.dtype] = None, strict: bool = True,
                    config_overrides: Optional[Mapping[str, Any]] = None,
                    output_loading_info: bool = False):
    """Build an InternVLModel from a transformers ``internvl`` or ``internvl_chat`` directory.

    The config format comes from config.json's ``model_type``, the tensor-name format from the
    tensor names. ``dtype=None`` keeps the stored dtypes. ``strict``: missing or unexpected
    tensors are an error (otherwise missing ones keep their initialisation). A shape mismatch is
    always an error. ViT layers past ``select_layer`` are skipped and listed as ignored.
    """
    torch_dtype = _as_dtype(dtype)
    cfg, config_format = config_to_engine(read_config(path))
    cfg = _apply_overrides(cfg, config_overrides)
    validate_model(cfg)
    fmt = detect_key_format(checkpoint_names(path)) or config_format
    km = KEY_MAPS[fmt]

    if strict:
        with torch.device("meta"):
            model = InternVLModel(cfg, init=False)
    else:
        model = InternVLModel(cfg, init=True)
        if torch_dtype is not None:
            model.to(torch_dtype)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    built = _vit_built_layers(expected)
    tied = cfg.llm.tie_word_embeddings
    info = LoadingInfo(format=fmt)
    loaded: dict[str, torch.Tensor] = {}
    for name, tensor in iter_checkpoint(path):
        if km.is_ignored(name):
            info.ignored.append(f"{name} (rotary cache)")
            continue
        targets = km.to_engine(name)
        if targets is None:
            info.unexpected.append(name)
            continue
        for engine_name, cut in targets:
            if _unused_vit_layer(engine_name, built):
                info.ignored.append(f"{name} (ViT layer past select_layer={cfg.select_layer})")
                continue
            if tied and engine_name == "language_model.lm_head.weight":
                info.ignored.append(f"{name} (tie_word_embeddings=True: the LM head is the embedding)")
                continue
            if engine_name not in expected:
                info.unexpected.append(name if len(targets) == 1 else f"{name} -> {engine_name}")
                continue
            if engine_name in loaded:
                raise ValueError(f"{name} gives {engine_name} a second time (the checkpoint holds it under two names)")
            part = cut(tensor)
            if part.shape != expected[engine_name]:
                raise ValueError(f"shape mismatch for {name}" + (f" (-> {engine_name})" if engine_name != name else "")
                                 + f": checkpoint has {tuple(part.shape)}, model expects "
                                 f"{tuple(expected[engine_name])}")
            loaded[engine_name] = part.to(torch_dtype) if torch_dtype is not None and part.is_floating_point() else part
    if tied and "language_model.embed_tokens.weight" in loaded:
        loaded["language_model.lm_head.weight"] = loaded["language_model.embed_tokens.weight"].clone()
    info.missing = [k for k in expected if k not in loaded]
    if info.missing or info.unexpected:
        msg = []
        if info.missing:
            named = [f"{c[0]} (engine {k})" if (c := km.to_checkpoint(k)) else k for k in info.missing]
            msg.append(f"missing tensors: {_names(named)}")
        if info.unexpected:
            msg.append(f"unexpected tensors: {_names(info.unexpected)}")
        msg = f"{path} ({fmt} format): " + "; ".join(msg)
        if strict:
            raise KeyError(msg)
        warnings.warn(msg + " (missing ones keep their initialisation)")
    if strict:
        model.load_state_dict(loaded, strict=True, assign=True)
    else:
        model.load_state_dict(loaded, strict=False)
    model.eval()
    return (model, info) if output_loading_info else model


# ============================================================================ save


def _parse_size(size: Union[None, int, str]) -> Optional[int]:
    if size is None or isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or a size like '500MB' / '5GB'")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _write_safetensors(tensors: dict[str, torch.Tensor], path: str, max_shard_size: Optional[int]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sorted(tensors.items())}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if max_shard_size is not None and shards[-1] and size + n > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    for stale in ("model.safetensors", "model.safetensors.index.json"):
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_pretrained(model: InternVLModel, path: str, format: str = HF,
                    max_shard_size: Union[None, int, str] = None) -> None:
    """Write config.json + safetensors (sharded with an index above ``max_shard_size``).

    ``hf`` loads in ``transformers.InternVLForConditionalGeneration.from_pretrained``;
    ``internvl_chat`` is the original remote-code layout. Only the ViT layers the model built
    are written, with the feature layer set to the last of them.
    """
    _key_map(format)
    cfg = model.config
    sd = model.state_dict()
    if cfg.llm.tie_word_embeddings:
        emb, head = sd.get("language_model.embed_tokens.weight"), sd.get("language_model.lm_head.weight")
        if emb is not None and head is not None and not torch.equal(emb, head):
            raise ValueError("tie_word_embeddings=True but language_model.lm_head.weight differs from "
                             "language_model.embed_tokens.weight")
    expected = expected_tensors(cfg)
    missing = [k for k in expected if k not in sd]
    if missing:
        raise KeyError(f"model lacks tensors needed for export: {_names(missing)}")
    vit_layers = len(model.vision_model.layers)
    dtypes = {_dtype_name(t) for t in sd.values() if t.is_floating_point()}
    dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    if format == HF:
        config, tensors = engine_config_to_hf(cfg, vit_layers, dtype), engine_to_hf(sd, cfg)
    else:
        config, tensors = engine_config_to_chat(cfg, vit_layers, dtype), engine_to_chat(sd, cfg)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    _write_safetensors(tensors, path, _parse_size(max_shard_size))


def vit_layers_of(config: ModelConfig) -> int:
    """How many ViT layers the engine builds for ``config`` (those up to ``select_layer``)."""
    return _vit_built_layers(expected_tensors(config))


__all__ = [
    "HF", "CHAT", "FORMATS", "KeyMap", "Rule", "RowChunk", "KEY_MAPS", "LoadingInfo",
    "map_key", "export_key", "detect_key_format", "expected_tensors", "vit_layers_of",
    "hf_to_engine", "engine_to_hf", "chat_to_engine", "engine_to_chat",
    "hf_config_to_engine", "engine_config_to_hf", "chat_config_to_engine", "engine_config_to_chat",
    "config_to_engine", "iter_checkpoint", "read_config", "load_pretrained", "save_pretrained",
]
