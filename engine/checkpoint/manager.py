"""Atomic checkpoint directories.

Layout of a run's checkpoint root::

    checkpoints/
      step_00000100/            one published checkpoint
        manifest.json           written last: step, world size, the files every rank wrote
        rank_00000.pt           each rank's own state (model/optimizer shards, RNG, ...)
      latest                    text file naming the newest complete checkpoint

A save writes into ``.tmp-step_N``, every rank writes its own file, rank 0 writes the manifest,
renames the directory into place and only then rewrites ``latest`` (write + ``os.replace``).
A process killed at any point leaves the previous checkpoint and ``latest`` intact.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


class CheckpointManager:
    def __init__(self, root: str, keep_last: int = 2):
        self.root = root
        self.keep_last = keep_last

    # ------------------------------------------------------------------ paths
    def step_dir(self, step: int) -> str:
        return os.path.join(self.root, f"step_{step:08d}")

    def latest(self) -> Optional[str]:
        """Path of the newest complete checkpoint, or None when there is none."""
        marker = os.path.join(self.root, "latest")
        if not os.path.exists(marker):
            return None
        with open(marker) as f:
            name = f.read().strip()
        path = os.path.join(self.root, name)
        if not os.path.isdir(path):
            raise CheckpointError(f"{marker} names {name!r}, which does not exist in {self.root}")
        return path

    def published(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        return sorted(d for d in os.listdir(self.root) if d.startswith("step_") and
                      os.path.exists(os.path.join(self.root, d, MANIFEST)))

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: dict[str, Any], extra_files: Optional[Callable[[str], None]] = None) -> str:
        """Collective when distributed: every rank passes its own ``state``."""
        rank, world = _rank_world()
        final = self.step_dir(step)
        tmp = os.path.join(self.root, f".tmp-step_{step:08d}")
        if rank == 0:
            os.makedirs(self.root, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
        _barrier()
        path = os.path.join(tmp, rank_file(rank))
        torch.save(state, path + ".part")
        os.replace(path + ".part", path)
        if extra_files is not None and rank == 0:
            extra_files(tmp)
        _barrier()
        if rank == 0:
            files = sorted(os.listdir(tmp))
            missing = [rank_file(r) for r in range(world) if rank_file(r) not in files]
            if missing:
                raise CheckpointError(f"checkpoint step {step}: ranks did not write {missing}")
            manifest = {"step": step, "world_size": world, "files": files}
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump(manifest, f, indent=1)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            marker = os.path.join(self.root, "latest")
            with open(marker + ".part", "w") as f:
                f.write(os.path.basename(final))
            os.replace(marker + ".part", marker)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        for name in self.published()[: -self.keep_last]:
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    # ------------------------------------------------------------------ load
    @staticmethod
    def check(path: str) -> dict:
        """Manifest of a complete checkpoint, or a CheckpointError naming what is missing."""
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint directory {path} does not exist")
        mpath = os.path.join(path, MANIFEST)
        if not os.path.exists(mpath):
            raise CheckpointError(f"{path} is incomplete: {MANIFEST} is missing (the save did not finish)")
        try:
            with open(mpath) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{mpath} is unreadable: {e}") from None
        missing = [f for f in manifest.get("files", []) if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{path} is incomplete: missing {', '.join(missing)}")
        return manifest

    @staticmethod
    def load_rank(path: str, rank: int) -> dict:
        manifest = CheckpointManager.check(path)
        name = rank_file(rank)
        if name not in manifest["files"]:
            raise CheckpointError(f"{path} was saved by {manifest['world_size']} ranks and has no {name}")
        try:
            return torch.load(os.path.join(path, name), map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointError(f"{os.path.join(path, name)} is corrupt: {e}") from None
