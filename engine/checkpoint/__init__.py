"""Checkpoints: layout-independent sharded state, atomic publication, conversion to and from transformers."""

from engine.checkpoint.manager import CheckpointError, CheckpointManager
from engine.checkpoint.state import (KIND_TRAIN, KIND_WEIGHTS, Loaded, load_checkpoint, read_full_model,
                                     save_checkpoint, scheduler_state)
from engine.checkpoint.store import CheckpointReader

__all__ = ["CheckpointError", "CheckpointManager", "CheckpointReader", "KIND_TRAIN", "KIND_WEIGHTS", "Loaded",
           "load_checkpoint", "read_full_model", "save_checkpoint", "scheduler_state"]
