"""InternVL: ViT -> pixel shuffle -> MLP projector -> LLM, with V2PE positions and a text-only loss.

Single-device model code. Parallel layouts wrap or slice its modules from the outside
(``engine/parallel``); nothing here knows about process groups.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn

from engine.config import ModelConfig
from engine.models.attention import block_mask
from engine.models.llm import QwenLM, SequenceContext
from engine.models.loss import weighted_cross_entropy_sum
from engine.models.projector import Projector, pixel_shuffle_reference
from engine.data.v2pe import v2pe_position_ids
from engine.models.vit import InternViT

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def reference_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor):
    """(sum(w * ce), sum(w)) with full logits (the plain path)."""
    logits = torch.nn.functional.linear(hidden, weight)
    return weighted_cross_entropy_sum(logits, targets, weights)


class InternVLModel(nn.Module):
    def __init__(self, config: ModelConfig, init: bool = True):
        super().__init__()
        self.config = config
        self.vision_model = InternViT(config.vision, config.select_layer)
        self.projector = Projector(config.projector_in, config.llm.hidden_size, config.projector_ln_eps)
        self.language_model = QwenLM(config.llm)
        self.pixel_shuffle = pixel_shuffle_reference
        self.loss_fn: LossFn = reference_linear_loss
        if init:
            self.init_weights()

    # ------------------------------------------------------------------ construction
    def init_weights(self, seed: Optional[int] = None) -> None:
        """Normal(initializer_range) weights, zero biases, unit norms, layer scales at their init
        value; the values depend on ``seed`` and each parameter's name only (``engine.models.init``),
        so every parallel layout builds its slices of exactly this model. ``seed=None`` draws one
        from torch's global generator."""
        from engine.models.init import initialize

        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        initialize(self, seed, self.config.initializer_range, self.config.vision.layer_scale_init)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.vision_model.activation_checkpointing = enabled
        self.language_model.activation_checkpointing = enabled

    # ------------------------------------------------------------------ the three stages
    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[tiles, 3, H, W] -> [tiles, num_image_token, llm hidden]``."""
        x = self.vision_model(pixel_values)[:, 1:, :]  # drop CLS
        n, p, c = x.shape
        side = int(math.isqrt(p))
        x = self.pixel_shuffle(x.reshape(n, side, side, c), self.config.downsample_ratio, self.config.ps_version)
        x = x.reshape(n, -1, x.shape[-1])
        return self.projector(x)

    def embed(self, input_ids: torch.Tensor, image_embeds: Optional[torch.Tensor],
              image_tiles: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings with image features written over the ``<IMG_CONTEXT>`` positions in order."""
        h = self.language_model.embed_tokens(input_ids)
        mask = input_ids == self.config.img_context_token_id
        n_ctx = int(mask.sum())
        n_feat = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if n_ctx != n_feat:
            raise ValueError(self._mismatch_message(input_ids, mask, n_feat, image_tiles, cu_seqlens))
        if n_ctx:
            feats = image_embeds.reshape(-1, image_embeds.shape[-1]).to(h.dtype)
            h = h.masked_scatter(mask[..., None], feats)
        return h

    def _mismatch_message(self, input_ids, mask, n_feat, image_tiles, cu_seqlens) -> str:
        B, S = input_ids.shape
        bounds = cu_seqlens.tolist() if cu_seqlens is not None else [i * S for i in range(B + 1)]
        flat = mask.reshape(-1)
        counts = [int(flat[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]
        T = self.config.num_image_token
        feats_left = n_feat
        for s, c in enumerate(counts):
            if c > feats_left or c % T:
                where = f"sample {s} (tokens {bounds[s]}..{bounds[s + 1]}, row {bounds[s] // S})"
                return (f"{where} has {c} <IMG_CONTEXT> tokens, which is not a whole number of tiles of {T} "
                        f"tokens or exceeds the {feats_left} image features left ({n_feat} in all from "
                        f"{n_feat // T} tiles); per-sample counts: {counts}")
            feats_left -= c
        return (f"the batch has {sum(counts)} <IMG_CONTEXT> tokens but {n_feat} image features "
                f"({n_feat // T} tiles of {T}); per-sample counts: {counts}")

    def sequence_context(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor],
                         cu_seqlens: Optional[torch.Tensor]) -> SequenceContext:
        B, S = input_ids.shape
        if position_ids is None:
            position_ids = v2pe_position_ids(input_ids.cpu(), self.config.img_context_token_id,
                                             self.config.v2pe_delta, None if cu_seqlens is None else cu_seqlens.cpu())
        position_ids = position_ids.to(input_ids.device, torch.float32)
        mask = block_mask(cu_seqlens, B, S, True, input_ids.device)
        return SequenceContext(position_ids, cu_seqlens, mask)

    # ------------------------------------------------------------------ forward
    def hidden_states(self, input_ids, pixel_values=None, position_ids=None, cu_seqlens=None, image_tiles=None):
        image_embeds = None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            image_embeds = self.extract_feature(pixel_values)
        h = self.embed(input_ids, image_embeds, image_tiles, cu_seqlens)
        ctx = self.sequence_context(input_ids, position_ids, cu_seqlens)
        h = self.language_model.forward_layers(h, ctx)
        return self.language_model.norm(h)

    def forward(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                image_tiles: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``logits [batch, seq, vocab]``. ``pixel_values [tiles, 3, H, W]`` are consumed in order by
        the ``<IMG_CONTEXT>`` runs; ``position_ids`` default to V2PE with ``config.v2pe_delta``."""
        h = self.hidden_states(input_ids, pixel_values, position_ids, cu_seqlens, image_tiles)
        return self.language_model.lm_head(h)

    def loss_terms(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum(w * ce), sum(w)) of a ``PackedBatch``; the caller divides by the global sum(w)."""
        h = self.hidden_states(batch.input_ids, batch.pixel_values, batch.position_ids, batch.cu_seqlens,
                               batch.image_tiles)
        return self.loss_fn(h.reshape(-1, h.shape[-1]), self.language_model.lm_head.weight,
                            batch.targets.reshape(-1), batch.loss_weights.reshape(-1))
