"""Pixels from loader workers to the training process through reusable shared-memory slots.

Pickling a step's float32 tiles through a pipe costs about as much as making them. Instead each
worker makes a sample's pixels directly in a slot: a file in ``/dev/shm`` that it maps once and
reuses. Only ``(slot path, shape)`` travels; the training process maps the slot (once per slot),
copies the pixels into a tensor of its own and marks the slot free in its header byte, which the
worker reads before reusing it (a worker only reuses a slot the training process has released, and
adds a slot when none is free). Mapping each slot once keeps the kernel from faulting in fresh pages
for every sample, which otherwise costs more than the copy.

Slot files are named ``engine-loader-<training pid>-<loader>-<worker pid>-<n>``; a loader removes its
own when it closes and, when it starts, those of training processes that no longer run. Without a
writable ``/dev/shm`` pixels are pickled as before.
"""

from __future__ import annotations

import glob
import mmap
import os
from typing import Any

import numpy as np
import torch

SHM_DIR = "/dev/shm"
HEADER = 64  # bytes before a slot's pixels; byte 0 is 1 while the slot's pixels travel, 0 once copied out


def _prefix(owner: str) -> str:
    """``owner``: ``"<training pid>-<loader id>"``."""
    return os.path.join(SHM_DIR, f"engine-loader-{owner}-")


def owner_tag(loader: object) -> str:
    """The slot-file owner of a loader in this (the training) process."""
    return f"{os.getpid()}-{id(loader):x}"


def available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def _map(path: str, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)


class SlotRing:
    """A worker's slots. ``allocate(shape)`` -> a float32 array in a free slot; ``wire(array)`` -> what
    travels for it; ``release_unsent()`` frees the slots of a job's arrays that did not travel."""

    def __init__(self, owner: str) -> None:
        self.base = f"{_prefix(owner)}{os.getpid()}-"
        self.slots: list[list[Any]] = []  # [path, mapping]
        self.made: dict[int, tuple[int, tuple[int, ...]]] = {}  # array address -> (slot, shape)

    def allocate(self, shape: tuple[int, ...]) -> np.ndarray:
        need = HEADER + max(1, int(np.prod(shape)) * 4)
        busy = {k for k, _ in self.made.values()}
        k = next((k for k, (_, mm) in enumerate(self.slots) if k not in busy and mm[0] == 0), None)
        if k is None:
            k = len(self.slots)
            path = f"{self.base}{k}"
            self.slots.append([path, _map(path, need)])
        elif len(self.slots[k][1]) < need:  # grow (the old mapping closes once nothing views it)
            self.slots[k][1] = _map(self.slots[k][0], need)
        mm = self.slots[k][1]
        mm[0] = 1
        a = np.ndarray(shape, np.float32, mm, offset=HEADER)
        self.made[a.__array_interface__["data"][0]] = (k, tuple(shape))
        return a

    def wire(self, a: np.ndarray) -> Any:
        made = self.made.pop(a.__array_interface__["data"][0], None)
        return a if made is None else (self.slots[made[0]][0], made[1])

    def release_unsent(self) -> None:
        for k, _ in self.made.values():
            self.slots[k][1][0] = 0
        self.made.clear()


class SlotReader:
    """The training process's side: ``take(wire)`` -> a tensor of its own with the pixels."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.maps: dict[str, mmap.mmap] = {}

    def take(self, wire: Any) -> torch.Tensor:
        if isinstance(wire, np.ndarray):  # pickled (no /dev/shm)
            return torch.from_numpy(wire)
        path, shape = wire
        need = HEADER + max(1, int(np.prod(shape)) * 4)
        mm = self.maps.get(path)
        if mm is None or len(mm) < need:
            mm = self.maps[path] = _map(path, need)
        out = np.empty(shape, dtype=np.float32)
        np.copyto(out, np.ndarray(shape, np.float32, mm, offset=HEADER))
        mm[0] = 0  # the worker may reuse the slot
        return torch.from_numpy(out)

    def close(self) -> None:
        """Unmap, and remove the slot files of this loader's workers."""
        for mm in self.maps.values():
            try:
                mm.close()
            except BufferError:
                pass
        self.maps.clear()
        for path in glob.glob(_prefix(self.owner) + "*"):
            os.unlink(path)


def remove_orphans() -> None:
    """Remove the slot files of training processes that no longer run (killed before closing)."""
    for path in glob.glob(os.path.join(SHM_DIR, "engine-loader-*")):
        try:
            pid = int(os.path.basename(path).split("-")[2])
            os.kill(pid, 0)
        except (ValueError, IndexError):
            continue
        except ProcessLookupError:
            try:
                os.unlink(path)
            except OSError:
                pass
        except PermissionError:  # another user's live process
            continue
