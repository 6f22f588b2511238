"""Microbenchmark of the Triton kernels against eager PyTorch, torch.compile and Liger-Kernel.

For InternVL3-8B / -78B shapes it reports median and p20/p80 time (triton.testing.do_bench, L2
flushed before every run), GB/s from the bytes each kernel must move and % of the device's copy
bandwidth measured in the same run; for the fused loss TFLOP/s and % of the measured bf16 matmul
peak, peak extra memory and, for the loss, the workspace (peak extra memory less the gradients
that every implementation returns). Eager baselines: the references (the loss's cross entropy in
float32 on upcast logits, as transformers does) and, for the loss, ``eager_bf16`` (cross entropy
straight on bf16 logits). Writes ``bench_kernels.csv`` and ``bench_kernels.png`` to ``--out``
and prints a table with the goal checks. Without a CUDA device it runs a CPU correctness smoke
(Triton interpreter vs reference on tiny shapes) instead and exits 0 when that passes.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

LLMS = {"8B": dict(hidden=3584, heads=28, kv_heads=4, head_dim=128),
        "78B": dict(hidden=8192, heads=64, kv_heads=8, head_dim=128)}
VITS = {"300M": 1024, "6B": 3200}
VOCAB = 151674
PATCHES_PER_TILE = 1024  # 32 x 32
DEVICE = "cuda"
DTYPE = torch.bfloat16


@dataclass
class Row:
    kernel: str
    shape: str
    tokens: int
    direction: str  # fwd | bwd | fwd+bwd
    impl: str  # triton | eager | compile | liger
    median_ms: float = math.nan
    p20_ms: float = math.nan
    p80_ms: float = math.nan
    gbytes: float = math.nan
    gbps: float = math.nan
    pct_copy_bw: float = math.nan
    tflops: float = math.nan
    pct_mm_peak: float = math.nan
    peak_extra_mib: float = math.nan
    workspace_mib: float = math.nan
    speedup_vs_eager: float = math.nan
    speedup_vs_compile: float = math.nan
    speedup_vs_liger: float = math.nan
    note: str = ""


@dataclass
class Device:
    name: str
    copy_gbps: float
    mm_tflops: float
    rows: list[Row] = field(default_factory=list)


# ----------------------------------------------------------------------------- measurement


def _bench(fn: Callable[[], object], rep: int = 100) -> tuple[float, float, float]:
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80


def _peak_extra_mib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_device() -> Device:
    """Copy bandwidth (1 GiB device-to-device copy, read + write counted) and bf16 matmul peak (8192^3)."""
    n = 2**29
    src = torch.empty(n, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    med, _, _ = _bench(lambda: dst.copy_(src))
    copy_gbps = 2 * src.numel() * src.element_size() / med / 1e6
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEVICE)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEVICE)
    med, _, _ = _bench(lambda: a @ b)
    mm_tflops = 2 * 8192**3 / med / 1e9
    return Device(torch.cuda.get_device_name(), copy_gbps, mm_tflops)


def _time_impls(dev: Device, kernel: str, shape: str, tokens: int, impls: dict[str, Callable],
                inputs: list[torch.Tensor], grads: list[torch.Tensor], gbytes_fwd: float, gbytes_bwd: float) -> None:
    """Forward and backward timings of a memory-bound kernel; backward reruns a retained graph."""

    def as_list(out) -> list[torch.Tensor]:
        return list(out) if isinstance(out, (tuple, list)) else [out]

    for impl, fn in impls.items():
        fwd = Row(kernel, shape, tokens, "fwd", impl, gbytes=gbytes_fwd)
        bwd = Row(kernel, shape, tokens, "bwd", impl, gbytes=gbytes_bwd)
        try:
            fwd.median_ms, fwd.p20_ms, fwd.p80_ms = _bench(fn)
            fwd.peak_extra_mib = _peak_extra_mib(fn)
            bwd.peak_extra_mib = _peak_extra_mib(lambda: torch.autograd.grad(as_list(fn()), inputs, grads))
            outs = as_list(fn())
            try:
                bwd.median_ms, bwd.p20_ms, bwd.p80_ms = _bench(
                    lambda: torch.autograd.grad(outs, inputs, grads, retain_graph=True))
            except RuntimeError:  # a backward that cannot rerun a retained graph: time fwd+bwd minus fwd
                both = _bench(lambda: torch.autograd.grad(as_list(fn()), inputs, grads))
                bwd.median_ms = both[0] - fwd.median_ms
                bwd.note = "bwd = median(fwd+bwd) - median(fwd)"
            del outs
        except Exception as e:  # record and go on (OOM, missing compiler, ...)
            (bwd if fwd.median_ms == fwd.median_ms else fwd).note = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        for row in (fwd, bwd):
            if row.median_ms == row.median_ms:
                row.gbps = row.gbytes / row.median_ms * 1e3
                row.pct_copy_bw = 100 * row.gbps / dev.copy_gbps
            dev.rows.append(row)
        torch.cuda.empty_cache()


def bench_rotary(dev: Device, tokens_list: list[int], compile_ref: bool) -> None:
    import kernels
    from kernels import reference

    for name, m in LLMS.items():
        for tokens in tokens_list:
            hq, hk, d = m["heads"], m["kv_heads"], m["head_dim"]
            q = torch.randn(tokens, hq, d, device=DEVICE, dtype=DTYPE, requires_grad=True)
            k = torch.randn(tokens, hk, d, device=DEVICE, dtype=DTYPE, requires_grad=True)
            pos = torch.cumsum(torch.rand(tokens, device=DEVICE), 0)
            gq, gk = torch.randn_like(q), torch.randn_like(k)
            impls = {"triton": lambda: kernels.v2pe_rotary(q, k, pos, 1e6, mode="triton"),
                     "eager": lambda: reference.v2pe_rotary_ref(q, k, pos, 1e6)}
            if compile_ref:
                compiled = torch.compile(reference.v2pe_rotary_ref)
                impls["compile"] = lambda: compiled(q, k, pos, 1e6)
            gb = 2 * (q.numel() + k.numel()) * q.element_size() / 1e9 + tokens * 4 / 1e9
            _time_impls(dev, "rotary", f"{name} T={tokens} hq={hq} hk={hk} d={d}", tokens, impls, [q, k],
                        [gq, gk], gb, gb)
            del q, k, gq, gk


def bench_pixel_shuffle(dev: Device, tokens_list: list[int], compile_ref: bool, layernorm: bool) -> None:
    import kernels
    from kernels import reference

    for name, c in VITS.items():
        for tokens in tokens_list:
            tiles = tokens // PATCHES_PER_TILE
            x = torch.randn(tiles, 32, 32, c, device=DEVICE, dtype=DTYPE, requires_grad=True)
            gy = torch.randn(tiles, 16, 16, 4 * c, device=DEVICE, dtype=DTYPE)
            es = x.element_size()
            if layernorm:
                w = torch.randn(4 * c, device=DEVICE, dtype=DTYPE, requires_grad=True)
                b = torch.randn(4 * c, device=DEVICE, dtype=DTYPE, requires_grad=True)
                impls = {"triton": lambda: kernels.pixel_shuffle_layernorm(x, w, b, mode="triton"),
                         "eager": lambda: reference.pixel_shuffle_layernorm_ref(x, w, b)}
                if compile_ref:
                    compiled = torch.compile(reference.pixel_shuffle_layernorm_ref)
                    impls["compile"] = lambda: compiled(x, w, b)
                inputs, kname = [x, w, b], "pixel_shuffle_layernorm"
                gb_f, gb_b = 2 * x.numel() * es / 1e9, 3 * x.numel() * es / 1e9
            else:
                impls = {"triton": lambda: kernels.pixel_shuffle(x, mode="triton"),
                         "eager": lambda: reference.pixel_shuffle_ref(x)}
                if compile_ref:
                    compiled = torch.compile(reference.pixel_shuffle_ref)
                    impls["compile"] = lambda: compiled(x)
                inputs, kname = [x], "pixel_shuffle"
                gb_f = gb_b = 2 * x.numel() * es / 1e9
            _time_impls(dev, kname, f"ViT-{name} tiles={tiles} C={c}", tokens, impls, inputs, [gy], gb_f, gb_b)
            del x, gy


def _eager_loss(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, tw: torch.Tensor, upcast: bool = True):
    """The reference loss without argument validation (no host sync, compiles without graph breaks)."""
    import torch.nn.functional as F

    logits = F.linear(h, w)
    ce = F.cross_entropy(logits.float() if upcast else logits, labels, reduction="none", ignore_index=-100)
    wv = tw * (labels != -100)
    return (wv * ce.float()).sum(), wv.sum()


def bench_loss(dev: Device, cases: list[tuple[int, int, float]], compile_ref: bool) -> None:
    """Fused loss fwd+bwd. ``ignored`` is the share of tokens labelled -100 (image and prompt tokens);
    TFLOP/s counts the useful GEMM work, on supervised tokens only (the fused path skips the rest)."""
    import kernels

    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum", ignore_index=-100)
    except Exception:
        liger = None
    for tokens, hidden, ignored in cases:
        name = next(n for n, m in LLMS.items() if m["hidden"] == hidden)
        h = torch.randn(tokens, hidden, device=DEVICE, dtype=DTYPE, requires_grad=True)
        w = (torch.randn(VOCAB, hidden, device=DEVICE, dtype=DTYPE) * hidden**-0.5).requires_grad_()
        labels = torch.randint(0, VOCAB, (tokens,), device=DEVICE)
        labels[torch.randperm(tokens, device=DEVICE)[:int(ignored * tokens)]] = -100
        supervised = int((labels != -100).sum())
        tw = torch.rand(tokens, device=DEVICE)
        impls = {"triton": lambda: kernels.weighted_linear_cross_entropy(h, w, labels, tw, mode="triton")[0],
                 "eager": lambda: _eager_loss(h, w, labels, tw)[0],
                 "eager_bf16": lambda: _eager_loss(h, w, labels, tw, upcast=False)[0]}
        if compile_ref:
            compiled = torch.compile(_eager_loss)
            impls["compile"] = lambda: compiled(h, w, labels, tw)[0]
        if liger is not None:
            impls["liger"] = lambda: liger(w, h, labels)
        flops = 3 * 2 * supervised * VOCAB * hidden
        grads_mib = (h.numel() * h.element_size() + w.numel() * w.element_size()) / 2**20
        shape = f"{name} T={tokens} h={hidden} V={VOCAB}" + (f" ignored={ignored:.0%}" if ignored else "")
        for impl, fn in impls.items():
            row = Row("loss", shape, tokens, "fwd+bwd", impl)
            try:
                step = lambda: torch.autograd.grad(fn(), (h, w))  # noqa: E731
                row.peak_extra_mib = _peak_extra_mib(step)
                row.workspace_mib = row.peak_extra_mib - grads_mib
                row.median_ms, row.p20_ms, row.p80_ms = _bench(step, rep=1000)
                row.tflops = flops / row.median_ms / 1e9
                row.pct_mm_peak = 100 * row.tflops / dev.mm_tflops
            except Exception as e:
                row.note = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            dev.rows.append(row)
            torch.cuda.empty_cache()
        del h, w, labels, tw


def _speedups(rows: list[Row]) -> None:
    by = {(r.kernel, r.shape, r.direction, r.impl): r for r in rows}
    for r in rows:
        if r.impl != "triton":
            continue
        for other, attr in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile"),
                            ("liger", "speedup_vs_liger")):
            o = by.get((r.kernel, r.shape, r.direction, other))
            if o is not None and o.median_ms == o.median_ms and r.median_ms == r.median_ms:
                setattr(r, attr, o.median_ms / r.median_ms)


# ----------------------------------------------------------------------------- reporting


def goal_checks(rows: list[Row]) -> list[str]:
    """The H100 goals: memory-bound kernels >= 85% of copy bandwidth and >= 2x eager at 8K+ tokens;
    fused loss at 16K tokens, hidden 8192: peak extra memory <= 1/8 of eager, time <= 1.1x eager."""
    out = []
    by = {(r.kernel, r.shape, r.direction, r.impl): r for r in rows}
    for r in rows:
        if r.impl != "triton":
            continue
        if r.kernel in ("rotary", "pixel_shuffle", "pixel_shuffle_layernorm") and r.tokens >= 8192:
            ok = r.pct_copy_bw >= 85 and r.speedup_vs_eager >= 2
            out.append(f"{'PASS' if ok else 'FAIL'} {r.kernel} {r.direction} {r.shape}: {r.pct_copy_bw:.0f}% of copy "
                       f"bandwidth (goal 85%), {r.speedup_vs_eager:.2f}x eager (goal 2x)")
        if r.kernel == "loss" and r.tokens == 16384 and "h=8192" in r.shape and "ignored" not in r.shape:
            e = by.get((r.kernel, r.shape, r.direction, "eager"))
            if e is None:
                continue
            mem = r.workspace_mib / e.workspace_mib
            t = r.median_ms / e.median_ms
            ok = mem <= 1 / 8 and t <= 1.1
            line = (f"{'PASS' if ok else 'FAIL'} loss {r.shape}: workspace {mem:.3f} of eager's (goal <= 0.125; "
                    f"peak incl. gradients {r.peak_extra_mib / e.peak_extra_mib:.3f}), time {t:.2f}x eager (goal <= 1.1)")
            b = by.get((r.kernel, r.shape, r.direction, "eager_bf16"))
            if b is not None and b.median_ms == b.median_ms:
                line += (f"; vs eager_bf16: workspace {r.workspace_mib / b.workspace_mib:.3f}, "
                         f"time {r.median_ms / b.median_ms:.2f}x")
            out.append(line)
    return out


def _fmt(x: float, spec: str) -> str:
    return "-" if x != x else format(x, spec)


def print_table(dev: Device) -> None:
    print(f"\n{dev.name}: copy bandwidth {dev.copy_gbps:.0f} GB/s, bf16 matmul {dev.mm_tflops:.0f} TFLOP/s")
    hdr = (f"{'kernel':24s} {'shape':40s} {'dir':7s} {'impl':10s} {'median ms':>10s} {'p20':>8s} {'p80':>8s} "
           f"{'GB/s':>7s} {'%bw':>5s} {'TFLOP/s':>8s} {'%mm':>5s} {'peak MiB':>9s} {'work MiB':>9s} {'x eager':>8s} {'x compile':>9s} "
           f"{'x liger':>8s}")
    print(hdr)
    print("-" * len(hdr))
    for r in dev.rows:
        print(f"{r.kernel:24s} {r.shape:40s} {r.direction:7s} {r.impl:10s} {_fmt(r.median_ms, '10.3f')} "
              f"{_fmt(r.p20_ms, '8.3f')} {_fmt(r.p80_ms, '8.3f')} {_fmt(r.gbps, '7.0f')} {_fmt(r.pct_copy_bw, '5.0f')} "
              f"{_fmt(r.tflops, '8.0f')} {_fmt(r.pct_mm_peak, '5.0f')} {_fmt(r.peak_extra_mib, '9.0f')} {_fmt(r.workspace_mib, '9.0f')} "
              f"{_fmt(r.speedup_vs_eager, '8.2f')} {_fmt(r.speedup_vs_compile, '9.2f')} {_fmt(r.speedup_vs_liger, '8.2f')}"
              f"{'  ' + r.note if r.note else ''}")
    print()
    for line in goal_checks(dev.rows):
        print(line)


def write_csv(dev: Device, path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["device", "copy_gbps", "mm_tflops", *Row.__dataclass_fields__])
        writer.writeheader()
        for r in dev.rows:
            writer.writerow(dict(device=dev.name, copy_gbps=round(dev.copy_gbps, 1), mm_tflops=round(dev.mm_tflops, 1),
                                 **asdict(r)))


def write_plot(dev: Device, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["rotary", "pixel_shuffle", "pixel_shuffle_layernorm", "loss"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for ax, kernel in zip(axes.flat, panels):
        rows = [r for r in dev.rows if r.kernel == kernel and r.median_ms == r.median_ms]
        series: dict[tuple[str, str, str], list[Row]] = {}
        for r in rows:
            model = r.shape.split()[0]
            series.setdefault((model, r.direction, r.impl), []).append(r)
        for (model, direction, impl), rs in sorted(series.items()):
            rs.sort(key=lambda r: r.tokens)
            y = [r.tflops if kernel == "loss" else r.pct_copy_bw for r in rs]
            ax.plot([r.tokens for r in rs], y, marker="o", label=f"{model} {direction} {impl}",
                    linestyle="-" if impl == "triton" else "--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel("TFLOP/s" if kernel == "loss" else "% of copy bandwidth")
        if kernel != "loss":
            ax.axhline(85, color="gray", linewidth=0.8)
        ax.set_title(kernel)
        if series:
            ax.legend(fontsize=6)
    fig.suptitle(f"{dev.name}: copy {dev.copy_gbps:.0f} GB/s, bf16 matmul {dev.mm_tflops:.0f} TFLOP/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- CPU smoke


def cpu_smoke() -> bool:
    """Triton (interpreted) vs reference on tiny float32 shapes, forward and backward."""
    import kernels
    from kernels.testing import poison_outputs

    torch.manual_seed(0)
    results: list[tuple[str, float]] = []

    def compare(name: str, fn: Callable[[str], list[torch.Tensor]]) -> None:
        with poison_outputs():
            got = fn("triton")
        want = fn("reference")
        err = max(((a.float() - b.float()).abs().max().item() if a.numel() else 0.0) for a, b in zip(got, want))
        results.append((name, err))

    q, k = torch.randn(19, 4, 16), torch.randn(19, 2, 16)
    pos = torch.cumsum(torch.rand(19), 0) * 1e4
    gq, gk = torch.randn_like(q), torch.randn_like(k)

    def rotary(mode):
        qv, kv = q.clone().requires_grad_(), k.clone().requires_grad_()
        qo, ko = kernels.v2pe_rotary(qv, kv, pos, 1e6, mode=mode)
        return [qo, ko, *torch.autograd.grad([qo, ko], [qv, kv], [gq, gk])]

    x = torch.randn(2, 4, 6, 10)
    gy = torch.randn(2, 2, 3, 40)
    w, b = torch.randn(40), torch.randn(40)

    def shuffle(mode):
        xv = x.clone().requires_grad_()
        y = kernels.pixel_shuffle(xv, mode=mode)
        return [y, *torch.autograd.grad(y, xv, gy)]

    def shuffle_ln(mode):
        xv, wv, bv = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        y = kernels.pixel_shuffle_layernorm(xv, wv, bv, mode=mode)
        return [y, *torch.autograd.grad(y, (xv, wv, bv), gy)]

    h, lw = torch.randn(23, 16), torch.randn(40, 16)
    labels = torch.randint(0, 37, (23,))
    labels[::4] = -100
    tw = torch.rand(23)

    def loss(mode):
        hv, wv = h.clone().requires_grad_(), lw.clone().requires_grad_()
        l, s = kernels.weighted_linear_cross_entropy(hv, wv, labels, tw, chunk_size=8, vocab_size=37, mode=mode)
        return [l, s, *torch.autograd.grad(l, (hv, wv))]

    for name, fn in (("rotary", rotary), ("pixel_shuffle", shuffle), ("pixel_shuffle_layernorm", shuffle_ln),
                     ("loss", loss)):
        compare(name, fn)
    ok = True
    for name, err in results:
        good = err <= 1e-4
        ok &= good
        print(f"  {name:24s} max |triton - reference| = {err:.2e}  {'ok' if good else 'MISMATCH'}")
    return ok


# ----------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Triton kernel microbenchmark (InternVL3-8B/78B shapes)")
    p.add_argument("--quick", action="store_true", help="small sweep: 8K tokens, the 16K x 8192 loss")
    p.add_argument("--out", default=os.path.join(REPO, "runs", "bench_kernels"), help="folder for CSV and PNG")
    p.add_argument("--kernels", default="rotary,pixel_shuffle,pixel_shuffle_layernorm,loss",
                   help="comma-separated subset")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = p.parse_args(argv)
    chosen = set(args.kernels.split(","))
    unknown = chosen - {"rotary", "pixel_shuffle", "pixel_shuffle_layernorm", "loss"}
    if unknown:
        p.error(f"unknown kernels: {', '.join(sorted(unknown))}")

    if not torch.cuda.is_available():
        print("no CUDA device: the benchmark needs a GPU. Running the CPU correctness smoke "
              "(Triton interpreter vs reference, tiny shapes) instead.")
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("triton was imported before TRITON_INTERPRET could be set; cannot interpret")
            return 1
        os.environ["TRITON_INTERPRET"] = "1"
        ok = cpu_smoke()
        print("CPU smoke passed" if ok else "CPU smoke FAILED")
        return 0 if ok else 1

    tokens = [8192] if args.quick else [4096, 8192, 16384, 32768]
    loss_cases = [(16384, 8192, 0.0)] if args.quick else [(t, h, 0.0) for h in (3584, 8192) for t in (4096, 8192, 16384, 32768)]
    loss_cases.append((16384, 8192, 0.5))
    dev = measure_device()
    print(f"{dev.name}: copy {dev.copy_gbps:.0f} GB/s, bf16 matmul {dev.mm_tflops:.0f} TFLOP/s", flush=True)
    compile_ref = not args.no_compile
    if "rotary" in chosen:
        bench_rotary(dev, tokens, compile_ref)
    if "pixel_shuffle" in chosen:
        bench_pixel_shuffle(dev, tokens, compile_ref, layernorm=False)
    if "pixel_shuffle_layernorm" in chosen:
        bench_pixel_shuffle(dev, tokens, compile_ref, layernorm=True)
    if "loss" in chosen:
        bench_loss(dev, loss_cases, compile_ref)
    _speedups(dev.rows)
    os.makedirs(args.out, exist_ok=True)
    write_csv(dev, os.path.join(args.out, "bench_kernels.csv"))
    write_plot(dev, os.path.join(args.out, "bench_kernels.png"))
    print_table(dev)
    print(f"\nwrote {os.path.join(args.out, 'bench_kernels.csv')} and bench_kernels.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
