"""Multimodal data packing: samples -> ``PackedBatch`` rows with per-sample attention segments.

Samples go first-fit, in order, into rows of at most ``max_packed_tokens``; all rows are padded
to one length. Inside each sample the target of token j is label j+1 (the last token has none),
the loss weight is ``token_weight(sample's target count, mode)`` and V2PE positions restart at 0.
Images follow the order of their ``<IMG_CONTEXT>`` runs in the flattened batch.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from engine.data.batch import IGNORE_INDEX, PackedBatch, Sample, token_weight
from engine.data.seeding import sample_generator
from engine.data.v2pe import sample_deltas, v2pe_positions_1d


def sample_v2pe_deltas(sample: Sample, seed: int, index: int, random: bool, fixed: float = 1.0) -> list[float]:
    """One V2PE delta per image: drawn from {1/256 .. 1} by (seed, index) when ``random``, else ``fixed``."""
    n = len(sample.image_tiles)
    if not random:
        return [float(fixed)] * n
    return sample_deltas(n, sample_generator(seed, index, "v2pe"))


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of sample positions: each sample, in order, into the first row with room."""
    rows: list[list[int]] = []
    used: list[int] = []
    for k, n in enumerate(lengths):
        for r, u in enumerate(used):
            if u + n <= capacity:
                rows[r].append(k)
                used[r] = u + n
                break
        else:
            rows.append([k])
            used.append(n)
    return rows


def _image_runs(ids: torch.Tensor, img_context_id: int) -> list[int]:
    """Lengths of the maximal runs of ``img_context_id`` in ``ids``."""
    mask = (ids == img_context_id).to(torch.int8)
    if not bool(mask.any()):
        return []
    edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int8), mask, torch.zeros(1, dtype=torch.int8)]))
    starts = (edges == 1).nonzero().flatten()
    ends = (edges == -1).nonzero().flatten()
    return (ends - starts).tolist()


def _check_images(s: Sample, img_context_id: int) -> None:
    runs = _image_runs(s.input_ids, img_context_id)
    if len(runs) != len(s.image_tiles):
        raise ValueError(f"sample {s.source or '?'}: {len(runs)} <IMG_CONTEXT> runs but {len(s.image_tiles)} images")
    tiles = s.num_tiles
    have = 0 if s.pixel_values is None else int(s.pixel_values.shape[0])
    if have != tiles:
        raise ValueError(f"sample {s.source or '?'}: {have} tiles of pixels but image_tiles sums to {tiles}")
    if tiles and sum(runs) % tiles:
        raise ValueError(f"sample {s.source or '?'}: {sum(runs)} visual tokens do not divide into {tiles} tiles")
    per_tile = sum(runs) // tiles if tiles else 0
    for k, (run, t) in enumerate(zip(runs, s.image_tiles)):
        if run != t * per_tile:
            raise ValueError(f"sample {s.source or '?'}: image {k} has {run} visual tokens for {t} tiles "
                             f"({per_tile} per tile)")


def pack_samples(samples: Sequence[Sample], max_packed_tokens: int, img_context_id: int, loss_reduction: str,
                 deltas: Optional[Sequence[Sequence[float]]] = None, pad_id: int = 0,
                 pad_to_multiple: int = 1) -> PackedBatch:
    """Pack ``samples`` into a ``PackedBatch`` (see the module docstring).

    ``deltas``: one list of per-image V2PE deltas per sample, or None for delta 1 everywhere.
    Row length is the longest row rounded up to ``pad_to_multiple``. No samples gives one
    all-padding row with zero loss weight.
    """
    if max_packed_tokens < 1 or pad_to_multiple < 1:
        raise ValueError(f"max_packed_tokens={max_packed_tokens} and pad_to_multiple={pad_to_multiple} must be >= 1")
    token_weight(1, loss_reduction)  # validates the mode
    if deltas is not None and len(deltas) != len(samples):
        raise ValueError(f"{len(deltas)} delta lists for {len(samples)} samples")
    for s in samples:
        if s.num_tokens > max_packed_tokens:
            raise ValueError(f"sample {s.source or '?'} has {s.num_tokens} tokens > max_packed_tokens={max_packed_tokens}")
        if s.num_tokens < 1:
            raise ValueError(f"sample {s.source or '?'} is empty")
        if s.labels.shape != s.input_ids.shape:
            raise ValueError(f"sample {s.source or '?'}: labels {tuple(s.labels.shape)} != input_ids "
                             f"{tuple(s.input_ids.shape)}")
        _check_images(s, img_context_id)
    for k, s in enumerate(samples if deltas is not None else []):
        if len(deltas[k]) != len(s.image_tiles):
            raise ValueError(f"sample {s.source or '?'}: {len(deltas[k])} V2PE deltas for {len(s.image_tiles)} images")

    rows = first_fit([s.num_tokens for s in samples], max_packed_tokens) if samples else [[]]
    longest = max(sum(samples[k].num_tokens for k in row) for row in rows)
    S = -(-max(longest, 1) // pad_to_multiple) * pad_to_multiple
    B = len(rows)
    input_ids = torch.full((B, S), pad_id, dtype=torch.int64)
    targets = torch.full((B, S), IGNORE_INDEX, dtype=torch.int64)
    weights = torch.zeros((B, S), dtype=torch.float32)
    positions = torch.zeros((B, S), dtype=torch.float32)
    cu = [0]
    pixels: list[torch.Tensor] = []
    image_tiles: list[int] = []
    visual = 0
    text = 0
    for r, row in enumerate(rows):
        off = 0
        for k in row:
            s = samples[k]
            n = s.num_tokens
            ids = s.input_ids.to(torch.int64)
            input_ids[r, off:off + n] = ids
            t = torch.full((n,), IGNORE_INDEX, dtype=torch.int64)
            t[:-1] = s.labels[1:]
            targets[r, off:off + n] = t
            weights[r, off:off + n] = (t != IGNORE_INDEX).float() * token_weight(s.num_targets, loss_reduction)
            d = 1.0 if deltas is None else list(deltas[k])
            positions[r, off:off + n] = torch.tensor(v2pe_positions_1d(ids.tolist(), img_context_id, d),
                                                     dtype=torch.float32)
            nv = int((ids == img_context_id).sum())
            visual += nv
            text += n - nv
            if s.pixel_values is not None and s.image_tiles:
                pixels.append(s.pixel_values)
                image_tiles.extend(int(x) for x in s.image_tiles)
            off += n
            cu.append(r * S + off)
        if off < S:
            positions[r, off:] = torch.arange(S - off, dtype=torch.float32)
            cu.append((r + 1) * S)
    return PackedBatch(
        input_ids=input_ids, targets=targets, loss_weights=weights, position_ids=positions,
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        pixel_values=torch.cat(pixels) if pixels else None,
        image_tiles=torch.tensor(image_tiles, dtype=torch.int64) if image_tiles else None,
        num_samples=len(samples), text_tokens=text, visual_tokens=visual)


def split_contiguous(items: Sequence, parts: int) -> list[list]:
    """Split into ``parts`` contiguous chunks whose sizes differ by at most one."""
    n = len(items)
    out, start = [], 0
    for i in range(parts):
        size = n // parts + (1 if i < n % parts else 0)
        out.append(list(items[start:start + size]))
        start += size
    return out


def pack(samples: Sequence[Sample], cfg: Any, pad_id: int = 0, pad_to_multiple: int = 1) -> PackedBatch:
    """Pack samples into rows, with V2PE deltas drawn per sample from (seed, global index)."""
    d = cfg.data
    deltas = [sample_v2pe_deltas(s, cfg.train.seed, s.index, d.v2pe_random_delta, d.v2pe_delta) for s in samples]
    return pack_samples(list(samples), d.max_packed_tokens, cfg.model.img_context_token_id, d.loss_reduction,
                        deltas=deltas, pad_id=pad_id, pad_to_multiple=pad_to_multiple)
