"""GPU and interconnect figures used by the planner's roofline.

Every figure is a vendor datasheet number (dense, no sparsity); none is measured here, and
real kernels reach a fraction of them. ``memory_gib`` is the total that ``nvidia-smi`` reports.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense tensor-core peak
    fp32_tflops: float  # non-tensor-core fp32 peak (fp32 matmuls without TF32)
    hbm_tb_s: float  # memory bandwidth, TB/s
    memory_gib: float  # device memory
    nvlink_gb_s: float  # per GPU, per direction
    network_gb_s: float  # inter-node, per GPU (one NIC per GPU)
    source: str = "datasheet"


GPUS: dict[str, GPU] = {
    # H100 SXM5 80GB: 989 TFLOP/s bf16 dense, 67 TFLOP/s fp32, 3.35 TB/s HBM3, NVLink 4 900 GB/s
    # bidirectional; NDR InfiniBand 400 Gb/s per GPU.
    "h100": GPU("H100 SXM 80GB", 989.0, 67.0, 3.35, 79.6, 450.0, 50.0),
    # H200 SXM 141GB: the H100's compute and NVLink, HBM3e at 4.8 TB/s.
    "h200": GPU("H200 SXM 141GB", 989.0, 67.0, 4.8, 139.8, 450.0, 50.0),
    # A100 SXM4 80GB: 312 TFLOP/s bf16, 19.5 fp32, 2.04 TB/s, NVLink 3 600 GB/s bidirectional; HDR 200 Gb/s.
    "a100": GPU("A100 SXM 80GB", 312.0, 19.5, 2.039, 79.2, 300.0, 25.0),
}


def get_gpu(name: str) -> GPU:
    key = name.lower()
    if key not in GPUS:
        raise ValueError(f"--gpu {name!r} is unknown (known: {', '.join(GPUS)})")
    return GPUS[key]
