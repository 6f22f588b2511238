"""One command that measures the engine on a lent GPU (one H100/H200): GPU tests, kernel
microbenchmarks and one-GPU training throughput against transformers.

    python tools/gpu_check.py --out DIR [--minutes M] [--steps N] [--llm-layers L] [--vit-layers V]
    python tools/gpu_check.py --dry-run --out DIR      # same code paths on CPU, toy sizes

Writes ``DIR/gpu_check.json`` (keys ``device``, ``date``, ``dry_run``, ``tests``, ``kernels``,
``train``) and ``DIR/gpu_check.md`` (a table per section). Exits 0 when every section ran; a
failure inside a section is recorded in the JSON, not raised.

Sections:
  tests    ``pytest -q -m gpu tests`` in a subprocess (dry run: ``tests/test_attention.py`` only);
           counts parsed from pytest's summary line.
  kernels  ``tools/bench_kernels.py`` in-process at its ``--quick`` sizes without the
           torch.compile baseline (8K tokens, the 16K x 8192 loss); Liger rows when
           ``liger_kernel`` imports. Without CUDA: its CPU correctness smoke (Triton interpreter).
  train    InternVL3-1B/2B shapes (layers cut, said in each row), N AdamW steps on random packed
           batches: the engine (``build_model`` + ``build_optimizer``, bf16 autocast, phases timed
           with synchronised timers) and ``transformers.InternVLForConditionalGeneration`` of the
           same dimensions (sdpa, fused AdamW, the same samples right-padded). Dry run: ``tiny``
           preset, 2 steps, CPU, float32.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
from types import SimpleNamespace
from typing import Any, Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


class Budget:
    def __init__(self, minutes: float):
        self.end = time.monotonic() + 60 * minutes

    def left(self) -> float:
        return self.end - time.monotonic()


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


# ----------------------------------------------------------------------------- tests


SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")


def parse_pytest_summary(text: str) -> dict:
    counts = {k: 0 for k in ("passed", "failed", "skipped", "deselected", "errors", "xfailed", "xpassed")}
    lines = [l for l in text.strip().splitlines() if SUMMARY.search(l)]
    if lines:
        for n, kind in SUMMARY.findall(lines[-1]):
            counts["errors" if kind.startswith("error") else kind] = int(n)
    return counts


def run_tests(dry: bool, budget: Budget) -> dict:
    targets = ["tests/test_attention.py"] if dry else ["tests"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *targets]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out: dict[str, Any] = {"command": " ".join(cmd[1:])}
    t0 = time.monotonic()
    try:
        timeout = max(30.0, budget.left() * 0.4)
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        text = p.stdout + p.stderr
        out["returncode"] = p.returncode
        out.update(parse_pytest_summary(text))
        out["summary"] = next((l for l in reversed(text.strip().splitlines()) if SUMMARY.search(l)), "")
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
        if failed:
            out["failed_tests"] = failed[:50]
        if p.returncode not in (0, 5):  # 5: no tests collected (everything deselected)
            out["tail"] = text[-3000:]
    except subprocess.TimeoutExpired as e:
        out["error"] = f"timed out after {e.timeout:.0f} s"
    except Exception as e:
        out["error"] = _err(e)
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


# ----------------------------------------------------------------------------- kernels


def _load_bench_kernels():
    spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(REPO, "tools", "bench_kernels.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _row_dict(row) -> dict:
    from dataclasses import asdict

    return {k: (None if isinstance(v, float) and v != v else (round(v, 4) if isinstance(v, float) else v))
            for k, v in asdict(row).items()}


def run_kernels(dry: bool, budget: Budget) -> dict:
    import torch

    out: dict[str, Any] = {"liger_kernel": importlib.util.find_spec("liger_kernel") is not None}
    try:
        bk = _load_bench_kernels()
    except Exception as e:
        out["error"] = _err(e)
        return out
    if dry or not torch.cuda.is_available():
        # bench_kernels' CPU path: Triton interpreter vs reference on tiny shapes.
        out["skipped"] = "needs a GPU"
        if os.environ.get("TRITON_INTERPRET") != "1" and "triton" in sys.modules:
            out["cpu_smoke"] = {"error": "triton imported before TRITON_INTERPRET=1 was set"}
            return out
        os.environ["TRITON_INTERPRET"] = "1"
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                ok = bk.cpu_smoke()
            errs = {m.group(1): float(m.group(2)) for m in
                    re.finditer(r"^\s*(\S+)\s+max \|triton - reference\| = (\S+)", buf.getvalue(), re.M)}
            out["cpu_smoke"] = {"ok": bool(ok), "max_abs_err": errs}
        except Exception as e:
            out["cpu_smoke"] = {"error": _err(e)}
        # the table-building path, on an empty device record
        dev = bk.Device("cpu (dry run)", math.nan, math.nan)
        out.update(device=dev.name, rows=[_row_dict(r) for r in dev.rows], goal_checks=bk.goal_checks(dev.rows))
        return out

    tokens, loss_cases = [8192], [(16384, 8192, 0.0), (16384, 8192, 0.5)]  # bench_kernels --quick
    try:
        dev = bk.measure_device()
    except Exception as e:
        out["error"] = _err(e)
        return out
    out.update(device=dev.name, copy_gbps=round(dev.copy_gbps, 1), mm_tflops=round(dev.mm_tflops, 1),
               sizes="bench_kernels --quick --no-compile (8K tokens; loss 16K x 8192)")
    errors = {}
    benches: list[tuple[str, Callable[[], None]]] = [
        ("rotary", lambda: bk.bench_rotary(dev, tokens, False)),
        ("pixel_shuffle", lambda: bk.bench_pixel_shuffle(dev, tokens, False, layernorm=False)),
        ("pixel_shuffle_layernorm", lambda: bk.bench_pixel_shuffle(dev, tokens, False, layernorm=True)),
        ("loss", lambda: bk.bench_loss(dev, loss_cases, False)),
    ]
    for name, fn in benches:
        if budget.left() < 60:
            errors[name] = "skipped: out of time"
            continue
        try:
            fn()
        except Exception as e:
            errors[name] = _err(e)
        torch.cuda.empty_cache()
    bk._speedups(dev.rows)
    out["rows"] = [_row_dict(r) for r in dev.rows]
    out["goal_checks"] = bk.goal_checks(dev.rows)
    if errors:
        out["errors"] = errors
    return out


# ----------------------------------------------------------------------------- train: data


def make_samples(cfg, n: int, sample_tokens: int, tiles: int, seed: int = 0) -> list:
    """``n`` random samples of ``sample_tokens/2 .. sample_tokens`` tokens: a text prompt, one image
    of ``tiles`` tiles, a supervised answer (lengths vary, so right padding costs what it does)."""
    import torch

    from engine.data.batch import IGNORE_INDEX, Sample

    m = cfg.model
    g = torch.Generator().manual_seed(seed)
    visual = tiles * m.num_image_token
    low = max(m.img_context_token_id, m.img_start_token_id, m.img_end_token_id) + 1
    out = []
    for k in range(n):
        length = int(torch.randint(sample_tokens // 2, sample_tokens + 1, (1,), generator=g))
        text = max(length - visual - 2, 8)
        prompt = text // 4
        ids = torch.randint(low, m.llm.vocab_size, (text,), generator=g)
        input_ids = torch.cat([ids[:prompt], torch.tensor([m.img_start_token_id]),
                               torch.full((visual,), m.img_context_token_id), torch.tensor([m.img_end_token_id]),
                               ids[prompt:]])
        labels = input_ids.clone()
        labels[:prompt + visual + 2] = IGNORE_INDEX
        pixels = torch.randn(tiles, 3, m.vision.image_size, m.vision.image_size, generator=g)
        out.append(Sample(input_ids=input_ids, labels=labels, pixel_values=pixels, image_tiles=[tiles],
                          source=f"synthetic:{k}", index=k))
    return out


def hf_batch(samples: list, pad_id: int = 0) -> dict:
    """The same samples as one right-padded transformers batch."""
    import torch

    L = max(s.num_tokens for s in samples)
    ids = torch.full((len(samples), L), pad_id, dtype=torch.int64)
    labels = torch.full((len(samples), L), -100, dtype=torch.int64)
    mask = torch.zeros((len(samples), L), dtype=torch.int64)
    for r, s in enumerate(samples):
        n = s.num_tokens
        ids[r, :n], labels[r, :n], mask[r, :n] = s.input_ids, s.labels, 1
    return dict(input_ids=ids, labels=labels, attention_mask=mask,
                pixel_values=torch.cat([s.pixel_values for s in samples]))


# ----------------------------------------------------------------------------- train: timing


class Timer:
    def __init__(self, device):
        self.device = device
        self.t = time.perf_counter()

    def lap(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


def _peak_mem_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_mem(device) -> tuple[float, str]:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "torch.cuda.max_memory_allocated"
    from engine.metrics import peak_rss_mib

    return peak_rss_mib(), "peak RSS of the process (VmHWM, whole run so far)"


def engine_steps(cfg, samples_per_step: list[list], device, dtype) -> dict:
    """Optimizer steps of the engine's own single-process runner (``LocalRunner``: packing, the
    language-modelling objective, the parameter dtype of ``train.param_dtype``), timed by phase with
    synchronised timers: hooks mark the ViT forward, the LLM forward and the loss of the (one)
    microbatch; the rest of ``forward_backward`` is its backward."""
    from engine.parallel.objective import LanguageModelling
    from engine.step import LocalRunner
    from engine.trainer import build_model

    t = Timer(device)
    ph: dict[str, float] = {}

    class TimedObjective(LanguageModelling):
        def head(self, lm, layout, h, tokens, mb):
            ph["llm_fwd"] = ph.get("llm_fwd", 0.0) + t.lap()
            out = super().head(lm, layout, h, tokens, mb)
            ph["loss_fwd"] = ph.get("loss_fwd", 0.0) + t.lap()
            return out

    runner = LocalRunner(build_model(cfg), cfg, device, dtype, objective=TimedObjective())
    model = runner.model
    params = sum(p.numel() for p in model.parameters())
    param_dtype = next(model.parameters()).dtype
    model.vision_model.register_forward_pre_hook(lambda *_: ph.__setitem__("pack", ph.get("pack", 0.0) + t.lap()))
    model.projector.register_forward_hook(lambda *_: ph.__setitem__("vit_fwd", ph.get("vit_fwd", 0.0) + t.lap()))
    steps = []
    for samples in samples_per_step:
        ph.clear()
        t.lap()
        stats = runner.forward_backward(samples)
        ph["backward"] = t.lap()
        runner.optimizer.step()
        runner.optimizer.zero_grad(set_to_none=True)
        ph["optimizer"] = t.lap()
        b = runner.last_packed
        steps.append(dict(phases=dict(ph), tokens=stats["tokens"], tiles=sum(s.num_tiles for s in samples),
                          padded_tokens=sum(int(x.batch.input_ids.numel()) for x in b), loss=stats["loss"]))
    return dict(params=params, steps=steps, attention="engine auto (best of flash/varlen/flex/sdpa)",
                param_dtype=str(param_dtype).replace("torch.", ""), runner="engine.step.LocalRunner")


def hf_steps(cfg, samples_per_step: list[list], device, dtype) -> dict:
    """transformers' InternVL with sdpa attention and torch's AdamW (fused on GPU); phases:
    forward+loss, backward, optimizer (no hooks into its stages)."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from engine.models.hf_adapter import engine_config_to_hf, vit_layers_of
    from engine.models.layers import autocast_context

    hf_cfg = InternVLConfig(**engine_config_to_hf(cfg.model, vit_layers=vit_layers_of(cfg.model)))
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(cfg.train.seed)
    model = InternVLForConditionalGeneration(hf_cfg).to(device).train()
    try:
        model.set_attn_implementation("sdpa")
    except Exception:
        pass
    params = sum(p.numel() for p in model.parameters())
    kwargs = dict(lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), eps=cfg.train.eps,
                  weight_decay=cfg.train.weight_decay)
    if device.type == "cuda":
        kwargs["fused"] = True
    opt = torch.optim.AdamW(model.parameters(), **kwargs)
    steps = []
    for samples in samples_per_step:
        batch = {k: v.to(device) for k, v in hf_batch(samples).items()}
        t = Timer(device)
        ph = {}
        with autocast_context(device, dtype):
            loss = model(**batch, use_cache=False).loss
            ph["fwd_loss"] = t.lap()
        loss.backward()
        ph["backward"] = t.lap()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ph["optimizer"] = t.lap()
        steps.append(dict(phases=ph, tokens=int(batch["attention_mask"].sum()), tiles=int(batch["pixel_values"].shape[0]),
                          padded_tokens=int(batch["input_ids"].numel()), loss=float(loss.detach())))
    return dict(params=params, steps=steps, attention=getattr(hf_cfg, "_attn_implementation", "sdpa"))


def planner_flops(cfg, tokens: int, tiles: int, span: float) -> float:
    """``engine.planning.cost.model_flops_per_step`` for one process, one microbatch."""
    from engine.planning.cost import model_flops_per_step

    layout = SimpleNamespace(llm_dp=1, tiles_per_step=lambda c, w: tiles)
    work = SimpleNamespace(tokens=tokens, span=span)
    return model_flops_per_step(cfg, layout, work)


def train_row(name: str, trainer: str, cfg, cut: str, runner, samples_per_step, warmup: int, device, dtype,
              peak_flops: Optional[float]) -> dict:
    import gc

    import torch

    row: dict[str, Any] = dict(model=name, trainer=trainer, layers=cut, device=device.type,
                               dtype=str(dtype or torch.float32).replace("torch.", ""))
    try:
        _peak_mem_reset(device)
        res = runner(cfg, samples_per_step, device, dtype)
        timed = res["steps"][warmup:] or res["steps"]
        step_s = [sum(s["phases"].values()) for s in timed]
        tot = sum(step_s)
        tokens = sum(s["tokens"] for s in timed)
        padded = sum(s["padded_tokens"] for s in timed)
        tiles = sum(s["tiles"] for s in timed)
        n_samples = sum(len(x) for x in samples_per_step[warmup:] or samples_per_step)
        span = tokens / max(n_samples, 1)
        flops = planner_flops(cfg, tokens, tiles, span)
        mem, mem_kind = _peak_mem(device)
        phases = {k: round(1e3 * sum(s["phases"][k] for s in timed) / len(timed), 2) for k in timed[0]["phases"]}
        row.update(attention=res.get("attention"), param_dtype=res.get("param_dtype", "float32"), params_m=round(res["params"] / 1e6, 1), steps_timed=len(timed), warmup_steps=len(res["steps"]) - len(timed),
                   samples_per_step=len(samples_per_step[0]), tokens_per_step=tokens // len(timed),
                   padded_tokens_per_step=padded // len(timed), step_ms=round(1e3 * tot / len(timed), 2),
                   tokens_per_s=round(tokens / tot, 1), phase_ms=phases, peak_mem_mib=round(mem, 1),
                   peak_mem_kind=mem_kind, tflops=round(flops / tot / 1e12, 3),
                   mfu=round(flops / tot / peak_flops, 4) if peak_flops else None,
                   mfu_formula="planner FLOPs (engine/planning/cost.py model_flops_per_step, useful tokens only, "
                               "no recompute) / (step time x bf16 peak "
                               + (f"{peak_flops / 1e12:.0f} TFLOP/s)" if peak_flops else "n/a on CPU)"),
                   losses=[round(s["loss"], 4) for s in res["steps"]])
    except Exception as e:
        row["error"] = _err(e)
        row["traceback"] = traceback.format_exc()[-2000:]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run_train(args, budget: Budget) -> dict:
    import torch

    from engine.config import config_from_dict
    from engine.trainer import resolve_dtype

    dry = args.dry_run
    device = torch.device("cpu") if dry or not torch.cuda.is_available() else torch.device("cuda")
    dtype = None if dry else resolve_dtype("auto", device)
    peak = None
    if device.type == "cuda":
        from engine.planning.hardware import get_gpu

        gname = torch.cuda.get_device_name()
        peak = get_gpu("h200" if "H200" in gname else "h100").bf16_tflops * 1e12
    presets = ["tiny"] if dry else ["internvl3-1b", "internvl3-2b"]
    steps = 2 if dry else args.steps
    warmup = 0 if dry else args.warmup
    rows = []
    out: dict[str, Any] = {"rows": rows}
    for preset in presets:
        from engine.models.presets import preset_model_config

        full = preset_model_config(preset)
        model: dict[str, Any] = {"preset": preset}
        llm_l = full.llm.num_layers if dry or not args.llm_layers else min(args.llm_layers, full.llm.num_layers)
        vit_l = full.vision.num_layers if dry or not args.vit_layers else min(args.vit_layers, full.vision.num_layers)
        if llm_l != full.llm.num_layers or vit_l != full.vision.num_layers:
            model.update(llm={"num_layers": llm_l}, vision={"num_layers": vit_l})
        cut = (f"LLM {llm_l}/{full.llm.num_layers}, ViT {vit_l}/{full.vision.num_layers}"
               + (" (layers cut)" if "llm" in model else " (full)"))
        if dry:
            sample_tokens, tiles, per_step, max_packed = 96, 1, 4, 256
        else:
            sample_tokens, tiles, per_step, max_packed = args.sample_tokens, args.tiles, args.samples, args.max_packed_tokens
        cfg = config_from_dict({"model": model, "data": {"max_packed_tokens": max_packed},
                                "train": {"seed": 0, "dtype": "auto" if not dry else "float32"}})
        samples = make_samples(cfg, per_step * (steps + warmup), sample_tokens, tiles)
        per = [samples[i * per_step:(i + 1) * per_step] for i in range(steps + warmup)]
        for trainer, runner in (("engine", engine_steps), ("transformers", hf_steps)):
            if budget.left() < 30:
                rows.append(dict(model=preset, trainer=trainer, layers=cut, error="skipped: out of time"))
                continue
            print(f"[train] {preset} {trainer} ({cut})", flush=True)
            rows.append(train_row(preset, trainer, cfg, cut, runner, per, warmup, device, dtype, peak))
    out["note"] = ("phases: engine (its LocalRunner) = pack / ViT forward / LLM forward / loss forward / backward "
                   "(whole model) / optimizer; transformers = forward+loss / backward / optimizer; synchronised timers")
    return out


# ----------------------------------------------------------------------------- markdown


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_cell(x)}" for k, x in v.items())
    return str(v).replace("|", "\\|").replace("\n", " ")


def md_table(rows: list[dict], cols: list[str]) -> str:
    if not rows:
        return "(no rows)\n"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_markdown(report: dict) -> str:
    out = [f"# gpu_check: {report['device']} ({report['date']}){' — dry run' if report['dry_run'] else ''}\n"]
    t = report["tests"]
    out.append("## tests\n")
    out.append(md_table([t], ["command", "returncode", "passed", "failed", "skipped", "deselected", "errors",
                              "seconds", "error"]))
    k = report["kernels"]
    out.append("\n## kernels\n")
    head = {c: k.get(c) for c in ("device", "copy_gbps", "mm_tflops", "liger_kernel", "skipped", "sizes", "error")}
    out.append(md_table([head], list(head)))
    if "cpu_smoke" in k:
        out.append("\nCPU smoke (Triton interpreter vs reference): " + _cell(k["cpu_smoke"]) + "\n")
    if k.get("rows"):
        out.append("\n" + md_table(k["rows"], ["kernel", "shape", "direction", "impl", "median_ms", "gbps",
                                               "pct_copy_bw", "tflops", "pct_mm_peak", "peak_extra_mib",
                                               "workspace_mib", "speedup_vs_eager", "speedup_vs_liger", "note"]))
    for line in k.get("goal_checks", []):
        out.append(f"- {line}\n")
    tr = report["train"]
    out.append("\n## train\n")
    out.append(md_table(tr.get("rows", []), ["model", "trainer", "layers", "device", "dtype", "param_dtype", "params_m",
                                             "samples_per_step", "tokens_per_step", "padded_tokens_per_step",
                                             "step_ms", "tokens_per_s", "tflops", "mfu", "peak_mem_mib",
                                             "phase_ms", "error"]))
    if tr.get("note"):
        out.append(f"\n{tr['note']}\n")
    rows = tr.get("rows", [])
    if rows and rows[0].get("mfu_formula"):
        out.append(f"\nMFU: {rows[0]['mfu_formula']}; peak memory: {rows[0].get('peak_mem_kind')}\n")
    return "".join(out)


# ----------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: the same code paths")
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--minutes", type=float, default=10.0, help="time budget; later work is skipped past it")
    p.add_argument("--sections", default="tests,kernels,train", help="comma-separated subset")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per row (GPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (GPU)")
    p.add_argument("--llm-layers", type=int, default=8, help="LLM layers built (0: the preset's)")
    p.add_argument("--vit-layers", type=int, default=8, help="ViT layers built (0: the preset's)")
    p.add_argument("--samples", type=int, default=8, help="samples per step (GPU)")
    p.add_argument("--sample-tokens", type=int, default=2048, help="tokens per sample (GPU)")
    p.add_argument("--tiles", type=int, default=2, help="image tiles per sample (GPU)")
    p.add_argument("--max-packed-tokens", type=int, default=8192, help="engine packed row length (GPU)")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    os.makedirs(args.out, exist_ok=True)
    budget = Budget(args.minutes)
    sections = set(args.sections.split(","))

    import torch

    device = "cpu (dry run)" if args.dry_run else (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    report: dict[str, Any] = {"device": device, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                              "dry_run": args.dry_run, "torch": torch.__version__,
                              "tests": {}, "kernels": {}, "train": {}}
    try:
        import transformers

        report["transformers"] = transformers.__version__
    except Exception:
        pass
    for name, fn in (("tests", lambda: run_tests(args.dry_run, budget)),
                     ("kernels", lambda: run_kernels(args.dry_run, budget)),
                     ("train", lambda: run_train(args, budget))):
        if name not in sections:
            report[name] = {"skipped": "not in --sections"}
            continue
        print(f"[{name}] ...", flush=True)
        t0 = time.monotonic()
        try:
            report[name] = fn()
        except Exception as e:
            report[name] = {"error": _err(e), "traceback": traceback.format_exc()[-2000:]}
        report[name]["section_seconds"] = round(time.monotonic() - t0, 1)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(to_markdown(report))
    print(f"wrote {os.path.join(args.out, 'gpu_check.json')} and gpu_check.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
