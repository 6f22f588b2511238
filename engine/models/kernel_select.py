"""Chooses the Triton kernel or the PyTorch reference for rotary, pixel shuffle and the loss.

``auto``: Triton on a CUDA device, the reference on CPU. ``triton`` on CPU needs the Triton
interpreter (``TRITON_INTERPRET=1`` set before triton is imported; float32 only).
Both paths give the same results; the model never knows which one it runs.
"""

from __future__ import annotations

import os

import torch

from engine.config import ConfigError, KernelsConfig


def use_triton(mode: str, key: str) -> bool:
    on_gpu = torch.cuda.is_available()
    if mode == "reference":
        return False
    if mode == "auto":
        return on_gpu
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"kernels.{key}=triton needs a GPU, or TRITON_INTERPRET=1 for the CPU interpreter")
    return True


def _rotary_kernel(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float):
    """Adapts ``[B, S, H, D]`` to the kernel's packed ``[tokens, heads, D]`` layout."""
    import kernels

    B, S, H, D = q.shape
    qo, ko = kernels.v2pe_rotary(q.reshape(B * S, H, D), k.reshape(B * S, k.shape[2], D),
                                 positions.reshape(-1).float(), theta)
    return qo.view(B, S, H, D), ko.view(B, S, k.shape[2], D)


def _loss_kernel(hidden, weight, targets, weights):
    import kernels

    return kernels.weighted_linear_cross_entropy(hidden, weight, targets, weights)


def configure_kernels(model, cfg: KernelsConfig) -> None:
    """Install the chosen implementation on every layer that has a kernel."""
    if use_triton(cfg.rotary, "rotary"):
        for layer in model.language_model.layers:
            layer.self_attn.rotary = _rotary_kernel
    if use_triton(cfg.pixel_shuffle, "pixel_shuffle"):
        import kernels

        model.pixel_shuffle = kernels.pixel_shuffle
    if use_triton(cfg.loss, "loss"):
        model.loss_fn = _loss_kernel
