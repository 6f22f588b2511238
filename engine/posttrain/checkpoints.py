"""Model weights from an engine run, an engine checkpoint or a transformers directory.

Accepted paths:

* an engine run directory (``config.yaml`` + ``checkpoints/latest``): its newest checkpoint;
* an engine checkpoint directory (``manifest.json``), saved under any layout; the run's
  ``config.yaml`` (two levels up), when present, supplies the data settings (tokenizer, tiling);
* a transformers ``internvl`` / ``internvl_chat`` directory (``config.json``).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from engine.checkpoint import CheckpointError, CheckpointManager, read_full_model
from engine.config import Config, load_config
from engine.models.hf_adapter import load_pretrained
from engine.models.internvl import InternVLModel


def _engine_dirs(path: str) -> Optional[tuple[str, str]]:
    """(checkpoint dir, run dir) of an engine run or checkpoint path, or None."""
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return path, os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, "config.yaml")):
        latest = CheckpointManager(os.path.join(path, "checkpoints")).latest()
        if latest is None:
            raise CheckpointError(f"{path} is a run directory without a complete checkpoint (checkpoints/latest)")
        return latest, path
    return None


def describe(path: str) -> str:
    """``engine`` or ``transformers``; an error naming the path otherwise."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path!r}: no such directory")
    if _engine_dirs(path) is not None:
        return "engine"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "transformers"
    raise CheckpointError(f"{path} is neither an engine run/checkpoint directory (config.yaml, manifest.json) nor a "
                          f"transformers directory (config.json)")


def load_model(path: str, device: str | torch.device = "cpu") -> tuple[InternVLModel, Optional[Config]]:
    """(model in eval mode, the run's Config when there is one)."""
    if describe(path) == "transformers":
        return load_pretrained(path).to(device).eval(), None
    ckpt, run = _engine_dirs(path)
    state, model_cfg = read_full_model(ckpt)
    config = os.path.join(run, "config.yaml")
    cfg = load_config(config) if os.path.isfile(config) else None
    model = InternVLModel(model_cfg, init=False)
    _load_strict(model, state, ckpt)
    return model.to(device).eval(), cfg


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{where} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                              f"shape mismatches {shapes[:5]} (is model.preset the one it was trained with?)")
    model.load_state_dict(state, strict=True)


def load_weights(model: InternVLModel, path: str) -> None:
    """Copy the weights at ``path`` into ``model`` (same architecture, strict)."""
    if describe(path) == "transformers":
        state = load_pretrained(path).state_dict()
    else:
        state, _ = read_full_model(_engine_dirs(path)[0])
    _load_strict(model, state, path)
