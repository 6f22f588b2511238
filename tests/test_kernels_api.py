"""Kernel selection, cheap import, the GPU compile check and the benchmark tool's no-GPU path."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import kernels
from kernels import reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_import_and_reference_do_not_import_triton():
    res = _python(
        "import sys, torch, kernels\n"
        "assert 'triton' not in sys.modules, 'import kernels imported triton'\n"
        "q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)\n"
        "kernels.reference.v2pe_rotary_ref(q, k, torch.arange(3.0))\n"
        "kernels.v2pe_rotary(q, k, torch.arange(3.0), mode='auto')\n"
        "kernels.get_kernel('pixel_shuffle', 'auto')(torch.randn(1, 4, 4, 2))\n"
        "h, w = torch.randn(4, 8), torch.randn(10, 8)\n"
        "kernels.get_kernel('loss', 'reference')(h, w, torch.tensor([1, 2, -100, 3]), torch.ones(4))\n"
        "assert 'triton' not in sys.modules, 'the CPU reference path imported triton'\n",
        env={"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0, res.stderr


def test_triton_mode_on_cpu_needs_the_interpreter():
    res = _python(
        "import torch, kernels\n"
        "try:\n"
        "    kernels.pixel_shuffle(torch.randn(1, 4, 4, 2), mode='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'TRITON_INTERPRET=1' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n",
        env={"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "0"})
    assert res.returncode == 0, res.stderr + res.stdout


def test_get_kernel_binds_mode():
    x = torch.randn(2, 4, 6, 3)
    for name in ("pixel_shuffle",):
        for mode in kernels.MODES:
            if mode == "triton" and not torch.cuda.is_available():
                continue
            assert torch.equal(kernels.get_kernel(name, mode)(x), reference.pixel_shuffle_ref(x))
    rot = kernels.get_kernel("rotary", "reference")
    q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    assert all(torch.equal(a, b) for a, b in zip(rot(q, k, torch.arange(3.0), 1e4),
                                                 reference.v2pe_rotary_ref(q, k, torch.arange(3.0), 1e4)))
    assert kernels.get_kernel("v2pe_rotary").keywords["mode"] == "auto"
    with pytest.raises(ValueError, match="unknown kernel 'softmax'"):
        kernels.get_kernel("softmax")
    with pytest.raises(ValueError, match="mode 'gpu' for 'loss'"):
        kernels.get_kernel("loss", "gpu")


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="triton without CUDA backend")
def test_kernels_compile_for_h100_without_spills():
    """Every kernel variant compiles for sm_90 with triton's ptxas (no GPU needed) and spills no registers."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--arch", "90"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [l for l in res.stdout.splitlines() if "registers" in l]
    assert len(lines) >= 20, res.stdout
    assert all(l.rstrip().endswith("spill bytes 0") for l in lines), res.stdout
    # compiled with the launcher's 16-divisibility of aligned shapes, the bulk traffic is 128-bit:
    # every store of rotary (d=128) and the shuffle, every load of the shuffle
    share = {l.split()[0]: (int(l.split("loads")[1].split("%")[0]), int(l.split("stores")[1].split("%")[0]))
             for l in lines}
    for name, (loads, stores) in share.items():
        if name.startswith("rotary(d=128") or name.startswith("pixel_shuffle("):
            assert stores == 100, f"{name}: {stores}% of stores are 128-bit"
        if name.startswith("pixel_shuffle("):
            assert loads == 100, f"{name}: {loads}% of loads are 128-bit"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tool runs the full benchmark")
def test_bench_tool_without_gpu_runs_smoke_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench_kernels.py"), "--quick",
                          "--out", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no CUDA device" in res.stdout and "CPU smoke passed" in res.stdout
    assert res.stdout.count(" ok") == 4, res.stdout


def test_bench_report_goal_checks_csv_and_plot(tmp_path, monkeypatch):
    """The benchmark's reporting on synthetic timings: goal verdicts, CSV rows, PNG."""
    spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(REPO, "tools", "bench_kernels.py"))
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_kernels", bench)
    spec.loader.exec_module(bench)
    dev = bench.Device("fake", copy_gbps=3000.0, mm_tflops=700.0)
    loss = "78B T=16384 h=8192 V=151674"
    Row = bench.Row
    dev.rows = [
        Row("loss", loss, 16384, "fwd+bwd", "triton", median_ms=230.0, peak_extra_mib=4000, workspace_mib=1000),
        Row("loss", loss, 16384, "fwd+bwd", "eager", median_ms=200.0, peak_extra_mib=40000, workspace_mib=37000),
        Row("rotary", "8B T=8192", 8192, "fwd", "triton", median_ms=0.1, gbytes=0.27),
        Row("rotary", "8B T=8192", 8192, "fwd", "eager", median_ms=0.5, gbytes=0.27),
        Row("rotary", "8B T=4096", 4096, "fwd", "triton", median_ms=0.1, gbytes=0.1),
    ]
    for r in dev.rows:
        if r.gbytes == r.gbytes:
            r.gbps = r.gbytes / r.median_ms * 1e3
            r.pct_copy_bw = 100 * r.gbps / dev.copy_gbps
    bench._speedups(dev.rows)
    checks = bench.goal_checks(dev.rows)
    assert len(checks) == 2, checks  # 4K-token rows are not judged
    assert checks[0].startswith("FAIL loss") and "time 1.15x eager" in checks[0]  # 1.15x is over the 1.1x goal
    assert checks[1].startswith("PASS rotary fwd") and "90% of copy bandwidth" in checks[1] and "5.00x eager" in checks[1]
    bench.write_csv(dev, str(tmp_path / "b.csv"))
    bench.write_plot(dev, str(tmp_path / "b.png"))
    lines = (tmp_path / "b.csv").read_text().splitlines()
    assert len(lines) == 1 + len(dev.rows) and "workspace_mib" in lines[0]
    assert (tmp_path / "b.png").stat().st_size > 1000
