"""Atomic checkpoint directories.

Layout of a run's checkpoint root::

    checkpoints/
      step_00000100/            one published checkpoint
        manifest.json           written last: step, world size, every file with its size in bytes
        ...                     the files the ranks wrote (see ``engine.checkpoint.state``)
      latest                    text file naming the newest complete checkpoint

A save writes into ``.tmp-step_N``: every rank writes its own files, the ranks agree that all
of them succeeded, rank 0 completes the directory (``finalize``), writes the manifest, renames
the directory into place and only then rewrites ``latest`` (write + ``os.replace``). A process
killed at any point leaves the previous checkpoint and ``latest`` intact; the unpublished
``.tmp-step_N`` is removed by the next save of that step.

With ``async_save`` the ranks' writes run in a background thread (the state handed to ``save``
must then be a snapshot) and the checkpoint is published by the next ``save`` or ``wait``, both
collective calls on the main thread; until then ``latest`` names the previous checkpoint.

The directory must be on a file system all ranks share. Fault injection for tests:
``ENGINE_CHECKPOINT_SAVE_DELAY=STEP:SECONDS`` makes every rank sleep after writing its files of
the save at ``STEP``, before the checkpoint is published.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import traceback
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist

MANIFEST = "manifest.json"
log = logging.getLogger("engine.checkpoint")

Writer = Callable[[str], list[str]]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt, or does not fit the model."""


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _all_gather(obj: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _agree(ok: bool) -> bool:
    """Whether every rank says ok (all-reduce of a flag; every rank returns the same)."""
    if dist.is_available() and dist.is_initialized():
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    return ok


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _fault_delay(step: int) -> None:
    spec = os.environ.get("ENGINE_CHECKPOINT_SAVE_DELAY", "")
    if spec:
        at, seconds = spec.split(":")
        if int(at) == step:
            time.sleep(float(seconds))


class _Pending:
    def __init__(self, step: int, tmp: str, write: Writer, finalize: Optional[Callable[[str], None]]):
        self.step, self.tmp, self.finalize = step, tmp, finalize
        self.files: list[str] = []
        self.error: Optional[str] = None
        self.thread: Optional[threading.Thread] = None
        self._write = write

    def run(self) -> None:
        try:
            self.files = list(self._write(self.tmp))
            _fault_delay(self.step)
        except BaseException:
            self.error = traceback.format_exc(limit=4)


class CheckpointManager:
    def __init__(self, root: str, keep_last: int = 2, async_save: bool = False):
        self.root = root
        self.keep_last = keep_last
        self.async_save = async_save
        self.last_step: Optional[int] = None  # step of the last checkpoint this manager published
        self._pending: Optional[_Pending] = None

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
        old = os.path.join(self.root, ".old-" + name)
        if not os.path.isdir(path) and os.path.isdir(old):  # killed while replacing a save of the same step
            log.warning("%s is being replaced; using its previous copy %s", path, old)
            return old
        if not os.path.isdir(path):
            raise CheckpointError(f"{marker} names {name!r}, which does not exist in {self.root}")
        return path

    def published(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        return sorted(d for d in os.listdir(self.root) if d.startswith("step_") and
                      os.path.exists(os.path.join(self.root, d, MANIFEST)))

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: Union[dict, Writer], finalize: Optional[Callable[[str], None]] = None,
             blocking: Optional[bool] = None) -> str:
        """Collective when distributed. ``state``: ``write(tmp_dir) -> [file names]`` writing this
        rank's files, or a dict saved as ``rank_NNNNN.pt``. ``finalize(tmp_dir)`` runs on rank 0
        once every rank's files are complete. Returns the checkpoint's final path."""
        self.wait()
        rank, _ = _rank_world()
        write: Writer = state if callable(state) else self._dict_writer(state, rank)
        tmp = os.path.join(self.root, f".tmp-step_{step:08d}")
        if rank == 0:
            os.makedirs(self.root, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
        _barrier()
        pending = _Pending(step, tmp, write, finalize)
        if blocking is False or (blocking is None and self.async_save):
            pending.thread = threading.Thread(target=pending.run, name=f"checkpoint-step-{step}", daemon=True)
            pending.thread.start()
            self._pending = pending
        else:
            pending.run()
            self._publish(pending)
        return self.step_dir(step)

    @staticmethod
    def _dict_writer(state: dict, rank: int) -> Writer:
        def write(tmp: str) -> list[str]:
            path = os.path.join(tmp, rank_file(rank))
            torch.save(state, path + ".part")
            os.replace(path + ".part", path)
            return [rank_file(rank)]
        return write

    def wait(self) -> Optional[str]:
        """Collective: finish and publish a pending asynchronous save; its path, or None."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending.thread is not None:
            pending.thread.join()
        self._publish(pending)
        return self.step_dir(pending.step)

    def _publish(self, p: _Pending) -> None:
        rank, world = _rank_world()
        results = _all_gather((p.error, p.files))
        failed = [(r, err) for r, (err, _) in enumerate(results) if err is not None]
        if failed:
            r, err = failed[0]
            raise CheckpointError(f"checkpoint step {p.step} not published: rank {r} failed to write:\n{err}")
        error = None
        if rank == 0:
            try:
                self._complete(p, [f for _, files in results for f in files], world)
            except Exception as e:  # noqa: BLE001 - every rank must learn of it
                error = f"checkpoint step {p.step} not published: {e}"
        if not _agree(error is None):
            raise CheckpointError(error or f"checkpoint step {p.step} not published: rank 0 failed to complete it "
                                           f"(see its log)")
        _barrier()
        self.last_step = p.step

    def _complete(self, p: _Pending, expected: list[str], world: int) -> None:
        present = set(os.listdir(p.tmp))
        missing = [f for f in expected if f not in present]
        if missing:
            raise CheckpointError(f"files {missing} were written but are not in {p.tmp}")
        if p.finalize is not None:
            p.finalize(p.tmp)
        files = {f: os.path.getsize(os.path.join(p.tmp, f)) for f in sorted(os.listdir(p.tmp))}
        manifest = {"step": p.step, "world_size": world, "files": files}
        with open(os.path.join(p.tmp, MANIFEST + ".part"), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(os.path.join(p.tmp, MANIFEST + ".part"), os.path.join(p.tmp, MANIFEST))
        final = self.step_dir(p.step)
        old = os.path.join(self.root, f".old-step_{p.step:08d}")
        if os.path.exists(final):
            if os.path.exists(old):
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(p.tmp, final)
        marker = os.path.join(self.root, "latest")
        with open(marker + ".part", "w") as f:
            f.write(os.path.basename(final))
        os.replace(marker + ".part", marker)
        shutil.rmtree(old, ignore_errors=True)
        self._prune(os.path.basename(final))

    def _prune(self, keep: str) -> None:
        for name in self.published()[: -self.keep_last]:
            if name != keep:
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
        files = manifest.get("files", {})
        if isinstance(files, list):
            files = {f: None for f in files}
        manifest["files"] = files
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{path} is incomplete: missing {', '.join(missing)}")
        for f, size in files.items():
            actual = os.path.getsize(os.path.join(path, f))
            if size is not None and actual != size:
                raise CheckpointError(f"{os.path.join(path, f)} is truncated or altered: {actual} bytes, "
                                      f"the manifest says {size}")
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
