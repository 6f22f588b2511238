"""The tensor store of a checkpoint: per-rank safetensors files of pieces, one global index.

Every tensor is stored under a global key (``model/<engine name>``,
``optim/exp_avg/<engine name>``, ...) with its true, unpadded global shape, cut into pieces
(boxes). Each rank writes the pieces it owns into ``rank_NNNNN.safetensors`` and lists them in
``rank_NNNNN.index.json``; at publication rank 0 merges the lists into ``index.json``::

    {"tensors": {key: {"shape": [...], "dtype": "float32",
                       "pieces": [{"file": "rank_00003.safetensors", "name": "key@0",
                                   "offsets": [...], "sizes": [...]}]}},
     "scalars": {key: number}}

A reader asks for any box of a key and gets it assembled from the pieces that overlap it,
reading only those slices of those files; a box not covered exactly once is an error naming it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch

from engine.checkpoint.manager import CheckpointError, CheckpointManager
from engine.checkpoint.regions import Box, full_box, inside, intersect, slices, volume
from engine.checkpoint.safetensors_io import DTYPES, SafetensorsWriter, dtype_name, read_header, read_slice

INDEX = "index.json"
META = "meta.json"


def rank_stem(rank: int) -> str:
    return f"rank_{rank:05d}"


@dataclass
class _Item:
    key: str
    shape: tuple[int, ...]
    box: Box
    tensor: torch.Tensor


class ShardWriter:
    """One rank's pieces. ``add`` them (``copy=True`` snapshots them for a later write), then
    ``write`` into a checkpoint directory."""

    def __init__(self, rank: int):
        self.rank = rank
        self.items: list[_Item] = []
        self.scalars: dict[str, float] = {}

    def add(self, key: str, shape: Sequence[int], box: Box, tensor: torch.Tensor, copy: bool = False) -> None:
        shape = tuple(int(s) for s in shape)
        if tuple(tensor.shape) != tuple(box[1]):
            raise ValueError(f"{key}: piece of shape {tuple(tensor.shape)} for a box of sizes {box[1]}")
        if not inside(box, shape):
            raise ValueError(f"{key}: box {box} lies outside the global shape {shape}")
        t = tensor.detach()
        if copy:
            t = t.to("cpu", copy=True)
        self.items.append(_Item(key, shape, (tuple(box[0]), tuple(box[1])), t))

    def set_scalar(self, key: str, value: float) -> None:
        self.scalars[key] = float(value)

    def write(self, directory: str) -> list[str]:
        """Writes ``rank_NNNNN.safetensors`` and, last, ``rank_NNNNN.index.json``; returns their names."""
        stem = rank_stem(self.rank)
        data_file = stem + ".safetensors"
        counts: dict[str, int] = {}
        names = []
        for it in self.items:
            n = counts.get(it.key, 0)
            counts[it.key] = n + 1
            names.append(f"{it.key}@{n}")
        index: dict[str, Any] = {"tensors": {}, "scalars": dict(self.scalars)}
        entries = [(name, it.tensor.dtype, it.tensor.shape) for name, it in zip(names, self.items)]
        with SafetensorsWriter(os.path.join(directory, data_file), entries,
                               {"format": "pt", "rank": str(self.rank)}) as w:
            for name, it in zip(names, self.items):
                w.write(name, it.tensor)
                entry = index["tensors"].setdefault(
                    it.key, {"shape": list(it.shape), "dtype": dtype_name(it.tensor.dtype), "pieces": []})
                entry["pieces"].append({"file": data_file, "name": name, "offsets": list(it.box[0]),
                                        "sizes": list(it.box[1])})
        part = os.path.join(directory, stem + ".index.json")
        with open(part + ".part", "w") as f:
            json.dump(index, f)
        os.replace(part + ".part", part)
        return [data_file, stem + ".index.json"]


def merge_index(directory: str, parts: Iterable[str]) -> dict:
    """Merge the per-rank index files ``parts`` of ``directory`` into ``index.json`` (then
    removed); checks that every tensor is covered exactly by its pieces."""
    merged: dict[str, Any] = {"tensors": {}, "scalars": {}}
    parts = list(parts)
    for part in parts:
        with open(os.path.join(directory, part)) as f:
            idx = json.load(f)
        for key, e in idx["tensors"].items():
            m = merged["tensors"].setdefault(key, {"shape": e["shape"], "dtype": e["dtype"], "pieces": []})
            if (m["shape"], m["dtype"]) != (e["shape"], e["dtype"]):
                raise CheckpointError(f"{key}: {part} stores {e['dtype']} {e['shape']}, another rank "
                                      f"{m['dtype']} {m['shape']}")
            m["pieces"].extend(e["pieces"])
        for key, v in idx["scalars"].items():
            if key in merged["scalars"] and merged["scalars"][key] != v:
                raise CheckpointError(f"{key}: ranks disagree ({merged['scalars'][key]} vs {v} in {part})")
            merged["scalars"][key] = v
    for key, e in merged["tensors"].items():
        have, want = sum(volume(p["sizes"]) for p in e["pieces"]), volume(e["shape"])
        if have != want:
            raise CheckpointError(f"{key}: the ranks wrote {have} of its {want} elements")
    with open(os.path.join(directory, INDEX + ".part"), "w") as f:
        json.dump(merged, f)
    os.replace(os.path.join(directory, INDEX + ".part"), os.path.join(directory, INDEX))
    for part in parts:
        os.remove(os.path.join(directory, part))
    return merged


class CheckpointReader:
    """Reads boxes of any stored tensor of a published checkpoint directory."""

    def __init__(self, path: str):
        self.path = path
        self.manifest = CheckpointManager.check(path)
        files = self.manifest["files"]
        for name in (META, INDEX):
            if name not in files:
                raise CheckpointError(f"{path} is not a sharded engine checkpoint: its manifest lists no {name}")
        self.meta = self._json(META)
        index = self._json(INDEX)
        self.tensors: dict[str, dict] = index.get("tensors", {})
        self.scalars: dict[str, float] = index.get("scalars", {})
        self._headers: dict[str, dict] = {}
        for key, e in self.tensors.items():
            for p in e["pieces"]:
                if p["file"] not in files:
                    raise CheckpointError(f"{path}: {key} has a piece in {p['file']}, which the manifest does not list")
                if not inside((tuple(p["offsets"]), tuple(p["sizes"])), e["shape"]):
                    raise CheckpointError(f"{path}: {key} has a piece {p['offsets']}+{p['sizes']} outside {e['shape']}")
            have, want = sum(volume(p["sizes"]) for p in e["pieces"]), volume(e["shape"])
            if have != want:
                raise CheckpointError(f"{path}: {key} is incomplete: its pieces hold {have} of {want} elements")

    def _json(self, name: str) -> dict:
        try:
            with open(os.path.join(self.path, name)) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{os.path.join(self.path, name)} is unreadable: {e}") from None

    # ------------------------------------------------------------------ queries
    def keys(self, prefix: str = "") -> list[str]:
        return [k for k in self.tensors if k.startswith(prefix)]

    def has(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entry(key)["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self._entry(key)["dtype"]]

    def scalar(self, key: str, default: Optional[float] = None) -> Optional[float]:
        return self.scalars.get(key, default)

    def _entry(self, key: str) -> dict:
        if key not in self.tensors:
            raise CheckpointError(f"{self.path} has no tensor {key!r}")
        return self.tensors[key]

    def _header(self, file: str) -> dict:
        if file not in self._headers:
            try:
                self._headers[file] = read_header(os.path.join(self.path, file))
            except (OSError, ValueError) as e:
                raise CheckpointError(str(e)) from None
        return self._headers[file]

    # ------------------------------------------------------------------ reads
    def read(self, key: str, box: Optional[Box] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The ``box`` (default: all) of tensor ``key``, in its stored dtype or ``dtype``."""
        e = self._entry(key)
        shape = tuple(e["shape"])
        box = full_box(shape) if box is None else (tuple(box[0]), tuple(box[1]))
        if not inside(box, shape):
            raise CheckpointError(f"{key}: box {box} is outside its stored shape {shape}")
        hits = []
        for p in e["pieces"]:
            pbox = (tuple(p["offsets"]), tuple(p["sizes"]))
            common = intersect(pbox, box)
            if common is not None:
                hits.append((p, pbox, common))
        covered = sum(volume(c[1]) for _, _, c in hits)
        twice = sum(volume(c[1]) for i, (_, _, a) in enumerate(hits) for _, _, b in hits[i + 1:]
                    if (c := intersect(a, b)) is not None)
        if covered - twice != volume(box[1]) or twice:
            raise CheckpointError(f"{self.path}: {key} box {box}: {volume(box[1]) - covered + twice} elements in no "
                                  f"piece, {twice} in several")
        want = dtype or DTYPES[e["dtype"]]
        if len(hits) == 1 and hits[0][2] == box:  # one piece holds the whole box
            return self._read_piece(key, *hits[0]).to(want)
        out = torch.empty(box[1], dtype=want)
        for p, pbox, common in hits:
            out[slices(common, box[0])] = self._read_piece(key, p, pbox, common)
        return out

    def _read_piece(self, key: str, p: dict, pbox: Box, common: Box) -> torch.Tensor:
        h = self._header(p["file"]).get(p["name"])
        if h is None or tuple(h["shape"]) != pbox[1]:
            raise CheckpointError(f"{os.path.join(self.path, p['file'])}: piece {p['name']} of {key} is "
                                  f"{'missing' if h is None else 'of shape ' + str(h['shape'])}")
        try:
            return read_slice(os.path.join(self.path, p["file"]), p["name"], slices(common, pbox[0]))
        except Exception as err:
            raise CheckpointError(f"{os.path.join(self.path, p['file'])}: cannot read {p['name']}: {err}") from None
