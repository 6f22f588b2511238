"""Read slices of single engine tensors straight from a transformers checkpoint directory.

``CheckpointSliceReader`` serves ``internvl`` (``hf``) and ``internvl_chat`` directories
(``model.safetensors`` or sharded with ``model.safetensors.index.json``; ``pytorch_model.bin``
(``.index.json``) as a fallback) by engine tensor name, so that a rank can read only the rows or
columns it owns. safetensors files stay open (one memory-mapped handle per shard; with
``keep_open=False`` they are closed after every read) and a slice is cut with ``get_slice``, which touches only the pages holding the requested elements; a fused
checkpoint tensor (internvl_chat ``attn.qkv``) is cut to the engine tensor's row block first.
With ``tie_word_embeddings`` the LM head is read from the embedding, as ``load_pretrained`` does.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import torch

from engine.config import ModelConfig
from engine.models.hf_adapter import (
    KEY_MAPS, _shard_files, config_to_engine, detect_key_format, expected_tensors, read_config)

_EMBED = "language_model.embed_tokens.weight"
_HEAD = "language_model.lm_head.weight"
_INDEX = {"safetensors": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json"}


class CheckpointSliceReader:
    """Reads slices of engine-named tensors from a transformers internvl / internvl_chat directory
    (model.safetensors, or sharded with model.safetensors.index.json; pytorch_model.bin(.index.json) as a fallback)."""

    def __init__(self, path: str, config: ModelConfig, expected: Optional[Mapping[str, tuple]] = None,
                 keep_open: bool = True):
        self.path = path
        self.config = config
        # keep_open=False: unmap after every read. A mapped file's touched pages count as resident
        # memory for as long as it stays mapped, and a column slice touches every row of its tensor.
        self.keep_open = keep_open
        shapes = expected if expected is not None else expected_tensors(config)
        self._expected: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in shapes.items()}
        self._handles: dict[str, Any] = {}  # file -> safe_open handle or (mmapped) bin state dict
        files, self._kind = _shard_files(path)
        self._file_of = self._index(files)  # stored checkpoint name -> file
        self.format: str = detect_key_format(list(self._file_of)) or config_to_engine(read_config(path))[1]
        self._km = KEY_MAPS[self.format]
        self._stored = {self._km.canonical(n): n for n in self._file_of}  # on-disk spelling -> stored name

    # ------------------------------------------------------------------ files

    def _index(self, files: list[str]) -> dict[str, str]:
        index = os.path.join(self.path, _INDEX[self._kind])
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            return {n: os.path.join(self.path, s) for n, s in weight_map.items()}
        handle = self._open(files[0], f"checkpoint {self.path}")
        return {n: files[0] for n in handle.keys()}

    def _open(self, file: str, what: str) -> Any:
        if file in self._handles:
            return self._handles[file]
        if not os.path.exists(file):
            raise FileNotFoundError(f"{what}: file {file} (named by the index) is missing")
        try:
            if self._kind == "safetensors":
                from safetensors import safe_open

                handle: Any = safe_open(file, framework="pt")
            else:
                handle = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # truncated / corrupt file
            raise ValueError(f"{what}: cannot open {file} ({type(e).__name__}: {e})") from e
        self._handles[file] = handle
        return handle

    # ------------------------------------------------------------------ lookup

    def _locate(self, engine_name: str) -> tuple[str, str, str, int, int, tuple[int, ...]]:
        """``(what, stored name, file, part, parts, engine shape)``, shape checked against ``expected``."""
        if engine_name not in self._expected:
            raise KeyError(f"{engine_name!r} is not an engine tensor of this model config")
        source = _EMBED if self.config.llm.tie_word_embeddings and engine_name == _HEAD else engine_name
        located = self._km.to_checkpoint(source)
        if located is None:
            raise KeyError(f"engine tensor {engine_name!r} has no {self.format} checkpoint name")
        ckpt, part, parts = located
        what = f"engine tensor {engine_name!r} (checkpoint tensor {ckpt!r})"
        stored = self._stored.get(ckpt)
        if stored is None:
            index = os.path.join(self.path, _INDEX[self._kind])
            where = index if os.path.exists(index) else next(iter(set(self._file_of.values())), self.path)
            raise KeyError(f"{what} is missing from {where}")
        file = self._file_of[stored]
        handle = self._open(file, what)
        try:
            raw = tuple(handle.get_slice(stored).get_shape()) if self._kind == "safetensors" \
                else tuple(handle[stored].shape)
        except Exception as e:
            raise KeyError(f"{what} cannot be read from {file} ({type(e).__name__}: {e})") from e
        if parts > 1:
            if not raw or raw[0] % parts:
                raise ValueError(f"{what} in {file}: fused shape {raw} does not split into {parts} row blocks")
            raw = (raw[0] // parts, *raw[1:])
        want = self._expected[engine_name]
        if raw != want:
            cut = f" (part {part} of {parts} fused row blocks)" if parts > 1 else ""
            raise ValueError(f"{what} in {file}: stored shape {raw}{cut} does not match the model's {want}")
        return what, stored, file, part, parts, raw

    # ------------------------------------------------------------------ API

    def shape(self, engine_name: str) -> tuple[int, ...]:
        """The engine tensor's full shape as stored (after cutting a fused part)."""
        return self._locate(engine_name)[5]

    def read(self, engine_name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The engine tensor's elements [start, stop) along dim (the whole tensor when dim is None), as dtype, on CPU."""
        what, stored, file, part, parts, shape = self._locate(engine_name)
        key = [slice(None)] * len(shape)
        offset = part * shape[0] if parts > 1 else 0
        if parts > 1:
            key[0] = slice(offset, offset + shape[0])
        if dim is not None:
            if not -len(shape) <= dim < len(shape):
                raise ValueError(f"{what}: dim={dim} is out of range for shape {shape}")
            dim %= len(shape)
            stop = shape[dim] if stop is None else stop
            if not 0 <= start <= stop <= shape[dim]:
                raise ValueError(f"{what}: [{start}, {stop}) is out of range for dim {dim} of shape {shape}")
            shift = offset if dim == 0 else 0
            key[dim] = slice(start + shift, stop + shift)
        handle = self._handles[file]
        try:
            if self._kind == "safetensors":
                t = handle.get_slice(stored)[tuple(key)] if key else handle.get_tensor(stored)
            else:
                t = handle[stored]
                for d, s in enumerate(key):
                    if s != slice(None):
                        t = t.narrow(d, s.start, s.stop - s.start)
        except Exception as e:
            raise ValueError(f"{what}: reading {file} failed ({type(e).__name__}: {e})") from e
        # safetensors slices (and mmapped bin tensors) are views of the mapped file: copy out.
        out = t.to(dtype=dtype, copy=True, memory_format=torch.contiguous_format)
        if not self.keep_open:
            self.close()
        return out

    def close(self) -> None:
        for handle in self._handles.values():
            if hasattr(handle, "__exit__"):
                handle.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> "CheckpointSliceReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["CheckpointSliceReader"]
