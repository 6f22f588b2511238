"""Benchmark of tools/convert_checkpoint.py on a full-size random checkpoint.

    python -m engine.checkpoint.bench --preset internvl3-2b --workdir /tmp/bench [--dtype bf16] \\
        [--set parallel.llm.tp=2 ...] [--keep]

1. writes a transformers-native ``internvl`` directory of the preset's shape with random weights,
   tensor by tensor (never the whole model in memory), in 5 GB shards;
2. converts it to an engine checkpoint for the layout (default LLM tp2 pp2) in a child process;
3. converts that back to transformers safetensors in another child process;
4. checks the round trip tensor by tensor (bitwise) and reports, per direction, wall time,
   throughput and the child's peak resident memory (its own VmHWM), next to the size of the
   largest tensor and of the whole model. ``--dry-run`` of the tool gives the baseline memory of
   a process that imports torch and the engine and reads the headers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

from engine.checkpoint.safetensors_io import SafetensorsWriter, nbytes
from engine.models import hf_adapter as A
from engine.models.presets import preset_model_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_random_hf(preset: str, path: str, dtype: torch.dtype, max_shard: int = 5 * 10**9, seed: int = 0) -> dict:
    """A random transformers ``internvl`` checkpoint of ``preset``'s shape; returns sizes."""
    from engine.checkpoint.state import expected_parameters

    cfg = preset_model_config(preset)
    entries = sorted((A.export_key(k, A.HF)[0], shape) for k, shape in expected_parameters(cfg).items())
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in entries:
        n = nbytes(shape, dtype)
        if shards[-1] and size + n > max_shard:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    os.makedirs(path, exist_ok=True)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    g = torch.Generator().manual_seed(seed)
    weight_map = {}
    for file, shard in zip(files, shards):
        with SafetensorsWriter(os.path.join(path, file), [(n, dtype, s) for n, s in shard], {"format": "pt"}) as w:
            for name, shape in shard:
                w.write(name, (torch.randn(shape, generator=g) * 0.02).to(dtype))
                weight_map[name] = file
    total = sum(nbytes(s, dtype) for _, s in entries)
    if len(files) > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(A.engine_config_to_hf(cfg, dtype=str(dtype).replace("torch.", "")), f, indent=2)
    largest = max(entries, key=lambda e: nbytes(e[1], dtype))
    return {"bytes": total, "tensors": len(entries), "largest": largest[0], "largest_bytes": nbytes(largest[1], dtype)}


def run_tool(args: list[str]) -> dict:
    """One conversion in a child process: wall seconds, the peak RSS (MiB) the tool reports for
    itself, its last output line."""
    import re

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, text=True)
    if proc.returncode:
        raise RuntimeError(f"convert_checkpoint.py {' '.join(args)} failed:\n{proc.stdout[-3000:]}")
    line = proc.stdout.strip().splitlines()[-1]
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": float(re.search(r"peak RSS (\d+) MiB", line).group(1)),
            "line": line}


def compare(a: str, b: str) -> int:
    """Bitwise comparison of two transformers directories, tensor by tensor; returns the count."""
    from engine.checkpoint.convert import list_sources
    from engine.checkpoint.safetensors_io import read_slice

    left = {s.name: s for s in list_sources(a)}
    right = {s.name: s for s in list_sources(b)}
    if sorted(left) != sorted(right):
        raise AssertionError(f"tensor names differ: {sorted(set(left) ^ set(right))[:5]}")
    for name, s in left.items():
        if not torch.equal(read_slice(s.file, name), read_slice(right[name].file, name)):
            raise AssertionError(f"{name} differs after the round trip")
    return len(left)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="internvl3-2b")
    p.add_argument("--workdir", required=True)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--set", dest="overrides", action="append", default=None, metavar="KEY=VALUE",
                   help="target layout (default: parallel.llm.tp=2 parallel.llm.pp=2)")
    p.add_argument("--keep", action="store_true", help="keep the files")
    args = p.parse_args(argv)
    from engine.checkpoint.convert import parse_dtype

    dtype = parse_dtype(args.dtype)
    layout = args.overrides or ["parallel.llm.tp=2", "parallel.llm.pp=2"]
    src, eng, back = (os.path.join(args.workdir, d) for d in ("hf", "engine", "back"))
    for d in (src, eng, back):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    info = write_random_hf(args.preset, src, dtype)
    gen = time.perf_counter() - t0
    gib = info["bytes"] / 2**30
    print(f"{args.preset} random checkpoint: {info['tensors']} tensors, {gib:.2f} GiB {args.dtype}, largest "
          f"{info['largest']} {info['largest_bytes'] / 2**20:.0f} MiB; written in {gen:.1f} s")
    sets = [a for o in layout for a in ("--set", o)]
    dry = run_tool(["--input", src, "--output", eng, "--to", "engine", "--dry-run", *sets])
    print(f"dry run (imports + headers + plan): {dry['seconds']:.1f} s, peak RSS {dry['peak_rss_mib']:.0f} MiB")
    results = {}
    for name, cmd in (("hf -> engine", ["--input", src, "--output", eng, "--to", "engine", *sets]),
                      ("engine -> hf", ["--input", eng, "--output", back, "--to", "hf"])):
        r = run_tool(cmd)
        results[name] = r
        print(f"{name} ({' '.join(layout) if name.startswith('hf') else 'any layout'}): {r['seconds']:.1f} s, "
              f"{gib * 1024 / r['seconds']:.0f} MiB/s, peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"({r['peak_rss_mib'] / (info['largest_bytes'] / 2**20):.1f}x the largest tensor, "
              f"{r['peak_rss_mib'] / (info['bytes'] / 2**20):.2f}x the model)\n  tool: {r['line']}")
    t0 = time.perf_counter()
    n = compare(src, back)
    print(f"round trip bitwise identical: {n} tensors ({time.perf_counter() - t0:.1f} s)")
    if not args.keep:
        for d in (src, eng, back):
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
