"""Training state <-> a layout-independent checkpoint.

Format: own per-rank safetensors files plus a global index (``engine.checkpoint.store``), not
``torch.distributed.checkpoint``. Every tensor is stored under its single-process engine name
with its true unpadded shape, as pieces with global offsets, so any layout (another tp/pp/vpp/hp/
dp for the LLM and for the ViT, another world size, one process) reads exactly the boxes its
local shards need, lazily from the files. The same format is written by
``tools/convert_checkpoint.py`` in one process, tensor by tensor, for a layout it never
launches; DCP's save needs the state of every rank in memory in a running process group, and
its pickled metadata is tied to torch versions. Safetensors files stay inspectable.

What each rank writes (``rank_NNNNN.*``):

* ``model/<name>``: its parameters' shards with padding stripped (vocabulary and ViT heads
  padded to a multiple of tp). One copy per piece: ranks at data-parallel and head-parallel
  coordinate 0, and one tp rank per distinct shard (GQA kv heads replicated over tp are
  written once; tensors replicated over tp by tp rank 0).
* ``optim/<state>/<name>`` (``exp_avg``, ``exp_avg_sq``) and the scalar ``optim/step/<name>``:
  AdamW moments per parameter, in the parameter's global coordinates. A ZeRO-1 rank owns a
  contiguous slice of a flat buffer; that slice is cut into boxes of each parameter it spans
  and written as such, so another data-parallel size, or no ZeRO, reads per-parameter tensors.
  With float32 parameters the master weights equal them and are not stored twice. With bf16
  parameters (``train.param_dtype=bfloat16``, ``engine.precision``) ``model/<name>`` is bf16 and
  the fp32 masters are stored as ``optim/master/<name>``, cut like the moments (a ZeRO rank's
  master slice into per-parameter boxes), so they reshard to any layout, with or without ZeRO,
  and a resumed run continues bit-exactly. Loading restores the masters from ``optim/master``;
  without it (a float32 or weights-only checkpoint) from ``model/<name>`` at its stored
  precision; float32 parameters loading a checkpoint with masters take the masters.
* ``rank_NNNNN.rng.pt``: its Python, NumPy, torch (and CUDA) RNG states.

Rank 0 adds ``meta.json`` (step, model config, the saving layout, scheduler, data loader and
balancer state, optimizer hyper-parameters) and merges the index. RNG states go back to the
same ranks when the layout is the same; under another layout every rank takes rank 0's state
(all ranks start from the same seed; data randomness is drawn per sample from the seed and the
sample index, so it does not depend on rank-local generators).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from engine.checkpoint.manager import CheckpointError, CheckpointManager
from engine.checkpoint.regions import Placement, flat_range_boxes, take, volume
from engine.checkpoint.store import INDEX, META, CheckpointReader, ShardWriter, merge_index, rank_stem
from engine.config import Config, ModelConfig, config_to_dict

log = logging.getLogger("engine.checkpoint")

FORMAT = "engine-sharded"
VERSION = 1
KIND_TRAIN = "train"  # model, optimizer, scheduler, data position, RNG
KIND_WEIGHTS = "weights"  # model only (converted checkpoints)
RESTORED_HPARAMS = ("lr", "initial_lr")  # set by the schedule; the rest comes from the config
RUNNER_STATE = "runner_state.pt"  # rank 0's extra runner state, when the runner has any


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ----------------------------------------------------------------------------- local shards


@dataclass(frozen=True)
class Site:
    """Where a rank's local tensor sits and whether this rank writes it."""

    placement: Placement
    tp_owner: bool  # first of the tp ranks holding the same shard
    dp_owner: bool  # data-parallel and head-parallel coordinate 0

    @property
    def owner(self) -> bool:
        return self.tp_owner and self.dp_owner


def parameter_sites(runner) -> dict[str, Site]:
    """``Site`` of every local parameter of ``runner.model`` (``LocalRunner`` or ``ParallelRunner``)."""
    topo = getattr(runner, "topo", None)
    out = {}
    for name, p in runner.model.named_parameters():
        shape = tuple(p.shape)
        if topo is None:
            out[name] = Site(Placement(shape, shape), True, True)
            continue
        from engine.parallel.tensor_parallel import shard_info

        info = shard_info(p)
        grid = topo.llm if info.grid == "llm" else topo.vit
        tp, r = grid.size("tp"), grid.coord("tp")
        dp_owner = grid.coord("dp") == 0 and grid.coord("hp") == 0
        if info.dim is None:
            out[name] = Site(Placement(shape, shape), r == 0, dp_owner)
            continue
        full = list(shape)
        full[info.dim] = info.full
        start = info.local_range(r, tp)[0]
        out[name] = Site(Placement(tuple(full), shape, info.dim, start), r % info.replicas == 0, dp_owner)
    return out


def _is_zero(optimizer) -> bool:
    from engine.parallel.data_parallel import ZeroAdamW

    return isinstance(optimizer, ZeroAdamW)


def _master_pairs(optimizer) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """``(parameter, fp32 master)`` of a ``MasterAdamW`` (bf16 parameters without ZeRO), else none."""
    from engine.optim import MasterAdamW

    return list(zip(optimizer.params, optimizer.masters)) if isinstance(optimizer, MasterAdamW) else []


def _flat_pieces(shard, sites: dict[str, Site], names: dict[int, str]):
    """For each parameter of a ZeRO flat shard that this rank's slice spans: ``(name, site,
    parameter, [(local box, offset of its first element in the slice)])``."""
    offset = 0
    for p in shard.params:
        n = p.numel()
        lo, hi = max(offset, shard.start), min(offset + n, shard.end)
        if lo < hi:
            boxes = [(box, offset + f - shard.start) for box, f in flat_range_boxes(p.shape, lo - offset, hi - offset)]
            yield names[id(p)], sites[names[id(p)]], p, boxes
        offset += n


def _read_slice(reader: CheckpointReader, shard, sites: dict[str, Site], names: dict[int, str], prefix: str,
                out: torch.Tensor) -> None:
    """This rank's slice ``out`` of a ZeRO flat buffer from the stored per-parameter tensors
    ``{prefix}/<name>`` (parameter padding set to zero)."""
    for name, s, p, boxes in _flat_pieces(shard, sites, names):
        for box, at in boxes:
            view = out[at:at + volume(box[1])].view(box[1])
            view.zero_()
            mapped = s.placement.to_global(box)
            if mapped is not None:
                take(view, mapped[1], box[0]).copy_(reader.read(f"{prefix}/{name}", mapped[0]))


# ----------------------------------------------------------------------------- save


def collect_runner_state(runner, rank: int, copy: bool = False) -> ShardWriter:
    """This rank's pieces of the model and of the optimizer state."""
    writer = ShardWriter(rank)
    sites = parameter_sites(runner)
    names = {id(p): n for n, p in runner.model.named_parameters()}
    for name, p in runner.model.named_parameters():
        s = sites[name]
        stored = s.placement.stored()
        if s.owner and stored is not None:
            writer.add(f"model/{name}", s.placement.global_shape, stored[0], take(p, stored[1]), copy)
    opt = runner.optimizer
    if _is_zero(opt):
        for shard, group in zip(opt.shards, opt.param_groups):
            master = group["params"][0]
            state = opt.state.get(master) or {}
            tensors = {k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() == 1}
            scalars = {k: float(v) for k, v in state.items() if not (torch.is_tensor(v) and v.dim() == 1)}
            keep_master = any(p.dtype != master.dtype for p in shard.params)
            if keep_master:
                tensors["master"] = master.detach()
            for name, s, p, boxes in _flat_pieces(shard, sites, names):
                if not s.tp_owner:
                    continue
                for k, v in scalars.items():
                    writer.set_scalar(f"optim/{k}/{name}", v)
                for box, at in boxes:
                    mapped = s.placement.to_global(box)
                    if mapped is None:
                        continue
                    gbox, kept = mapped
                    for k, flat in tensors.items():
                        view = flat[at:at + volume(box[1])].view(box[1])
                        writer.add(f"optim/{k}/{name}", s.placement.global_shape, gbox, take(view, kept, box[0]), copy)
    elif isinstance(opt, torch.optim.Adam) or isinstance(opt, torch.optim.AdamW):
        param_of = {id(m): p for p, m in _master_pairs(opt)}
        for group in opt.param_groups:
            for t in group["params"]:  # the parameter, or its fp32 master
                p = param_of.get(id(t), t)
                state = opt.state.get(t) or {}
                name = names[id(p)]
                s = sites[name]
                stored = s.placement.stored()
                if not s.owner:
                    continue
                if t is not p and stored is not None:
                    writer.add(f"optim/master/{name}", s.placement.global_shape, stored[0], take(t, stored[1]), copy)
                for k, v in state.items():
                    if torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0:
                        if stored is not None:
                            writer.add(f"optim/{k}/{name}", s.placement.global_shape, stored[0], take(v, stored[1]), copy)
                    else:
                        writer.set_scalar(f"optim/{k}/{name}", float(v))
    else:
        raise CheckpointError(f"cannot checkpoint optimizer {type(opt).__name__} (supported: AdamW, ZeroAdamW)")
    return writer


def optimizer_hparams(optimizer) -> dict[str, Any]:
    g = optimizer.param_groups[0]
    return {k: g[k] for k in RESTORED_HPARAMS + ("betas", "eps") if k in g}


def layout_of(cfg: Config, world: int) -> dict[str, Any]:
    return {"world_size": world, "parallel": config_to_dict(cfg.parallel)}


def _json_safe(obj: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what} cannot be stored in {META}: {e}") from None


def write_meta(directory: str, meta: dict) -> None:
    with open(os.path.join(directory, META), "w") as f:
        json.dump(meta, f, indent=1)


def runner_extra_state(runner) -> dict:
    """Runner state besides model and optimizer (its objective's, e.g. MPO's reward shift), the same on
    every rank."""
    return dict(runner.extra_state_dict())


def load_runner_extra_state(runner, extra: dict) -> None:
    """Inverse of ``runner_extra_state`` (call after the model and the optimizer are loaded)."""
    if extra:
        runner.load_extra_state_dict(extra)


def save_checkpoint(manager: CheckpointManager, step: int, runner, cfg: Config, trainer_state: dict,
                    rng: Optional[dict] = None, blocking: Optional[bool] = None) -> str:
    """Collective: every rank writes its pieces; published atomically by ``manager``."""
    import copy

    rank, world = _rank_world()
    asynchronous = blocking is False or (blocking is None and manager.async_save)
    writer = collect_runner_state(runner, rank, copy=asynchronous)
    extra = copy.deepcopy(runner_extra_state(runner)) if rank == 0 else {}
    meta = {"format": FORMAT, "version": VERSION, "kind": KIND_TRAIN, "step": int(step),
            "model": config_to_dict(cfg.model), "layout": layout_of(cfg, world),
            "trainer": _json_safe(trainer_state, "trainer state"),
            "optimizer": _json_safe(optimizer_hparams(runner.optimizer), "optimizer hyper-parameters")}

    def write(tmp: str) -> list[str]:
        files = writer.write(tmp)
        if extra:
            torch.save(extra, os.path.join(tmp, RUNNER_STATE))
            files.append(RUNNER_STATE)
        if rng is not None:
            name = rank_stem(rank) + ".rng.pt"
            torch.save(rng, os.path.join(tmp, name))
            files.append(name)
        return files

    def finalize(tmp: str) -> None:
        merge_index(tmp, sorted(f for f in os.listdir(tmp) if f.endswith(".index.json")))
        write_meta(tmp, meta)

    return manager.save(step, write, finalize, blocking)


# ----------------------------------------------------------------------------- load


def expected_parameters(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Single-process parameter names and shapes (built on the meta device)."""
    from engine.models.internvl import InternVLModel

    with torch.device("meta"):
        model = InternVLModel(model_cfg, init=False)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _list(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_model(reader: CheckpointReader, model_cfg: ModelConfig) -> None:
    """The checkpoint holds exactly the model's parameters with their shapes, or an error naming them."""
    want = expected_parameters(model_cfg)
    have = {k[len("model/"):]: reader.shape(k) for k in reader.keys("model/")}
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    wrong = [f"{k}: checkpoint {have[k]}, model {want[k]}" for k in want if k in have and have[k] != want[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors {_list(missing)}")
    if extra:
        problems.append(f"tensors the model does not have {_list(extra)}")
    if wrong:
        problems.append(f"shape mismatch {_list(wrong)}")
    if problems:
        raise CheckpointError(f"{reader.path} does not fit model.{model_cfg.preset} config: " + "; ".join(problems))
    saved = reader.meta.get("model")
    if saved:
        now = config_to_dict(model_cfg)
        diff = [k for k in ("vision", "llm", "downsample_ratio", "ps_version", "select_layer", "projector_ln_eps")
                if saved.get(k) != now.get(k)]
        if diff:
            log.warning("%s was saved with another model config (%s differ); shapes match", reader.path, ", ".join(diff))


def load_model(reader: CheckpointReader, runner, model_cfg: ModelConfig) -> None:
    """Every local parameter from its box of the stored tensor; padding set to zero. Master
    weights (bf16 parameters) follow, from the stored tensors at their own precision."""
    check_model(reader, model_cfg)
    sites = parameter_sites(runner)
    opt = runner.optimizer
    masters = {id(p): m for p, m in _master_pairs(opt)}
    with torch.no_grad():
        for name, p in runner.model.named_parameters():
            s = sites[name]
            stored = s.placement.stored()
            for t in (p, masters[id(p)]) if id(p) in masters else (p,):
                if s.placement.dim is not None:
                    t.zero_()
                if stored is not None:
                    take(t, stored[1]).copy_(reader.read(f"model/{name}", stored[0]))
        if _is_zero(opt):  # ZeRO-1 master slices follow the loaded weights
            names = {id(p): n for n, p in runner.model.named_parameters()}
            for shard, group in zip(opt.shards, opt.param_groups):
                if opt.keeps_masters:
                    _read_slice(reader, shard, sites, names, "model", group["params"][0])
                else:
                    group["params"][0].copy_(shard.owned([p.data for p in shard.params]))


def _state_names(reader: CheckpointReader) -> list[str]:
    return sorted({k.split("/")[1] for k in reader.keys("optim/")} - {"master"})


def _step_tensor(step: float, group: dict, device: torch.device) -> torch.Tensor:
    on_device = group.get("fused") or group.get("capturable")
    return torch.tensor(float(step), dtype=torch.float32, device=device if on_device else "cpu")


def load_optimizer(reader: CheckpointReader, runner) -> None:
    """AdamW / ZeroAdamW state of this rank from per-parameter stored tensors. Load the model first."""
    opt = runner.optimizer
    sites = parameter_sites(runner)
    names = {id(p): n for n, p in runner.model.named_parameters()}
    state_names = _state_names(reader)
    hparams = reader.meta.get("optimizer") or {}
    for group in opt.param_groups:
        for k in RESTORED_HPARAMS:
            if k in hparams and k in group:
                group[k] = hparams[k]
    for k in ("betas", "eps"):
        saved, now = hparams.get(k), opt.param_groups[0].get(k)
        if saved is not None and now is not None and list(torch.tensor(saved).reshape(-1).tolist()) != \
                list(torch.tensor(now).reshape(-1).tolist()):
            log.warning("optimizer %s is %s in the config, %s in %s: using the config", k, now, saved, reader.path)
    if _is_zero(opt):
        _load_zero(reader, opt, sites, names, state_names)
    else:
        param_of = {id(m): p for p, m in _master_pairs(opt)}
        with torch.no_grad():
            for group in opt.param_groups:
                for m in group["params"]:  # the parameter, or its fp32 master
                    p = param_of.get(id(m), m)
                    name = names[id(p)]
                    opt.state.pop(m, None)
                    s = sites[name]
                    stored = s.placement.stored()
                    if stored is not None and reader.has(f"optim/master/{name}"):  # the parameter follows
                        take(m, stored[1]).copy_(reader.read(f"optim/master/{name}", stored[0]))
                        if m is not p:
                            p.copy_(m)
                    present = [k for k in state_names if reader.has(f"optim/{k}/{name}")]
                    if not present:
                        continue
                    state: dict[str, Any] = {"step": _step_tensor(reader.scalar(f"optim/step/{name}", 0.0), group,
                                                                  m.device)}
                    for k in present:
                        t = torch.zeros_like(m, memory_format=torch.contiguous_format)
                        if stored is not None:
                            take(t, stored[1]).copy_(reader.read(f"optim/{k}/{name}", stored[0]))
                        state[k] = t
                    opt.state[m] = state


def _load_zero(reader: CheckpointReader, opt, sites, names, state_names: list[str]) -> None:
    with torch.no_grad():
        for shard, group in zip(opt.shards, opt.param_groups):
            master = group["params"][0]
            opt.state.pop(master, None)
            flats = {k: torch.zeros_like(master) for k in state_names}
            steps: dict[str, float] = {}
            use_master = any(reader.has(f"optim/master/{names[id(p)]}") for p in shard.params)
            new_master = master.detach().clone() if use_master else None
            for name, s, p, boxes in _flat_pieces(shard, sites, names):
                present = [k for k in state_names if reader.has(f"optim/{k}/{name}")]
                if present:
                    steps[name] = float(reader.scalar(f"optim/step/{name}", 0.0))
                targets = [(k, flats[k]) for k in present]
                if use_master:
                    targets.append(("master", new_master))
                for box, at in boxes:
                    mapped = s.placement.to_global(box)
                    for k, flat in targets:
                        view = flat[at:at + volume(box[1])].view(box[1])
                        view.zero_()
                        if mapped is not None:
                            take(view, mapped[1], box[0]).copy_(reader.read(f"optim/{k}/{name}", mapped[0]))
            if new_master is not None:
                master.copy_(new_master)
                if not opt.keeps_masters:  # float32 parameters take the saved masters (collective)
                    shard.all_gather_into_params(master)
            elif opt.keeps_masters:  # no saved masters: the stored weights, at their precision
                _read_slice(reader, shard, sites, names, "model", master)
            else:
                master.copy_(shard.owned([p.data for p in shard.params]))
            if not steps:
                continue
            if len(set(steps.values())) > 1:
                log.warning("ZeRO-1 group steps its parameters together; the checkpoint has steps %s, using %g",
                            sorted(set(steps.values())), max(steps.values()))
            state: dict[str, Any] = {"step": _step_tensor(max(steps.values()), group, master.device)}
            state.update(flats)
            opt.state[master] = state


def scheduler_state(saved: dict, groups: int) -> dict:
    """A ``LambdaLR`` state for ``groups`` parameter groups from one saved under another layout
    (per-group lists must hold one value)."""
    out = dict(saved)
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        values = saved.get(key)
        if isinstance(values, list) and len(values) != groups:
            if len({json.dumps(v) for v in values}) > 1:
                raise CheckpointError(f"scheduler.{key}={values} differs per parameter group; cannot map it onto "
                                      f"{groups} groups")
            out[key] = [values[0]] * groups
    return out


@dataclass
class Loaded:
    path: str
    kind: str
    step: int
    trainer: Optional[dict]  # scheduler, loader, balancer states (KIND_TRAIN only)
    rng: Optional[dict]  # this rank's RNG state
    same_layout: bool


def model_config_of(reader: CheckpointReader) -> ModelConfig:
    """The model config a checkpoint was saved with."""
    from engine.config import config_from_dict

    saved = reader.meta.get("model")
    if not saved:
        raise CheckpointError(f"{reader.path}/{META} has no model config")
    return config_from_dict({"model": saved}).model


def read_full_model(path: str, dtype: Optional[torch.dtype] = None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The whole model of a checkpoint saved under any layout, in single-process engine names
    (for evaluation or post-training initialisation in one process), and its model config."""
    reader = CheckpointReader(path)
    model_cfg = model_config_of(reader)
    check_model(reader, model_cfg)
    return {name: reader.read(f"model/{name}", dtype=dtype) for name in expected_parameters(model_cfg)}, model_cfg


def load_checkpoint(path: str, runner, cfg: Config, optimizer: bool = True) -> Loaded:
    """Load the model (and, for a training checkpoint, the optimizer) of this rank from ``path``,
    saved under any layout. Returns the global state for the caller to apply."""
    rank, world = _rank_world()
    reader = CheckpointReader(path)
    meta = reader.meta
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}/{META}: format={meta.get('format')!r}, expected {FORMAT!r}")
    if int(meta.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('version')} is newer than this engine's {VERSION}")
    kind = meta.get("kind")
    if kind not in (KIND_TRAIN, KIND_WEIGHTS):
        raise CheckpointError(f"{path}/{META}: kind={kind!r} is unknown")
    load_model(reader, runner, cfg.model)
    same = meta.get("layout") == _json_safe(layout_of(cfg, world), "layout")
    rng = None
    if kind == KIND_TRAIN:
        if optimizer:
            load_optimizer(reader, runner)
            if RUNNER_STATE in reader.manifest["files"]:
                load_runner_extra_state(runner, torch.load(os.path.join(path, RUNNER_STATE), map_location="cpu",
                                                           weights_only=False))
        name = rank_stem(rank if same else 0) + ".rng.pt"
        if name in reader.manifest["files"]:
            rng = torch.load(os.path.join(path, name), map_location="cpu", weights_only=False)
    return Loaded(path, kind, int(meta.get("step", 0)), meta.get("trainer") if kind == KIND_TRAIN else None,
                  rng, same)


__all__ = ["FORMAT", "VERSION", "KIND_TRAIN", "KIND_WEIGHTS", "INDEX", "META", "Site", "parameter_sites",
           "collect_runner_state", "save_checkpoint", "load_checkpoint", "load_model", "load_optimizer",
           "scheduler_state", "check_model", "expected_parameters", "Loaded", "write_meta", "layout_of",
           "read_full_model", "model_config_of", "runner_extra_state", "load_runner_extra_state"]
