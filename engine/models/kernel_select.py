"""Chooses the Triton kernel or the PyTorch reference for rotary, pixel shuffle and the loss.

``auto``: Triton on a CUDA device, the reference on CPU. ``triton`` on CPU needs the Triton
interpreter (``TRITON_INTERPRET=1`` set before triton is imported; float32 only).
Both paths give the same results; the model never knows which one it runs.
"""

from __future__ import annotations

import os

import torch

from engine.config import ConfigError, KernelsConfig


def triton_chosen(mode: str, key: str) -> bool:
    """Whether config ``kernels.<key>=mode`` installs the Triton kernel (per model, at build time;
    ``kernels._dispatch.use_triton`` decides per call whether a kernel can run on given tensors)."""
    on_gpu = torch.cuda.is_available()
    if mode == "reference":
        return False
    if mode == "auto":
        return on_gpu
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"kernels.{key}=triton needs a GPU, or TRITON_INTERPRET=1 for the CPU interpreter")
    return True


def configure_kernels(model, cfg: KernelsConfig) -> None:
    """Install the chosen implementation on every layer that has a kernel (``reference`` keeps
    the model's own PyTorch code)."""
    import functools

    if triton_chosen(cfg.rotary, "rotary"):
        import kernels

        rotary = functools.partial(kernels.v2pe_rotary, mode=cfg.rotary)
        for layer in model.language_model.layers:
            layer.self_attn.rotary = rotary
    if triton_chosen(cfg.pixel_shuffle, "pixel_shuffle"):
        import kernels

        model.pixel_shuffle = functools.partial(kernels.pixel_shuffle, mode=cfg.pixel_shuffle)
    if triton_chosen(cfg.loss, "loss"):
        import kernels

        vocab = model.config.llm.vocab_size
        model.loss_fn = functools.partial(kernels.weighted_linear_cross_entropy, vocab_size=vocab, mode=cfg.loss)
