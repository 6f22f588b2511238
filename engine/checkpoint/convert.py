"""Conversion between transformers checkpoints and engine checkpoints, one tensor at a time.

* ``to_engine``: a transformers-native ``internvl`` or remote-code ``internvl_chat`` directory ->
  a weights-only engine checkpoint laid out for a target layout (the files its ranks would
  write), in one process, without launching the layout.
* ``to_hf``: an engine checkpoint saved under any layout -> transformers-native safetensors
  (sharded with an index above ``max_shard_size``) + config.json.

Both plan first from metadata alone (names, shapes, dtypes: a shape mismatch is refused before
anything is written), then stream: each source tensor is read alone (its file opened for that
read only), cut, cast and written at its place in the output files, whose headers were written
up front. Peak memory is a few times the largest tensor. Output goes to ``DST.tmp`` and is
renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from engine.checkpoint.manager import MANIFEST, CheckpointError, CheckpointManager
from engine.checkpoint.plan import default_world, grid_sizes, shard_spec, target_pieces
from engine.checkpoint.regions import Box, take
from engine.checkpoint.safetensors_io import DTYPES, SafetensorsWriter, dtype_name, nbytes, read_slice
from engine.checkpoint.state import (FORMAT, INDEX, KIND_WEIGHTS, META, VERSION, check_model, expected_parameters,
                                     layout_of, model_config_of)
from engine.checkpoint.store import CheckpointReader, rank_stem
from engine.config import Config, ConfigError, ModelConfig, config_to_dict, validate_model, validate_parallel
from engine.metrics import peak_rss_mib
from engine.models import hf_adapter as A

ENGINE = "engine"
Printer = Callable[[str], None]


def detect_format(path: str) -> str:
    """``engine`` (a checkpoint directory or a root with ``latest``), ``hf`` or ``internvl_chat``."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory")
    if os.path.exists(os.path.join(path, MANIFEST)) or os.path.exists(os.path.join(path, "latest")):
        return ENGINE
    if os.path.exists(os.path.join(path, "config.json")):
        return A.config_to_engine(A.read_config(path))[1]
    raise CheckpointError(f"{path}: neither an engine checkpoint (manifest.json / latest) nor a transformers "
                          f"directory (config.json)")


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"--dtype {name!r} is unknown (known: bf16, fp16, fp32)")
    return table[name]


def _cast(dtype: torch.dtype, to: Optional[torch.dtype]) -> torch.dtype:
    return to if to is not None and dtype.is_floating_point else dtype


@dataclass
class Report:
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    def line(self) -> str:
        mb = self.bytes / 2**20
        rate = mb / self.seconds if self.seconds > 0 else 0.0
        return (f"wrote {self.tensors} tensors, {mb:.1f} MiB in {self.seconds:.2f} s ({rate:.1f} MiB/s) to "
                f"{len(self.files)} files; peak RSS {peak_rss_mib():.0f} MiB")


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str
    kind: str  # safetensors | bin


def list_sources(path: str) -> list[Source]:
    """Every tensor of a transformers directory, from file headers only."""
    files, kind = A._shard_files(path)
    out = []
    for file in files:
        if not os.path.exists(file):
            raise FileNotFoundError(f"shard {file} named by the index is missing")
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    out.append(Source(name, tuple(sl.get_shape()), DTYPES[sl.get_dtype()], file, kind))
        else:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            out.extend(Source(n, tuple(t.shape), t.dtype, file, kind) for n, t in sd.items())
            del sd
    return out


class _SourceReader:
    """Reads one source tensor at a time (a .bin file stays mapped while its tensors are read)."""

    def __init__(self):
        self._bin: tuple[Optional[str], dict] = (None, {})

    def read(self, s: Source) -> torch.Tensor:
        if s.kind == "safetensors":
            return read_slice(s.file, s.name)
        if self._bin[0] != s.file:
            self._bin = (s.file, torch.load(s.file, map_location="cpu", weights_only=True, mmap=True))
        return self._bin[1][s.name]


# ----------------------------------------------------------------------------- to engine


@dataclass
class Target:
    """One engine tensor cut from a source tensor, and the pieces the layout stores."""

    key: str  # engine parameter name
    source: Source
    cut: Callable[[torch.Tensor], torch.Tensor]
    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: list[tuple[int, Box]]
    note: str = ""


def _part_shape(source: Source, parts: int) -> tuple[int, ...]:
    if parts == 1:
        return source.shape
    if not source.shape or source.shape[0] % parts:
        raise CheckpointError(f"{source.name}: fused tensor of shape {source.shape} does not split into {parts} "
                              f"equal row blocks")
    return (source.shape[0] // parts,) + source.shape[1:]


def engine_config(cfg: Optional[Config], model_cfg: ModelConfig, check_model_keys: bool) -> Config:
    """``cfg`` (layout) with the source's model config; a differing model section is refused."""
    cfg = cfg or Config()
    if check_model_keys:
        want, have = config_to_dict(cfg.model), config_to_dict(model_cfg)
        diff = [f"model.{sect}.{k}: config {want[sect][k]!r}, checkpoint {have[sect][k]!r}"
                for sect in ("vision", "llm") for k in have[sect] if want[sect][k] != have[sect][k]]
        if diff:
            raise ConfigError("the config's model differs from the checkpoint's: " + "; ".join(diff[:8]))
    cfg.model = model_cfg
    return cfg


def check_target_layout(cfg: Config, world: int) -> None:
    """The layout rules of ``cfg.parallel`` for ``world`` ranks; batch settings do not shape the
    checkpoint, so they are set to values every layout accepts for this check."""
    import copy

    probe = copy.deepcopy(cfg)
    L = probe.parallel.llm
    L.microbatches = L.pp * max(1, -(-L.microbatches // L.pp)) if L.pp > 1 else L.microbatches
    dp = world // (L.tp * L.hp * L.pp) if world % (L.tp * L.hp * L.pp) == 0 else 1
    probe.train.global_batch = dp * L.microbatches
    validate_parallel(probe, world)
    if probe.parallel.vit.tp > probe.model.vision.num_heads:
        raise ConfigError(f"parallel.vit.tp={probe.parallel.vit.tp} exceeds model.vision.num_heads="
                          f"{probe.model.vision.num_heads}")


def plan_to_engine(src: str, cfg: Config, world: int, dtype: Optional[torch.dtype]) -> tuple[list[Target], list[str]]:
    """Targets in source order, and notes on skipped source tensors. Raises on unknown, missing
    or mis-shaped tensors, naming them."""
    sources = list_sources(src)
    fmt = A.detect_key_format([s.name for s in sources]) or detect_format(src)
    km = A.KEY_MAPS[fmt]
    expected = expected_parameters(cfg.model)
    tied = cfg.model.llm.tie_word_embeddings
    targets: list[Target] = []
    skipped, unknown, wrong = [], [], []
    seen: dict[str, str] = {}
    vit_layers = A.vit_layers_of(cfg.model)
    for s in sources:
        if km.is_ignored(s.name):
            skipped.append(f"{s.name} (rotary cache)")
            continue
        mapped = km.to_engine(s.name)
        if mapped is None:
            unknown.append(s.name)
            continue
        for key, cut in mapped:
            if A._unused_vit_layer(key, vit_layers):
                skipped.append(f"{s.name} (ViT layer past select_layer={cfg.model.select_layer})")
                continue
            if tied and key == "language_model.lm_head.weight":
                skipped.append(f"{s.name} (tied: the LM head is the embedding)")
                continue
            if key not in expected:
                unknown.append(s.name if len(mapped) == 1 else f"{s.name} -> {key}")
                continue
            if key in seen:
                raise CheckpointError(f"{s.name} gives {key} a second time (also from {seen[key]})")
            seen[key] = s.name
            shape = _part_shape(s, len(mapped))
            if shape != expected[key]:
                wrong.append(f"{s.name}" + (f" (-> {key})" if key != s.name else "") +
                             f": checkpoint {shape}, model {expected[key]}")
                continue
            targets.append(Target(key, s, cut, shape, _cast(s.dtype, dtype), target_pieces(key, shape, cfg, world),
                                  _spec_note(key, shape, cfg)))
    if tied and "language_model.embed_tokens.weight" in seen:
        emb = next(t for t in targets if t.key == "language_model.embed_tokens.weight")
        key = "language_model.lm_head.weight"
        targets.append(Target(key, emb.source, emb.cut, emb.shape, emb.dtype, target_pieces(key, emb.shape, cfg, world),
                              "copy of the tied embedding"))
        seen[key] = emb.source.name
    missing = [k for k in expected if k not in seen]
    problems = []
    if wrong:
        problems.append("shape mismatch: " + "; ".join(wrong))
    if unknown:
        problems.append(f"unknown {fmt} tensors: {', '.join(unknown[:12])}")
    if missing:
        named = [f"{c[0]} (engine {k})" if (c := km.to_checkpoint(k)) else k for k in missing]
        problems.append(f"missing tensors: {', '.join(named[:12])}")
    if problems:
        raise CheckpointError(f"{src} ({fmt}): " + "; ".join(problems))
    return targets, skipped


def _spec_note(key: str, shape: tuple[int, ...], cfg: Config) -> str:
    s = shard_spec(key, shape, cfg)
    i = s.info
    parts = []
    if s.stage is not None and cfg.parallel.llm.pp > 1:
        parts.append(f"pp stage {s.stage}")
    if i.dim is not None:
        parts.append(f"{s.grid} tp split dim {i.dim}")
        if i.padded > i.full:
            parts.append(f"padded {i.full}->{i.padded}")
        if i.replicas > 1:
            parts.append(f"{i.replicas} tp replicas")
    return ", ".join(parts)


def _box_str(box: Box) -> str:
    return "[" + ", ".join(f"{o}:{o + s}" for o, s in zip(*box)) + "]"


def _prepare_output(dst: str) -> str:
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise FileExistsError(f"--output {dst} exists and is not empty")
    tmp = dst.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def _publish_output(tmp: str, dst: str) -> None:
    if os.path.isdir(dst):
        os.rmdir(dst)
    os.replace(tmp, dst)


def to_engine(src: str, dst: str, cfg: Optional[Config] = None, world: Optional[int] = None,
              dtype: Optional[torch.dtype] = None, dry_run: bool = False, check_model_keys: bool = False,
              out: Printer = print) -> Report:
    """transformers ``internvl`` / ``internvl_chat`` directory -> engine checkpoint for ``cfg.parallel``."""
    t0 = time.perf_counter()
    model_cfg = A.config_to_engine(A.read_config(src))[0]
    validate_model(model_cfg)
    cfg = engine_config(cfg, model_cfg, check_model_keys)
    world = world or default_world(cfg)
    check_target_layout(cfg, world)
    targets, skipped = plan_to_engine(src, cfg, world, dtype)
    per_rank: dict[int, list[tuple[str, Target, Box]]] = {}
    for t in targets:
        for n, (rank, box) in enumerate(t.pieces):
            per_rank.setdefault(rank, []).append((f"model/{t.key}@{n}", t, box))
    report = Report(tensors=len(targets))
    report.bytes = sum(nbytes(box[1], t.dtype) for items in per_rank.values() for _, t, box in items)
    sizes = grid_sizes(cfg, world)
    out(f"{src} -> engine checkpoint {dst}: world {world}, llm {sizes['llm']}, vit {sizes['vit']}")
    if dry_run:
        for t in targets:
            pieces = ", ".join(f"rank {r} {_box_str(b)}" for r, b in t.pieces)
            out(f"  {t.source.name} -> {t.key} {list(t.shape)} {dtype_name(t.source.dtype)}->{dtype_name(t.dtype)} "
                f"{nbytes(t.shape, t.dtype)} B" + (f" ({t.note})" if t.note else "") + f": {pieces}")
        for s in skipped:
            out(f"  skip {s}")
        for rank in sorted(per_rank):
            b = sum(nbytes(box[1], t.dtype) for _, t, box in per_rank[rank])
            out(f"  {rank_stem(rank)}.safetensors: {len(per_rank[rank])} pieces, {b} B")
        out(f"dry run: {len(targets)} tensors, {report.bytes} B in {len(per_rank)} files; nothing written; "
            f"peak RSS {peak_rss_mib():.0f} MiB")
        return report

    tmp = _prepare_output(dst)
    writers = {rank: SafetensorsWriter(os.path.join(tmp, rank_stem(rank) + ".safetensors"),
                                       [(name, t.dtype, box[1]) for name, t, box in items],
                                       {"format": "pt", "rank": str(rank)})
               for rank, items in sorted(per_rank.items())}
    reader = _SourceReader()
    index: dict = {"tensors": {}, "scalars": {}}
    by_source: dict[str, list[Target]] = {}
    for t in targets:
        by_source.setdefault(t.source.name, []).append(t)
    for ts in by_source.values():
        raw = reader.read(ts[0].source)
        for t in ts:
            tensor = t.cut(raw)
            tensor = tensor.to(t.dtype) if tensor.dtype != t.dtype else tensor
            entry = index["tensors"][f"model/{t.key}"] = {"shape": list(t.shape), "dtype": dtype_name(t.dtype), "pieces": []}
            for n, (rank, box) in enumerate(t.pieces):
                writers[rank].write(f"model/{t.key}@{n}", take(tensor, box))
                entry["pieces"].append({"file": rank_stem(rank) + ".safetensors", "name": f"model/{t.key}@{n}",
                                        "offsets": list(box[0]), "sizes": list(box[1])})
            del tensor
        del raw
    for w in writers.values():
        w.close()
    with open(os.path.join(tmp, INDEX), "w") as f:
        json.dump(index, f)
    meta = {"format": FORMAT, "version": VERSION, "kind": KIND_WEIGHTS, "step": 0,
            "model": config_to_dict(cfg.model), "layout": layout_of(cfg, world), "source": os.path.abspath(src)}
    with open(os.path.join(tmp, META), "w") as f:
        json.dump(meta, f, indent=1)
    files = {f: os.path.getsize(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump({"step": 0, "world_size": world, "files": files}, f, indent=1)
    _publish_output(tmp, dst)
    report.files = sorted(files)
    report.seconds = time.perf_counter() - t0
    out(report.line())
    return report


# ----------------------------------------------------------------------------- to transformers


def resolve_engine_checkpoint(path: str) -> str:
    if os.path.exists(os.path.join(path, "latest")) and not os.path.exists(os.path.join(path, MANIFEST)):
        latest = CheckpointManager(path).latest()
        if latest is None:
            raise CheckpointError(f"{path}/latest names no checkpoint")
        return latest
    return path


def _parse_size(size) -> Optional[int]:
    return A._parse_size(size)


def to_hf(src: str, dst: str, dtype: Optional[torch.dtype] = None, max_shard_size="5GB", dry_run: bool = False,
          out: Printer = print) -> Report:
    """Engine checkpoint (any layout) -> transformers-native ``internvl`` directory."""
    t0 = time.perf_counter()
    src = resolve_engine_checkpoint(src)
    reader = CheckpointReader(src)
    model_cfg = model_config_of(reader)
    check_model(reader, model_cfg)
    limit = _parse_size(max_shard_size)
    tied = model_cfg.llm.tie_word_embeddings
    entries: list[tuple[str, str, tuple[int, ...], torch.dtype]] = []  # hf name, engine key, shape, dtype
    for key in expected_parameters(model_cfg):
        if tied and key == "language_model.lm_head.weight":
            continue
        name, _, parts = A.export_key(key, A.HF)
        if parts != 1:
            raise CheckpointError(f"{key}: the transformers format has no fused tensors ({name})")
        entries.append((name, key, reader.shape(f"model/{key}"), _cast(reader.dtype(f"model/{key}"), dtype)))
    entries.sort()
    shards: list[list[tuple[str, str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for e in entries:
        n = nbytes(e[2], e[3])
        if limit is not None and shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    report = Report(tensors=len(entries), bytes=sum(nbytes(e[2], e[3]) for e in entries))
    dtypes = {dtype_name(e[3]) for e in entries if e[3].is_floating_point}
    dtype_str = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(dtypes.pop(), "float32") \
        if len(dtypes) == 1 else "float32"
    out(f"{src} (saved under {reader.meta.get('layout')}) -> transformers {dst}: {len(files)} files")
    if dry_run:
        for file, shard in zip(files, shards):
            for name, key, shape, dt in shard:
                out(f"  {key} -> {file}:{name} {list(shape)} {dtype_name(reader.dtype('model/' + key))}->"
                    f"{dtype_name(dt)} {nbytes(shape, dt)} B")
        out(f"dry run: {len(entries)} tensors, {report.bytes} B; nothing written; peak RSS {peak_rss_mib():.0f} MiB")
        return report
    tmp = _prepare_output(dst)
    weight_map = {}
    for file, shard in zip(files, shards):
        with SafetensorsWriter(os.path.join(tmp, file), [(n, dt, s) for n, _, s, dt in shard], {"format": "pt"}) as w:
            for name, key, shape, dt in shard:
                w.write(name, reader.read(f"model/{key}", dtype=dt))
                weight_map[name] = file
    if len(files) > 1:
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": report.bytes}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(A.engine_config_to_hf(model_cfg, A.vit_layers_of(model_cfg), dtype_str), f, indent=2)
    _publish_output(tmp, dst)
    report.files = sorted(os.listdir(dst))
    report.seconds = time.perf_counter() - t0
    out(report.line())
    return report


__all__ = ["ENGINE", "detect_format", "parse_dtype", "list_sources", "plan_to_engine", "to_engine", "to_hf",
           "resolve_engine_checkpoint", "model_config_of", "check_target_layout", "Report"]
