"""``python -m engine.preflight --config C [--set key=value ...] [--nodes N --gpus-per-node G]
[--node-rank R] [--sample-images K] [--json]``

A check to run once per node before a multi-GPU job starts, so that a broken set-up fails in
seconds with one clear list instead of after minutes of start-up. Every check runs, whatever
the others found (an exception inside a check is reported as that check's problem):

- ``torch``: the torch version; with ``--gpus-per-node G``: CUDA available, at least G devices
  visible, NCCL available (on a CPU machine without ``--gpus-per-node``: "CPU only");
- ``config``: the config is valid for world size ``nodes x gpus-per-node`` (``validate_config``);
- ``data``: ``data.meta_path`` parses and names existing roots and annotation files,
  ``data.text_corpus`` opens, and the images of the first K image records of every annotation
  file decode (no shape index, no data set is built);
- ``tokenizer``: ``data.tokenizer`` loads, holds the image tokens and fits ``model.llm.vocab_size``;
- ``init_from``: ``train.init_from`` holds every parameter of the model with its shape (read from
  the safetensors headers only);
- ``run_dir``: the run directory can be created and written, and its file system has room for
  one checkpoint (fp32 weights + AdamW moments);
- ``host_memory``: this node's available memory covers what each of its ranks holds at set-up.

Output: one line per check and then the problems (one line each, naming the config key or the
path and what is wrong), or with ``--json`` one object ``{"ok", "checks": [{"name", "ok",
"detail"}], "problems"}``. Exit status 0: every check passed; 1: some did; 2: the config file
cannot be read or has an unknown key.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional

from engine.config import Config, ConfigError, validate_config
from engine.posttrain.config import load_posttrain_config

CHECKPOINT_BYTES_PER_PARAM = 4 + 8  # fp32 weights + the two fp32 AdamW moments
HOST_FACTOR = 4  # a rank's host memory at set-up: weights, gradients and two optimizer moments
MAX_LISTED = 10  # problem lines listed per kind before "(+N more)"


class Skipped(Exception):
    """A check that cannot run because another one failed (reported there, not twice)."""


@dataclass
class Context:
    cfg: Config
    nodes: int
    gpus_per_node: Optional[int]
    node_rank: int
    sample_images: int
    results: dict[str, "CheckResult"] = field(default_factory=dict)

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node or 1

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str
    problems: list[str]

    def as_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _capped(lines: list[str], what: str, limit: int = MAX_LISTED) -> list[str]:
    """The first ``limit`` lines, then one line counting the rest."""
    if len(lines) <= limit:
        return lines
    return lines[:limit] + [f"(+{len(lines) - limit} more {what})"]


def _message(e: BaseException) -> str:
    """An exception's own message (KeyError's str() adds quotes)."""
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def _param_count(cfg: Config) -> int:
    from engine.parallel.plan import plan_for

    return sum(math.prod(p.shape) for p in plan_for(cfg).params.values())


# ----------------------------------------------------------------------------- checks
# Each check returns (detail, problem lines) or raises Skipped.


def check_torch(ctx: Context) -> tuple[str, list[str]]:
    import torch
    import torch.distributed as dist

    problems: list[str] = []
    notes = [f"torch {torch.__version__}"]
    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    G = ctx.gpus_per_node
    if G is None:
        notes.append(f"{count} GPU(s) visible (no --gpus-per-node: not required)" if cuda else "CPU only")
    else:
        if not cuda:
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            problems.append(f"--gpus-per-node={G}: CUDA is not available (torch {torch.__version__}, {build})")
        elif count < G:
            problems.append(f"--gpus-per-node={G}: only {count} CUDA device(s) visible")
        else:
            notes.append(f"CUDA {torch.version.cuda}, {count} GPU(s) visible")
        if not (dist.is_available() and dist.is_nccl_available()):
            problems.append(f"--gpus-per-node={G}: NCCL is not available in this torch build")
        elif cuda:
            notes.append("NCCL available")
    if ctx.cfg.train.device == "cuda" and not cuda:
        problems.append("train.device=cuda but no CUDA device is available")
    return "; ".join(notes), problems


def check_config(ctx: Context) -> tuple[str, list[str]]:
    L, V = ctx.cfg.parallel.llm, ctx.cfg.parallel.vit
    where = f"world size {ctx.world} = {ctx.nodes} node(s) x {ctx.ranks_per_node} rank(s)"
    try:
        validate_config(ctx.cfg, ctx.world)
    except ConfigError as e:
        return where, [f"{e} ({where})"]
    dp = ctx.world // (L.tp * L.pp * L.hp)
    return f"valid for {where}: llm tp {L.tp} x pp {L.pp} x hp {L.hp} x dp {dp}, vit tp {V.tp} x hp {V.hp}", []


def _meta_entries(meta_path: str) -> tuple[list[tuple[str, str]], int, list[str]]:
    """``([(root, annotation file)], records, problems)`` of a meta JSON. ``load_meta`` validates
    the whole file but stops at its first problem; after a missing root or annotation file the
    other entries are still looked at, so that every missing path is listed at once."""
    from engine.data.dataset import DataError, LineFile, resolve_path, load_meta

    try:
        annotations = load_meta(meta_path)
    except (OSError, DataError) as e:
        first = str(e)
    else:
        entries = [(a.root, a.lines.path) for a in annotations]
        records = sum(len(a.lines) for a in annotations)
        for a in annotations:
            a.lines.close()
        return entries, records, []
    problems = [first]
    entries = []
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return [], 0, problems
    if not isinstance(meta, dict):
        return [], 0, problems
    base = os.path.dirname(os.path.abspath(meta_path))
    for name, entry in meta.items():
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) and entry[k]
                                                  for k in ("root", "annotation")):
            continue
        root, annotation = resolve_path(entry["root"], base), resolve_path(entry["annotation"], base)
        missing = [f"{meta_path}: entry {name!r}: root folder not found: {root}"] if not os.path.isdir(root) else []
        if not os.path.isfile(annotation):
            missing.append(f"{meta_path}: entry {name!r}: annotation file not found: {annotation}")
        problems += [m for m in missing if m != first]
        if not missing:
            entries.append((root, annotation))
    readable, records = [], 0
    for root, annotation in entries:
        try:
            lines = LineFile(annotation)
        except OSError as e:
            problems.append(f"{meta_path}: annotation file {annotation} cannot be read ({e.strerror or e})")
            continue
        records += len(lines)
        lines.close()
        readable.append((root, annotation))
    return readable, records, problems


def _sample_images(root: str, annotation: str, limit: int) -> tuple[int, list[str]]:
    """Decode the images of the first ``limit`` image records of one annotation file:
    ``(images decoded, problems)``, each problem naming ``file:line`` and the image."""
    from engine.data.dataset import BadSample, decode_image

    decoded, records, problems = 0, 0, []
    with open(annotation, "rb") as f:
        for number, raw in enumerate(f, 1):
            if records >= limit:
                break
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                problems.append(f"{annotation}:{number}: not valid JSON ({e})")
                continue
            images = rec.get("image") if isinstance(rec, dict) else None
            if not images:
                continue
            records += 1
            for image in [images] if isinstance(images, str) else images:
                if not isinstance(image, str) or not image:
                    problems.append(f"{annotation}:{number}: 'image' must be a path or a list of paths, "
                                    f"got {images!r}")
                    break
                try:
                    decode_image(os.path.join(root, image)).close()
                    decoded += 1
                except BadSample as e:
                    problems.append(f"{annotation}:{number}: {e.message}")
    return decoded, _capped(problems, f"bad records among the first {limit} image records of {annotation}", 5)


def check_data(ctx: Context) -> tuple[str, list[str]]:
    d = ctx.cfg.data
    problems: list[str] = []
    notes: list[str] = []
    if d.meta_path:
        entries, records, problems = _meta_entries(d.meta_path)
        decoded = 0
        for root, annotation in entries:
            try:
                n, bad = _sample_images(root, annotation, ctx.sample_images)
            except OSError as e:
                bad, n = [f"{d.meta_path}: annotation file {annotation} cannot be read: {e}"], 0
            decoded += n
            problems += bad
        notes.append(f"{len(entries)} annotation file(s), {records} records; {decoded} image(s) decoded "
                     f"from the first {ctx.sample_images} image records of each file")
    else:
        notes.append("no data.meta_path (text only)")
    if d.text_corpus:
        try:
            with open(d.text_corpus, "rb") as f:
                f.readline()
            notes.append("text corpus readable")
        except OSError as e:
            problems.append(f"data.text_corpus={d.text_corpus!r}: cannot be opened ({e.strerror or e})")
    elif not d.meta_path:
        problems.append("data.meta_path and data.text_corpus are both empty: no training data")
    return "; ".join(notes), problems


def check_tokenizer(ctx: Context) -> tuple[str, list[str]]:
    from engine.data.tokenizer import SPECIAL_TOKENS, TokenizerError, load_tokenizer
    from engine.trainer import sync_token_ids

    path = ctx.cfg.data.tokenizer
    try:
        tok = load_tokenizer(path)
    except (TokenizerError, OSError, RuntimeError, ValueError) as e:
        msg = str(e)
        return f"{path}: not loaded", [msg if msg.startswith("data.tokenizer") else f"data.tokenizer={path!r}: {msg}"]
    problems: list[str] = []
    ids: dict[str, Optional[int]] = {}
    for attr, name in (("img_context_id", "img_context"), ("img_start_id", "img_start"), ("img_end_id", "img_end")):
        token = SPECIAL_TOKENS[name]
        ids[token] = getattr(tok, attr, None)
        if ids[token] is None:
            problems.append(f"data.tokenizer={path!r}: image token {token!r} is missing")
    try:  # the trainer's own rule: the model takes the tokenizer's image ids; the vocabulary must hold them
        sync_token_ids(copy.deepcopy(ctx.cfg), tok)
    except ConfigError as e:
        problems.append(f"{e} (data.tokenizer / model.llm.vocab_size)")
    shown = " ".join(f"{t}={i}" for t, i in ids.items())
    return f"{path}: {tok.vocab_size} tokens (model.llm.vocab_size={ctx.cfg.model.llm.vocab_size}); {shown}", problems


def check_init_from(ctx: Context) -> tuple[str, list[str]]:
    path = ctx.cfg.train.init_from
    if not path:
        return "not set (weights from the initialisation)", []
    if not os.path.isdir(path):
        return "not found", [f"train.init_from={path!r}: no such directory"]
    from engine.models.hf_slices import CheckpointSliceReader
    from engine.parallel.plan import plan_for

    expected = {name: p.shape for name, p in plan_for(ctx.cfg).params.items()}
    bad: list[str] = []
    try:
        reader = CheckpointSliceReader(path, ctx.cfg.model, expected=expected)
    except (OSError, ValueError, KeyError) as e:
        return "unreadable", [f"train.init_from={path!r}: {_message(e)}"]
    with reader:
        for name in expected:
            try:
                reader.shape(name)  # the header's shape, checked against the model's
            except (KeyError, ValueError) as e:
                bad.append(f"train.init_from: {_message(e)}")
    detail = f"{path} ({reader.format} format): {len(expected) - len(bad)}/{len(expected)} tensors present " \
             f"with the model's shapes"
    return detail, _capped(bad, "tensors missing or of the wrong shape")


def check_run_dir(ctx: Context) -> tuple[str, list[str]]:
    run_dir = ctx.cfg.run_dir
    key = f"run.dir={run_dir!r}" if ctx.cfg.run.dir else f"run directory {run_dir!r} (run.name)"
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        return "cannot be created", [f"{key}: cannot be created ({type(e).__name__}: {e.strerror or e})"]
    try:
        fd, probe = tempfile.mkstemp(prefix=".preflight-", dir=run_dir)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        return "not writable", [f"{key}: not writable ({type(e).__name__}: {e.strerror or e})"]
    params = _param_count(ctx.cfg)
    need = params * CHECKPOINT_BYTES_PER_PARAM
    free = shutil.disk_usage(run_dir).free
    detail = f"{run_dir} writable; one checkpoint needs ~{_size(need)} ({params:,} parameters x " \
             f"{CHECKPOINT_BYTES_PER_PARAM} bytes), {_size(free)} free"
    if free < need:
        return detail, [f"{key}: {_size(free)} free, one checkpoint needs ~{_size(need)} "
                        f"({params:,} parameters x {CHECKPOINT_BYTES_PER_PARAM} bytes: fp32 weights + AdamW moments)"]
    return detail, []


def available_memory() -> int:
    """Bytes of host memory available now (MemAvailable, else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_host_memory(ctx: Context) -> tuple[str, list[str]]:
    if not ctx.results["config"].ok:
        raise Skipped("needs a valid layout (see config)")
    from engine.planning.rehearse import rank_param_bytes

    G = ctx.ranks_per_node
    first = ctx.node_rank * G
    if not 0 <= first < ctx.world:
        return "", [f"--node-rank={ctx.node_rank} is not a node of {ctx.nodes}"]
    per_rank = max(rank_param_bytes(ctx.cfg, ctx.world, r) for r in range(first, first + G))
    need = HOST_FACTOR * per_rank
    share = available_memory() // G
    detail = f"each rank needs ~{_size(need)} ({HOST_FACTOR} x {_size(per_rank)} of fp32 parameters, node " \
             f"{ctx.node_rank}'s largest rank); {_size(share)} available per rank ({G} on this node)"
    if need > share:
        return detail, [f"host memory: a rank of node {ctx.node_rank} needs ~{_size(need)} at set-up "
                        f"({HOST_FACTOR} x {_size(per_rank)} of parameters) but only {_size(share)} is available "
                        f"per rank ({_size(share * G)} for {G} ranks)"]
    return detail, []


CHECKS: list[tuple[str, Callable[[Context], tuple[str, list[str]]]]] = [
    ("torch", check_torch), ("config", check_config), ("data", check_data), ("tokenizer", check_tokenizer),
    ("init_from", check_init_from), ("run_dir", check_run_dir), ("host_memory", check_host_memory),
]


def run_checks(ctx: Context) -> list[CheckResult]:
    """Every check, in order; one that raises is a failed check naming the exception."""
    for name, fn in CHECKS:
        try:
            detail, problems = fn(ctx)
        except Skipped as e:
            detail, problems = f"skipped: {e}", []
            ctx.results[name] = CheckResult(name, False, detail, problems)
            continue
        except Exception as e:  # a check must never stop the others
            detail, problems = "error", [f"{name}: {type(e).__name__}: {_message(e)}"]
        ctx.results[name] = CheckResult(name, not problems, detail, problems)
    return list(ctx.results.values())


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.preflight", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see examples/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override (repeatable)")
    p.add_argument("--nodes", type=int, default=1, help="nodes of the job (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs (ranks) per node; given: CUDA, the device count and NCCL are required "
                        "(default: one rank, no GPU required)")
    p.add_argument("--node-rank", type=int, default=int(os.environ.get("NODE_RANK", "0")),
                   help="this node's index, for the host memory of its ranks (default $NODE_RANK or 0)")
    p.add_argument("--sample-images", type=int, default=16, metavar="K",
                   help="decode the images of the first K image records of every annotation file (default 16)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.nodes < 1:
        p.error(f"--nodes={args.nodes} must be >= 1")
    if args.gpus_per_node is not None and args.gpus_per_node < 1:
        p.error(f"--gpus-per-node={args.gpus_per_node} must be >= 1")
    return args


def report_text(results: list[CheckResult], ctx: Context, config: str) -> str:
    hw = f"{ctx.gpus_per_node} GPU(s)" if ctx.gpus_per_node else "1 rank, no GPU required"
    lines = [f"preflight {config}: world size {ctx.world} ({ctx.nodes} node(s) x {hw}), node {ctx.node_rank}"]
    width = max(len(r.name) for r in results)
    for r in results:
        status = "ok" if r.ok else ("SKIP" if r.detail.startswith("skipped") else "FAIL")
        lines.append(f"  {status:<4}  {r.name:<{width}}  {r.detail}")
    problems = [p for r in results for p in r.problems]
    if problems:
        lines.append(f"{len(problems)} problem(s):")
        lines += [f"  {p}" for p in problems]
    else:
        lines.append("preflight: all checks passed")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:  # a post-training config (its posttrain: section) loads too; MPO reads its pairs from posttrain.data
        cfg, pt = load_posttrain_config(args.config, args.overrides, validate=False)
        if pt.mode == "mpo" and pt.data:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, meta_path=pt.data))
    except ConfigError as e:
        if args.json:
            print(json.dumps({"ok": False, "checks": [{"name": "config", "ok": False, "detail": str(e)}],
                              "problems": [str(e)]}, indent=1))
        else:
            print(f"config error: {e}", file=sys.stderr)
        return 2
    ctx = Context(cfg, args.nodes, args.gpus_per_node, args.node_rank, args.sample_images)
    results = run_checks(ctx)
    problems = [p for r in results for p in r.problems]
    ok = not problems and all(r.ok for r in results)
    if args.json:
        print(json.dumps({"ok": ok, "checks": [r.as_dict() for r in results], "problems": problems}, indent=1))
    else:
        print(report_text(results, ctx, args.config))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
