"""Checkpoints: layout-independent sharded state, atomic publication, conversion to and from transformers."""

from engine.checkpoint.manager import CheckpointError, CheckpointManager  # noqa: F401
from engine.checkpoint.state import (KIND_TRAIN, KIND_WEIGHTS, Loaded, load_checkpoint,  # noqa: F401
                                     save_checkpoint, scheduler_state)
from engine.checkpoint.store import CheckpointReader  # noqa: F401
