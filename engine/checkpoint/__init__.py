"""Checkpoints: atomic publication, a ``latest`` marker, keep-last-K, clear errors on damage."""

from engine.checkpoint.manager import CheckpointError, CheckpointManager  # noqa: F401
