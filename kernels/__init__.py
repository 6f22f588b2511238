"""Fused Triton kernels for InternVL3 training, each with a plain PyTorch reference.

``v2pe_rotary``, ``pixel_shuffle``, ``pixel_shuffle_layernorm`` and ``weighted_linear_cross_entropy``
take ``mode`` = ``auto`` (Triton on CUDA, reference elsewhere) | ``triton`` | ``reference``;
``get_kernel(name, mode)`` binds one. Importing this package does not import triton.
"""

from kernels import reference
from kernels.api import get_kernel, pixel_shuffle, pixel_shuffle_layernorm, v2pe_rotary, weighted_linear_cross_entropy
from kernels._dispatch import MODES

__all__ = ["MODES", "get_kernel", "pixel_shuffle", "pixel_shuffle_layernorm", "reference", "v2pe_rotary",
           "weighted_linear_cross_entropy"]
