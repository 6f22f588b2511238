"""Safetensors files written one tensor at a time, and read one slice at a time.

``SafetensorsWriter`` writes the header (every name, dtype and shape) first and then each
tensor's bytes at its place, so a file of any size is written while holding one tensor in
memory. Files are standard safetensors: ``safetensors.safe_open`` reads them lazily.
``read_slice`` opens the file for one read and closes it again, so that memory-mapped pages of
large files do not accumulate in the reading process.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Optional, Sequence

import torch

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}
ALIGN = 8


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors")
    return DTYPE_NAMES[dtype]


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


class SafetensorsWriter:
    """``entries``: ``(name, dtype, shape)`` in file order. ``write`` each of them once, in any
    order, then ``close``; a missing tensor at ``close`` is an error naming it."""

    def __init__(self, path: str, entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: Optional[dict[str, str]] = None):
        self.path = path
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self._layout: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        offset = 0
        for name, dtype, shape in entries:
            if name in self._layout:
                raise ValueError(f"{path}: tensor {name!r} listed twice")
            shape = tuple(int(s) for s in shape)
            size = nbytes(shape, dtype)
            header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._layout[name] = (dtype, shape, offset)
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % ALIGN)
        self._data_start = 8 + len(raw)
        self._written: set[str] = set()
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._f.truncate(self._data_start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._layout:
            raise KeyError(f"{self.path}: tensor {name!r} is not in the header")
        if name in self._written:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        dtype, shape, offset = self._layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, the header "
                             f"says {dtype} {shape}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._f.seek(self._data_start + offset)
        if data.numel():
            self._f.write(memoryview(data.view(torch.uint8).numpy()))
        self._written.add(name)

    def close(self) -> None:
        missing = [n for n in self._layout if n not in self._written]
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if missing:
            raise ValueError(f"{self.path}: tensors never written: {', '.join(missing[:8])}")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()


def write_file(path: str, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """All of ``tensors`` to one file, tensor by tensor (no serialised copy of the whole dict)."""
    with SafetensorsWriter(path, [(k, t.dtype, t.shape) for k, t in tensors.items()], metadata) as w:
        for k, t in tensors.items():
            w.write(k, t)


def read_header(path: str) -> dict:
    """The header of a safetensors file; a clear error for a truncated or foreign file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated ({size} bytes): no safetensors header")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise ValueError(f"{path} is truncated or not a safetensors file: header of {n} bytes in a "
                             f"{size}-byte file")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path} is truncated: {size} bytes, its header needs {8 + n + end}")
    return header


def read_slice(path: str, name: str, index: Optional[tuple[slice, ...]] = None) -> torch.Tensor:
    """``tensor[index]`` of one tensor of a safetensors file (the whole tensor when index is None)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        if name not in f.keys():
            raise KeyError(f"{path} has no tensor {name!r}")
        if index is None:
            return f.get_tensor(name)
        sl = f.get_slice(name)
        if not index:  # a 0-dim tensor
            return f.get_tensor(name)
        return sl[index]
