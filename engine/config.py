"""Typed configuration: dataclasses, YAML presets, dotted overrides, validation.

A config is loaded from YAML (``load_config``), patched with ``--set a.b=c`` overrides
and validated before any process group or model exists. Every error names the key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown, mistyped or holds an impossible value."""


# ----------------------------------------------------------------------------- model


@dataclass
class VisionConfig:
    """InternViT. ``norm_type='layer_norm'`` + ``qkv_bias`` is the 300M flavour;
    ``'rms_norm'`` + ``qk_normalization`` (over the full hidden size) is the 6B flavour."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    norm_type: str = "layer_norm"  # layer_norm | rms_norm
    qkv_bias: bool = True
    qk_normalization: bool = False
    layer_norm_eps: float = 1e-6
    layer_scale_init: float = 0.1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class LLMConfig:
    """Qwen2.5-style decoder: GQA, q/k/v bias, SwiGLU, RMSNorm, untied LM head."""

    vocab_size: int = 151674
    hidden_size: int = 3584
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    intermediate_size: int = 18944
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class ModelConfig:
    preset: str = "tiny"
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    downsample_ratio: float = 0.5
    ps_version: str = "v2"  # v1 | v2
    select_layer: int = -1
    projector_ln_eps: float = 1e-5
    img_context_token_id: int = 151667
    img_start_token_id: int = 151665
    img_end_token_id: int = 151666
    v2pe_delta: float = 1.0  # visual position step used when positions are not given
    initializer_range: float = 0.02

    @property
    def num_image_token(self) -> int:
        side = self.vision.image_size // self.vision.patch_size
        return int(side * self.downsample_ratio) ** 2

    @property
    def projector_in(self) -> int:
        return int(self.vision.hidden_size / self.downsample_ratio**2)


# ----------------------------------------------------------------------------- data / train


# ---------------------------------------------------------------------- model presets
# The InternVL3 family with its real dimensions, and tiny CPU models (``model.preset``).

VIT_300M = VisionConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                        norm_type="layer_norm", qkv_bias=True, qk_normalization=False)
VIT_6B = VisionConfig(hidden_size=3200, num_layers=45, num_heads=25, intermediate_size=12800,
                      norm_type="rms_norm", qkv_bias=False, qk_normalization=True)


def _tiny(name: str, vision: VisionConfig) -> ModelConfig:
    """A tiny preset: ``vision`` with a 4-layer LLM; token ids are those of the synthetic sentencepiece
    tokenizer (tools/make_synthetic_data.py)."""
    llm = LLMConfig(vocab_size=512, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256,
                    rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=8192)
    return ModelConfig(preset=name, vision=vision, llm=llm, img_context_token_id=7, img_start_token_id=5,
                       img_end_token_id=6)


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
    "tiny": _tiny("tiny", VisionConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, image_size=112,
                                       patch_size=14, norm_type="layer_norm", qkv_bias=True, qk_normalization=False)),
    # Tiny model with the 6B-style ViT (RMSNorm, qk-norm over the full hidden size, no qkv bias).
    "tiny-6b-vit": _tiny("tiny-6b-vit", VisionConfig(hidden_size=60, num_layers=2, num_heads=5, intermediate_size=128,
                                                     image_size=112, patch_size=14, norm_type="rms_norm",
                                                     qkv_bias=False, qk_normalization=True)),
}


def preset_model_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"model.preset={name!r} is unknown (known: {', '.join(PRESETS)})")
    return copy.deepcopy(PRESETS[name])


@dataclass
class DataConfig:
    meta_path: str = "data/synthetic/meta.json"  # InternVL meta JSON (multimodal data)
    text_corpus: str = "data/synthetic/text.jsonl"  # plain-text corpus ("" = none)
    tokenizer: str = "data/synthetic/tokenizer.model"  # sentencepiece .model or HF tokenizer dir
    lm_ratio: float = 0.25  # share of language-only tokens (1:3 language:multimodal)
    max_packed_tokens: int = 4096
    max_sample_tokens: int = 4096  # longer samples are skipped and counted
    max_dynamic_patch: int = 12
    min_dynamic_patch: int = 1
    use_thumbnail: bool = True
    jpeg_aug_prob: float = 0.0  # random JPEG compression augmentation
    loss_reduction: str = "square"  # token | sample | square
    v2pe_random_delta: bool = False  # draw delta per image from {1/256 .. 1} when training
    v2pe_delta: float = 1.0  # fixed delta when not random
    num_workers: int = 0  # loader processes per rank (0: load in the training process)
    prefetch: bool = True  # with workers: load the next step's share while this step runs
    index_dir: str = ""  # where shape indexes are cached ("": beside each annotation file)
    index_workers: int = 8  # processes that build a shape index (capped by the CPU count)
    system_prompt: Optional[str] = None  # None: InternVL's internvl2_5 system prompt
    synthetic: bool = True  # `make train` generates the synthetic set if absent


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 1234
    global_batch: int = 16  # samples per optimizer step (over all data-parallel ranks)
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "auto"  # autocast: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    param_dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 (fp32 main grads and masters)
    activation_checkpointing: bool = False
    freeze_vit: bool = False
    init_from: str = ""  # transformers `internvl` / `internvl_chat` directory with the initial weights
    log_interval: int = 1
    save_interval: int = 0  # 0 = only at the end
    keep_last: int = 2
    async_save: bool = False  # write checkpoints in a background thread (final and signal saves wait)
    resume: str = "auto"  # auto (latest in run dir) | none | path
    max_bad_steps: int = 5  # consecutive skipped (non-finite / spiking) steps before the run stops
    spike_factor: float = 0.0  # skip a step whose loss exceeds this x the max of recent good losses (0: off)
    spike_window: int = 100  # how many recent good losses the spike guard looks at
    hang_timeout_s: float = 0.0  # a rank stuck this long in one phase logs it and exits (status 4); 0: off
    progress: bool = True
    tensorboard: bool = True
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class LLMParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    hp: int = 1
    sp: bool = False
    microbatches: int = 1


@dataclass
class ViTParallelConfig:
    tp: int = 1
    hp: int = 1
    sp: bool = False


@dataclass
class ParallelConfig:
    llm: LLMParallelConfig = field(default_factory=LLMParallelConfig)
    vit: ViTParallelConfig = field(default_factory=ViTParallelConfig)
    zero1: bool = False
    bucket_mb: float = 25.0


@dataclass
class BalanceConfig:
    enabled: bool = False
    cost_file: str = ""  # JSON written by tools/calibrate_cost.py ("" = default coefficients)


@dataclass
class KernelsConfig:
    rotary: str = "auto"  # auto | triton | reference
    pixel_shuffle: str = "auto"
    loss: str = "auto"


@dataclass
class EvalConfig:
    """Held-out evaluation during training: the loss (same token weighting) over a fixed set."""

    meta_path: str = ""  # InternVL meta JSON of the held-out data
    text_corpus: str = ""  # optional held-out text corpus, mixed at data.lm_ratio
    interval: int = 0  # evaluate every this many steps (0: never)
    samples: int = 64  # the first this many samples of the held-out order; a multiple of train.global_batch


@dataclass
class FaultsConfig:
    """Fault drills: deliberate failures, for the tests and for checking a new cluster."""

    nan_at_steps: list[int] = field(default_factory=list)  # steps whose loss becomes NaN on one rank
    stall_rank: int = -1  # this rank stalls (sleeps) ...
    stall_at_step: int = 0  # ... at the start of this step ...
    stall_seconds: float = 0.0  # ... for this long (a hang drill for train.hang_timeout_s)


@dataclass
class RunConfig:
    dir: str = ""  # default: runs/<name>
    name: str = "run"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> str:
        return self.run.dir or os.path.join("runs", self.run.name)


# ----------------------------------------------------------------------------- building


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to ``typ`` or raise ConfigError."""
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[T]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or value == "null":
            return None
        return _coerce(value, args[0], key)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    if dataclasses.is_dataclass(typ):
        if isinstance(value, typ):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(typ, value, key)
    return value


def _build(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    obj = base if base is not None else cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in (data or {}).items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(names))})")
        typ = hints[k]
        if dataclasses.is_dataclass(typ) and isinstance(v, dict):
            setattr(obj, k, _build(typ, v, key, base=getattr(obj, k)))
        else:
            setattr(obj, k, _coerce(v, typ, key))
    return obj


def _deep_update(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v
    return dst


def apply_override(cfg: Config, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML scalar)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key=value")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            known = ", ".join(sorted(f.name for f in dataclasses.fields(obj))) if dataclasses.is_dataclass(obj) else ""
            raise ConfigError(f"unknown config key '{path}'" + (f" (known: {known})" if known else ""))
        if i == len(parts) - 1:
            typ = typing.get_type_hints(type(obj))[part]
            if dataclasses.is_dataclass(typ):
                raise ConfigError(f"'{key}' is a section; set one of its keys instead")
            value = yaml.safe_load(raw) if raw.strip() else ""
            if typ is str and not isinstance(value, str):
                value = raw
            setattr(obj, part, _coerce(value, typ, key))
        else:
            obj = getattr(obj, part)
    if parts[:2] == ["model", "preset"]:
        raise ConfigError("model.preset cannot be overridden on the command line; use a config file")


def config_from_dict(data: dict) -> Config:
    """Build a Config; ``model.preset`` first fills the model dimensions, explicit keys win."""
    data = dict(data or {})
    model = dict(data.get("model") or {})
    preset = model.get("preset", "tiny")
    base = Config()
    base.model = preset_model_config(preset)
    return _build(Config, _deep_update({}, data), base=base)


def read_yaml(path: Optional[str]) -> dict:
    """The top-level mapping of a YAML config file ({} for no file)."""
    if not path:
        return {}
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None, validate: bool = True) -> Config:
    cfg = config_from_dict(read_yaml(path))
    for ov in overrides or []:
        apply_override(cfg, ov)
    if validate:
        validate_config(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


# ----------------------------------------------------------------------------- validation


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _choice(value: str, key: str, choices: tuple) -> None:
    _check(value in choices, f"{key}={value!r} must be one of {', '.join(choices)}")


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
    v, l = m.vision, m.llm
    for key, val in [("vision.hidden_size", v.hidden_size), ("vision.num_layers", v.num_layers),
                     ("vision.num_heads", v.num_heads), ("llm.hidden_size", l.hidden_size),
                     ("llm.num_layers", l.num_layers), ("llm.num_heads", l.num_heads),
                     ("llm.num_kv_heads", l.num_kv_heads), ("llm.vocab_size", l.vocab_size)]:
        _check(val > 0, f"{prefix}.{key}={val} must be positive")
    _check(v.hidden_size % v.num_heads == 0,
           f"{prefix}.vision.hidden_size={v.hidden_size} must be divisible by {prefix}.vision.num_heads={v.num_heads}")
    _check(l.hidden_size % l.num_heads == 0,
           f"{prefix}.llm.hidden_size={l.hidden_size} must be divisible by {prefix}.llm.num_heads={l.num_heads}")
    _check(l.num_heads % l.num_kv_heads == 0,
           f"{prefix}.llm.num_heads={l.num_heads} must be divisible by {prefix}.llm.num_kv_heads={l.num_kv_heads}")
    _check(l.head_dim % 2 == 0, f"{prefix}.llm head_dim={l.head_dim} must be even for rotary embeddings")
    _check(v.image_size % v.patch_size == 0,
           f"{prefix}.vision.image_size={v.image_size} must be divisible by patch_size={v.patch_size}")
    side = v.image_size // v.patch_size
    _check(math.isclose(side * m.downsample_ratio, round(side * m.downsample_ratio)),
           f"{prefix}.downsample_ratio={m.downsample_ratio} must divide the patch grid side {side}")
    _check(m.downsample_ratio == 0.5, f"{prefix}.downsample_ratio={m.downsample_ratio}: only 0.5 is supported")
    _choice(m.ps_version, f"{prefix}.ps_version", ("v1", "v2"))
    _choice(v.norm_type, f"{prefix}.vision.norm_type", ("layer_norm", "rms_norm"))
    _check(-v.num_layers <= m.select_layer < v.num_layers and m.select_layer != 0 or m.select_layer == -1,
           f"{prefix}.select_layer={m.select_layer} out of range for {v.num_layers} ViT layers")
    _check(0 < m.v2pe_delta <= 1, f"{prefix}.v2pe_delta={m.v2pe_delta} must be in (0, 1]")
    for key in ("img_context_token_id", "img_start_token_id", "img_end_token_id"):
        val = getattr(m, key)
        _check(0 <= val < l.vocab_size, f"{prefix}.{key}={val} outside the vocabulary (llm.vocab_size={l.vocab_size})")


def validate_parallel(cfg: Config, world_size: Optional[int] = None) -> None:
    """Layout rules; with ``world_size`` also the factorisation of the world."""
    p, m = cfg.parallel, cfg.model
    L, V = p.llm, p.vit
    for key, val in [("llm.tp", L.tp), ("llm.pp", L.pp), ("llm.vpp", L.vpp), ("llm.hp", L.hp),
                     ("llm.microbatches", L.microbatches), ("vit.tp", V.tp), ("vit.hp", V.hp)]:
        _check(val >= 1, f"parallel.{key}={val} must be >= 1")
    _check(m.llm.num_heads % L.tp == 0,
           f"parallel.llm.tp={L.tp} must divide model.llm.num_heads={m.llm.num_heads}")
    kv = m.llm.num_kv_heads
    _check(kv % L.tp == 0 or L.tp % kv == 0,
           f"parallel.llm.tp={L.tp} and model.llm.num_kv_heads={kv}: one must divide the other")
    _check(m.llm.intermediate_size % L.tp == 0,
           f"parallel.llm.tp={L.tp} must divide model.llm.intermediate_size={m.llm.intermediate_size}")
    _check(m.vision.intermediate_size % V.tp == 0,
           f"parallel.vit.tp={V.tp} must divide model.vision.intermediate_size={m.vision.intermediate_size}")
    if L.hp > 1:
        heads_per = m.llm.num_heads // L.tp
        _check(heads_per % L.hp == 0,
               f"parallel.llm.hp={L.hp} must divide the attention heads per tp rank ({m.llm.num_heads}/{L.tp}={heads_per})")
        kv_per = max(kv // L.tp, 1)
        _check(kv_per % L.hp == 0 or L.hp % kv_per == 0,
               f"parallel.llm.hp={L.hp} and kv heads per tp rank ({kv_per}): one must divide the other")
    if V.hp > 1:
        vheads = -(-m.vision.num_heads // V.tp) * V.tp // V.tp
        _check(vheads % V.hp == 0,
               f"parallel.vit.hp={V.hp} must divide the ViT heads per tp rank ({vheads})")
    stages = L.pp * L.vpp
    _check(m.llm.num_layers >= stages,
           f"model.llm.num_layers={m.llm.num_layers} is fewer than parallel.llm.pp*vpp={stages} pipeline stages")
    if L.vpp > 1:
        _check(L.pp > 1, f"parallel.llm.vpp={L.vpp} needs parallel.llm.pp > 1")
        _check(L.microbatches % L.pp == 0,
               f"parallel.llm.microbatches={L.microbatches} must be a multiple of parallel.llm.pp={L.pp} "
               f"for the interleaved schedule (vpp={L.vpp})")
    if L.pp > 1:
        _check(L.microbatches >= L.pp,
               f"parallel.llm.microbatches={L.microbatches} must be >= parallel.llm.pp={L.pp}")
    if L.sp:
        _check(L.tp > 1, "parallel.llm.sp=true needs parallel.llm.tp > 1")
    if V.sp:
        _check(V.tp > 1, "parallel.vit.sp=true needs parallel.vit.tp > 1")
    if world_size is not None:
        llm_model = L.tp * L.pp * L.hp
        _check(world_size % llm_model == 0,
               f"world size {world_size} is not divisible by parallel.llm.tp*pp*hp={L.tp}*{L.pp}*{L.hp}={llm_model}")
        vit_model = V.tp * V.hp
        _check(world_size % vit_model == 0,
               f"world size {world_size} is not divisible by parallel.vit.tp*hp={V.tp}*{V.hp}={vit_model}")
        dp = world_size // llm_model
        _check(cfg.train.global_batch % (dp * L.microbatches) == 0,
               f"train.global_batch={cfg.train.global_batch} must be divisible by llm data-parallel size {dp} "
               f"x parallel.llm.microbatches={L.microbatches}")


def validate_config(cfg: Config, world_size: Optional[int] = None) -> None:
    validate_model(cfg.model)
    d, t = cfg.data, cfg.train
    _choice(d.loss_reduction, "data.loss_reduction", ("token", "sample", "square"))
    _check(0.0 <= d.lm_ratio < 1.0, f"data.lm_ratio={d.lm_ratio} must be in [0, 1)")
    _check(d.max_packed_tokens > 0, f"data.max_packed_tokens={d.max_packed_tokens} must be positive")
    _check(d.max_sample_tokens <= d.max_packed_tokens,
           f"data.max_sample_tokens={d.max_sample_tokens} exceeds data.max_packed_tokens={d.max_packed_tokens}")
    _check(1 <= d.min_dynamic_patch <= d.max_dynamic_patch,
           f"data.min_dynamic_patch={d.min_dynamic_patch} / data.max_dynamic_patch={d.max_dynamic_patch} invalid")
    _check(0.0 <= d.jpeg_aug_prob <= 1.0, f"data.jpeg_aug_prob={d.jpeg_aug_prob} must be in [0, 1]")
    _check(0 < d.v2pe_delta <= 1, f"data.v2pe_delta={d.v2pe_delta} must be in (0, 1]")
    _check(d.num_workers >= 0, f"data.num_workers={d.num_workers} must be >= 0")
    _check(d.index_workers >= 0, f"data.index_workers={d.index_workers} must be >= 0")
    _check(t.steps >= 0, f"train.steps={t.steps} must be >= 0")
    _check(t.global_batch >= 1, f"train.global_batch={t.global_batch} must be >= 1")
    _check(t.lr > 0, f"train.lr={t.lr} must be positive")
    _check(0 <= t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must be in [0, train.lr={t.lr}]")
    _check(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0")
    _check(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be >= 0")
    _check(t.keep_last >= 1, f"train.keep_last={t.keep_last} must be >= 1")
    _check(t.max_bad_steps >= 1, f"train.max_bad_steps={t.max_bad_steps} must be >= 1")
    _check(t.spike_factor == 0 or t.spike_factor > 1,
           f"train.spike_factor={t.spike_factor} must be 0 (off) or > 1")
    _check(t.spike_window >= 1, f"train.spike_window={t.spike_window} must be >= 1")
    _check(t.hang_timeout_s >= 0, f"train.hang_timeout_s={t.hang_timeout_s} must be >= 0 (0: off)")
    f = cfg.faults
    _check(f.stall_seconds >= 0, f"faults.stall_seconds={f.stall_seconds} must be >= 0")
    if world_size is not None and f.stall_seconds > 0:
        _check(0 <= f.stall_rank < world_size, f"faults.stall_rank={f.stall_rank} is not a rank of a world of {world_size}")
    e = cfg.eval
    _check(e.interval >= 0, f"eval.interval={e.interval} must be >= 0")
    if e.interval:
        _check(bool(e.meta_path), f"eval.interval={e.interval} needs eval.meta_path (the held-out data)")
        for key, path in (("eval.meta_path", e.meta_path), ("eval.text_corpus", e.text_corpus)):
            _check(not path or os.path.isfile(path), f"{key}={path!r}: file not found")
        _check(e.samples >= 1 and e.samples % t.global_batch == 0,
               f"eval.samples={e.samples} must be a positive multiple of train.global_batch={t.global_batch}")
    nan_steps = cfg.faults.nan_at_steps
    _check(isinstance(nan_steps, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                                               for s in nan_steps),
           f"faults.nan_at_steps={nan_steps!r} must be a list of step numbers >= 1")
    _choice(t.dtype, "train.dtype", ("auto", "float32", "bfloat16"))
    _choice(t.param_dtype, "train.param_dtype", ("auto", "float32", "bfloat16"))
    if t.param_dtype == "bfloat16" and t.dtype == "float32":
        raise ConfigError("train.param_dtype=bfloat16 needs bf16 autocast (train.dtype=auto or bfloat16), not "
                          "train.dtype=float32: norm gains and biases stay float32")
    _choice(t.device, "train.device", ("auto", "cpu", "cuda"))
    for k in ("rotary", "pixel_shuffle", "loss"):
        _choice(getattr(cfg.kernels, k), f"kernels.{k}", ("auto", "triton", "reference"))
    validate_parallel(cfg, world_size)
