"""Packing preference pairs: chosen and rejected are two segments of the same packed batch and
take their image features from one ViT pass over the pair's tiles.

Sequences are packed in the order ``chosen_0, rejected_0, chosen_1, ...`` (first-fit rows, as
``engine.data.packing``). The ViT runs on the tiles of the pairs in pair order;
``feature_index`` maps those rows to the order in which the packed batch consumes them (every
pair's tiles twice), so the gradient of both responses flows into one ViT pass. Packing needs a pair's
tokens and tile counts only: its pixels (all, some or none of its tiles on this rank) reach the
LLM through the ViT and its exchange.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from engine.config import Config
from engine.data.batch import PackedBatch, Sample
from engine.data.packing import first_fit
from engine.models.attention import segment_ids
from engine.data.batch import token_weight
from engine.posttrain.preference import PreferencePair
from engine.data.packing import pack


@dataclass
class PairMicrobatch:
    batch: PackedBatch  # pixel_values hold no pixels (tiles x 0): features come from the pairs' ViT pass
    seq_segment: torch.Tensor  # [2 * pairs] segment of sequence 2p (chosen) / 2p+1 (rejected)
    feature_index: torch.Tensor  # [tiles consumed] row of the pair-order ViT output for each consumed tile
    lm_weights: torch.Tensor  # [B, S] LM loss weights, chosen responses only
    num_pairs: int
    num_tiles: int  # tiles the ViT encodes (each pair's tiles once)

    @property
    def num_segments(self) -> int:
        return int(self.batch.cu_seqlens.numel()) - 1

    def to(self, device) -> "PairMicrobatch":
        return dataclasses.replace(self, batch=self.batch.to(device), seq_segment=self.seq_segment.to(device),
                                   feature_index=self.feature_index.to(device), lm_weights=self.lm_weights.to(device))


def _light(s: Sample) -> Sample:
    """The sample with its tile count but no pixels (a rank may hold some, or none, of a pair's tiles:
    the count comes from its images, ``image_tiles``)."""
    return dataclasses.replace(s, pixel_values=torch.empty(s.num_tiles, 0) if s.num_tiles else None, tile_ids=None)


def lm_weight_total(pairs: Sequence[PreferencePair], loss_reduction: str) -> float:
    """Sum of the LM token weights of the chosen responses of ``pairs``."""
    return float(sum(token_weight(p.chosen.num_targets, loss_reduction) * p.chosen.num_targets for p in pairs))


def pack_pairs(pairs: Sequence[PreferencePair], cfg: Config, pad_id: int = 0, pad_to_multiple: int = 1) -> PairMicrobatch:
    seqs = [s for p in pairs for s in (p.chosen, p.rejected)]
    batch = pack([_light(s) for s in seqs], cfg, pad_id, pad_to_multiple)
    rows = first_fit([s.num_tokens for s in seqs], cfg.data.max_packed_tokens) if seqs else []
    B, S = batch.input_ids.shape
    seq_segment = torch.zeros(len(seqs), dtype=torch.long)
    seg = 0
    for row in rows:
        for k in row:
            seq_segment[k] = seg
            seg += 1
        if sum(seqs[k].num_tokens for k in row) < S:
            seg += 1  # the row's padding
    if seqs and seg != batch.cu_seqlens.numel() - 1:
        raise RuntimeError(f"pair packing: {seg} segments expected, the packed batch has {batch.cu_seqlens.numel() - 1}")
    offsets, start = [], 0
    for p in pairs:
        offsets.append(start)
        start += p.num_tiles
    index = [t for row in rows for k in row for t in range(offsets[k // 2], offsets[k // 2] + pairs[k // 2].num_tiles)]
    rejected = torch.zeros(batch.cu_seqlens.numel() - 1, dtype=torch.bool)
    if seqs:
        rejected[seq_segment[1::2]] = True
    segs = segment_ids(batch.cu_seqlens.long(), B, S)
    lm_weights = batch.loss_weights * (~rejected[segs]).float()
    return PairMicrobatch(batch, seq_segment, torch.tensor(index, dtype=torch.long), lm_weights, len(pairs), start)
