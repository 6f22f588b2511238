"""The ``posttrain:`` section of a config file: mode, preference data, MPO weights, initial weights.

A post-training YAML is an ordinary engine config plus one extra top-level section::

    posttrain:
      mode: mpo            # sft | mpo | prm
      init: runs/sft_8b    # initial weights: engine run dir, checkpoint dir or transformers dir ("" = random)
      data: data/mmpr/meta.json   # mpo: preference pairs (meta JSON or JSONL)
      mpo:
        pref_weight: 0.8   # DPO (sigmoid)
        quality_weight: 0.2  # BCO (pair)
        gen_weight: 1.0    # LM loss on the chosen response
        beta: 0.1
        reference: model   # model (frozen copy) | precomputed (first pass)

``load_posttrain_config`` splits the file: the engine's own sections go to ``engine.config``,
this one to ``PostTrainConfig``. Overrides starting with ``posttrain.`` go here.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

import yaml

from engine.config import Config, ConfigError, _build, apply_override, config_from_dict, read_yaml, validate_config

MODES = ("sft", "mpo", "prm")
REFERENCE_MODES = ("model", "precomputed")


@dataclass
class MPOConfig:
    """Loss = pref_weight * DPO + quality_weight * BCO + gen_weight * LM (InternVL3: 0.8 / 0.2 / 1)."""

    pref_weight: float = 0.8
    quality_weight: float = 0.2
    gen_weight: float = 1.0
    beta: float = 0.1
    reference: str = "model"  # model | precomputed


@dataclass
class PRMConfig:
    """Label tokens of the process reward model; a step's score is P(plus) against P(minus)."""

    plus: str = "+"
    minus: str = "-"


@dataclass
class PostTrainConfig:
    mode: str = "sft"
    init: str = ""
    data: str = ""
    mpo: MPOConfig = field(default_factory=MPOConfig)
    prm: PRMConfig = field(default_factory=PRMConfig)


def validate_posttrain(pt: PostTrainConfig, cfg: Optional[Config] = None) -> None:
    """Raise ConfigError naming the offending ``posttrain.*`` key."""
    if pt.mode not in MODES:
        raise ConfigError(f"posttrain.mode={pt.mode!r} must be one of {', '.join(MODES)}")
    m = pt.mpo
    for key in ("pref_weight", "quality_weight", "gen_weight"):
        value = getattr(m, key)
        if not value >= 0:
            raise ConfigError(f"posttrain.mpo.{key}={value} must be >= 0")
    if m.pref_weight + m.quality_weight + m.gen_weight <= 0:
        raise ConfigError("posttrain.mpo: pref_weight, quality_weight and gen_weight are all 0")
    if not m.beta > 0:
        raise ConfigError(f"posttrain.mpo.beta={m.beta} must be positive")
    if m.reference not in REFERENCE_MODES:
        raise ConfigError(f"posttrain.mpo.reference={m.reference!r} must be one of {', '.join(REFERENCE_MODES)}")
    if pt.mode == "mpo" and not pt.data:
        raise ConfigError("posttrain.data is empty: posttrain.mode=mpo needs a preference meta JSON or JSONL")
    if pt.mode == "mpo" and pt.data and not os.path.exists(pt.data):
        raise ConfigError(f"posttrain.data={pt.data!r}: file not found")
    if pt.init and not os.path.exists(pt.init):
        raise ConfigError(f"posttrain.init={pt.init!r}: no such checkpoint, run or transformers directory")
    if not pt.prm.plus or not pt.prm.minus or pt.prm.plus == pt.prm.minus:
        raise ConfigError(f"posttrain.prm.plus={pt.prm.plus!r} and posttrain.prm.minus={pt.prm.minus!r} must be "
                          "two different non-empty strings")


def posttrain_from_dict(data: Optional[dict]) -> PostTrainConfig:
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"posttrain: expected a mapping, got {data!r}")
    return _build(PostTrainConfig, data or {}, "posttrain")


def load_posttrain_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                          validate: bool = True) -> tuple[Config, PostTrainConfig]:
    """(engine Config, PostTrainConfig) from one YAML file and ``key=value`` overrides."""
    data = dict(read_yaml(path))
    pt = posttrain_from_dict(data.pop("posttrain", None))
    cfg = config_from_dict(data)
    for ov in overrides or []:
        key = ov.split("=", 1)[0].strip()
        if key == "posttrain" or key.startswith("posttrain."):
            try:
                apply_override(pt, ov.split(".", 1)[1] if "." in key else ov)
            except ConfigError as e:
                msg = str(e)
                quoted = msg.startswith("unknown config key") or msg.startswith("'")
                raise ConfigError(msg.replace("'", "'posttrain.", 1) if quoted else "posttrain." + msg) from None
        else:
            apply_override(cfg, ov)
    if validate:
        validate_config(cfg)
        validate_posttrain(pt, cfg)
    return cfg, pt


def posttrain_to_dict(pt: PostTrainConfig) -> dict:
    return dataclasses.asdict(pt)


def save_posttrain_config(pt: PostTrainConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump({"posttrain": posttrain_to_dict(pt)}, f, sort_keys=False)
