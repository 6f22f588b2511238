"""The training loop: set-up, steps, logging, checkpoints, resume, preemption signals.

Runs as one process or under ``torchrun``; the parallel layout lives in the runner
(``LocalRunner`` for one process, ``ParallelRunner`` otherwise), never in the loop.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import random
import signal
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from engine.checkpoint import (KIND_WEIGHTS, CheckpointManager, CheckpointReader, load_checkpoint, save_checkpoint,
                               scheduler_state)
from engine.config import Config, ConfigError, save_config, validate_config
from engine.metrics import MetricsLogger, peak_rss_mib, setup_logging
from engine.models.internvl import InternVLModel
from engine.optim import build_scheduler
from engine.watchdog import Watchdog, job_store

log = logging.getLogger("engine.trainer")


def init_distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        method = os.environ.get("ENGINE_INIT_METHOD")  # e.g. file:///shared/rendezvous instead of MASTER_ADDR/PORT
        if method:
            dist.init_process_group(backend, init_method=method, rank=rank, world_size=world)
        else:
            dist.init_process_group(backend)
    return rank, world, local_rank


def resolve_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_dtype(choice: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype: bf16 on GPU, none (float32) on CPU unless asked (bf16 parameters: always bf16,
    the runners see to it, ``engine.precision.autocast_for``)."""
    if choice == "bfloat16" or (choice == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def sync_token_ids(cfg: Config, tok) -> None:
    """The model's image token ids come from the tokenizer; the vocabulary must hold it."""
    m = cfg.model
    for key, tid in (("img_context_token_id", tok.img_context_id), ("img_start_token_id", tok.img_start_id),
                     ("img_end_token_id", tok.img_end_id)):
        if tid is not None:
            setattr(m, key, int(tid))
    if tok.vocab_size > m.llm.vocab_size:
        raise ConfigError(f"tokenizer {cfg.data.tokenizer} has {tok.vocab_size} tokens but "
                          f"model.llm.vocab_size={m.llm.vocab_size}")


def load_initial_weights(model: InternVLModel, path: str) -> None:
    """Copy the weights of a transformers checkpoint into ``model``; every shape must match."""
    from engine.models.hf_adapter import load_pretrained

    source = load_pretrained(path, dtype=torch.float32).state_dict()
    own = model.state_dict()
    bad = [f"{k} {tuple(own[k].shape)} vs {tuple(source[k].shape) if k in source else 'missing'}"
           for k in own if k not in source or source[k].shape != own[k].shape]
    bad += [f"{k} not in the configured model" for k in source if k not in own]
    if bad:
        raise ConfigError(f"train.init_from={path} does not match the configured model: {'; '.join(bad[:5])}"
                          + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""))
    model.load_state_dict(source)
    log.info("initial weights from %s", path)


def leader_first(make, world: int):
    """``make()`` on rank 0, then on the other ranks once it is done: rank 0 builds and caches what
    every rank would build (the shape index), the others read it (collective when ``world > 1``)."""
    if world > 1 and dist.get_rank() != 0:
        dist.barrier()
        return make()
    out = make()
    if world > 1:
        dist.barrier()
    return out


def build_model(cfg: Config, meta: bool = False) -> InternVLModel:
    """The single-process model. ``meta=True``: shapes only, on the meta device; the runner then
    materialises this rank's shards alone, directly on its device, with the values below (or
    ``train.init_from``'s slices). Otherwise the whole model on the host, initialised from
    ``train.seed`` (``InternVLModel.init_weights``) or loaded from ``train.init_from``."""
    from engine.models.kernel_select import configure_kernels

    if meta:
        with torch.device("meta"):
            model = InternVLModel(cfg.model, init=False)
    else:
        model = InternVLModel(cfg.model, init=False)
        model.init_weights(cfg.train.seed)
        if cfg.train.init_from:
            load_initial_weights(model, cfg.train.init_from)
    configure_kernels(model, cfg.kernels)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    if cfg.train.freeze_vit:
        model.vision_model.requires_grad_(False)
    return model


def build_runner(model, cfg: Config, device: torch.device, world: int, autocast_dtype: Optional[torch.dtype] = None,
                 pad_id: int = 0, objective=None):
    """The runner of ``world`` processes (one: ``LocalRunner``) training ``objective``."""
    if world > 1:
        from engine.parallel.runner import ParallelRunner

        return ParallelRunner(model, cfg, device, autocast_dtype, pad_id=pad_id, objective=objective)
    from engine.step import LocalRunner

    return LocalRunner(model, cfg, device, autocast_dtype, pad_id=pad_id, objective=objective)


class TrainingHealthError(RuntimeError):
    """Too many consecutive steps had to be skipped (non-finite or spiking loss / gradients)."""


class StepHealth:
    """Decides whether a step's update may be applied: the global loss and gradient norm must be
    finite and, with ``train.spike_factor``, the loss no more than that factor times the largest of
    the last ``train.spike_window`` good losses. A skipped step updates no weights, optimizer state
    or learning-rate schedule; ``train.max_bad_steps`` skipped steps in a row stop the run. Also
    watches for a rank that stays the slowest (``straggler``)."""

    STRAGGLER_STEPS, STRAGGLER_RATIO = 10, 1.2

    def __init__(self, cfg):
        self.max_bad, self.factor = cfg.max_bad_steps, cfg.spike_factor
        self.recent: collections.deque = collections.deque(maxlen=cfg.spike_window)
        self.skipped = 0  # over the run (this process's life)
        self.streak: list[int] = []  # the current run of consecutive skipped steps
        self.slowest = (-1, 0)  # (rank, consecutive steps it was the slowest by STRAGGLER_RATIO)

    def check(self, loss: float, grad_norm: float) -> Optional[str]:
        """None when the step is good (its loss then counts as recent), else the reason."""
        if not math.isfinite(loss):
            return f"non-finite loss {loss}"
        if not math.isfinite(grad_norm):
            return f"non-finite gradient norm {grad_norm}"
        if self.factor and self.recent and loss > self.factor * max(self.recent):
            return f"loss spike {loss:.4g} > {self.factor} x {max(self.recent):.4g} (max of the last {len(self.recent)})"
        self.recent.append(loss)
        self.streak = []
        return None

    def straggler(self, step: int, rank: int, ratio: float) -> None:
        """Warn when the same rank is the slowest, by 1.2x the median or more, 10 steps in a row."""
        same = rank == self.slowest[0] and ratio >= self.STRAGGLER_RATIO
        self.slowest = (rank, self.slowest[1] + 1 if same else (1 if ratio >= self.STRAGGLER_RATIO else 0))
        if self.slowest[1] == self.STRAGGLER_STEPS:
            log.warning("rank %d has been the slowest for %d steps (step %d: %.2fx the median rank's compute time)",
                        rank, self.STRAGGLER_STEPS, step, ratio)

    def skip(self, step: int, reason: str, sources: list[str]) -> None:
        self.skipped += 1
        self.streak.append(step)
        shown = ", ".join(sources[:8]) + (f" (+{len(sources) - 8} more)" if len(sources) > 8 else "")
        log.warning("step %d skipped (%s): no weights updated; its samples: %s", step, reason, shown)
        if len(self.streak) >= self.max_bad:
            raise TrainingHealthError(f"{len(self.streak)} consecutive steps skipped (train.max_bad_steps="
                                      f"{self.max_bad}): steps {self.streak}; last: {reason}")


class Trainer:
    def __init__(self, cfg: Config):
        """Set-up, in order: processes, validation, tokenizer, data, model and runner, optimizer
        schedule, checkpoints, run health, resume. A training mode (``engine.posttrain``) changes
        the steps through the hooks below, not this sequence."""
        t_start = time.perf_counter()
        self.cfg = cfg
        self.rank, self.world, self.local_rank = init_distributed()
        setup_logging(self.rank)
        validate_config(cfg, self.world)
        self._validate()
        self.device = resolve_device(cfg.train.device, self.local_rank)
        self.autocast_dtype = resolve_dtype(cfg.train.dtype, self.device)
        self.run_dir = cfg.run_dir
        seed_everything(cfg.train.seed)

        from engine.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        sync_token_ids(cfg, self.tokenizer)
        self.loader = leader_first(self._build_loader, self.world)
        pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        self.runner = self._build_runner(self._build_model(), pad_id)
        self.loader.request = self.runner.data_request
        self.scheduler = build_scheduler(self.runner.optimizer, cfg.train)
        self.ckpt = CheckpointManager(os.path.join(self.run_dir, "checkpoints"), cfg.train.keep_last,
                                      async_save=cfg.train.async_save)
        self.step = 0
        self.health = StepHealth(cfg.train)
        self.watchdog = Watchdog(cfg.train.hang_timeout_s, self.rank, self.world, job_store())
        self.runner.watchdog = self.watchdog
        self.eval_samples = self._eval_set() if cfg.eval.interval else []
        self._stop_signal: Optional[int] = None
        self._resume()
        self._after_resume()
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            self._save_configs()
        self.setup_seconds = time.perf_counter() - t_start

    # ------------------------------------------------------------------ set-up hooks (a mode overrides these)
    def _validate(self) -> None:
        """Checks of the mode's own settings (after ``validate_config``)."""

    def _build_loader(self):
        from engine.data.loader import build_step_loader

        return build_step_loader(self.cfg, self.tokenizer)

    def _build_model(self) -> InternVLModel:
        return build_model(self.cfg, meta=True)

    def _objective(self):
        """What the runner trains: language modelling (pre-training; SFT and PRM through their data)."""
        from engine.parallel.objective import LanguageModelling

        return LanguageModelling()

    def _build_runner(self, model, pad_id: int):
        return build_runner(model, self.cfg, self.device, self.world, self.autocast_dtype, pad_id, self._objective())

    def _after_resume(self) -> None:
        """Work that needs the resumed state (the step) before training starts."""

    def _save_configs(self) -> None:
        save_config(self.cfg, os.path.join(self.run_dir, "config.yaml"))

    def setup_report(self) -> dict:
        """Every rank's set-up time and peak host memory so far (collective), logged by rank 0."""
        mine = torch.tensor([self.setup_seconds, peak_rss_mib() / 1024], dtype=torch.float64)
        rows = [mine]
        if self.world > 1:
            rows = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(rows, mine)
        secs, mem = [float(r[0]) for r in rows], [float(r[1]) for r in rows]
        if self.rank == 0:
            log.info("set-up: %.1f-%.1f s per rank, peak host memory %.2f-%.2f GiB per rank", min(secs), max(secs),
                     min(mem), max(mem))
            for r, (t, m) in enumerate(zip(secs, mem)):
                log.info("set-up: rank %d %.1f s, peak host memory %.2f GiB", r, t, m)
        return {"setup/seconds_max": max(secs), "setup/peak_host_gib_max": max(mem)}

    # ------------------------------------------------------------------ evaluation
    def _eval_set(self) -> list:
        """The first ``eval.samples`` samples of the held-out data (no augmentation), loaded once;
        every rank holds the same list, as it does for a training step."""
        import dataclasses

        from engine.data.dataset import InternVLDataset

        e = self.cfg.eval
        data = dataclasses.replace(self.cfg.data, meta_path=e.meta_path, text_corpus=e.text_corpus, jpeg_aug_prob=0.0)
        ds = leader_first(lambda: InternVLDataset(data, self.cfg.model, self.cfg.train.seed, self.tokenizer),
                          self.world)
        samples = [s for s in (ds.load(i) for i in range(e.samples)) if s is not None]
        log.info("evaluation: %d held-out samples from %s every %d steps", len(samples), e.meta_path, e.interval)
        return samples

    def evaluate(self) -> float:
        """The loss over the held-out set under this layout: ``sum(w * ce) / sum(w)`` over all of it,
        in steps of ``train.global_batch`` samples (the runner's forward pass without gradients)."""
        from engine.parallel.objective import LanguageModelling

        num = den = 0.0
        B = self.cfg.train.global_batch
        for i in range(0, len(self.eval_samples), B):
            sums = self.runner.forward_only(self.eval_samples[i:i + B], LanguageModelling.score, 2).sum(0)
            num, den = num + float(sums[0]), den + float(sums[1])
        return num / den if den > 0 else float("nan")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The global training state, the same on every rank. Model, optimizer and RNG states are
        saved per rank, layout-independently, by ``engine.checkpoint.save_checkpoint``."""
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "loader": self.loader.state_dict(),
                "balancer": None}

    def save(self) -> str:
        """Collective; once per step. The final save and a save on a stop signal always wait for
        the disk; others run in the background when the checkpoint manager saves asynchronously."""
        self.ckpt.wait()
        if self.ckpt.last_step == self.step:
            return self.ckpt.step_dir(self.step)
        blocking = None
        if self.ckpt.async_save:  # the ranks must agree: the stop flag is all-reduced
            blocking = True if self.step >= self.cfg.train.steps or self._should_stop() else None
        self.watchdog.enter("checkpoint write", collective=self.world > 1)
        path = save_checkpoint(self.ckpt, self.step, self.runner, self.cfg, self.state_dict(), rng_state(), blocking)
        log.info("saved checkpoint %s", path)
        return path

    def _resume(self) -> None:
        """``train.resume``: auto (this run's latest checkpoint), none, or a path (a checkpoint, or a
        checkpoint root with ``latest``) saved under any layout. A weights-only checkpoint (from
        tools/convert_checkpoint.py) initialises the model at step 0, unless this run already has
        checkpoints of its own, which then win (a restarted fine-tuning run continues)."""
        choice = self.cfg.train.resume
        if choice == "none":
            return
        path = self.ckpt.latest() if choice == "auto" else choice
        if path is not None and os.path.exists(os.path.join(path, "latest")):
            path = CheckpointManager(path).latest()
        if path is None:
            return
        own = self.ckpt.latest() if choice != "auto" else None
        if own is not None and CheckpointReader(path).meta.get("kind") == KIND_WEIGHTS:
            log.info("%s holds weights only; continuing this run from its own checkpoint %s", path, own)
            path = own
        loaded = load_checkpoint(path, self.runner, self.cfg)
        if loaded.trainer is None:
            log.info("initialised the model from %s (%s checkpoint) at step 0", path, loaded.kind)
            return
        self.scheduler.load_state_dict(scheduler_state(loaded.trainer["scheduler"],
                                                       len(self.runner.optimizer.param_groups)))
        self.loader.load_state_dict(loaded.trainer["loader"])
        if loaded.rng is not None:
            set_rng_state(loaded.rng)
        self.step = loaded.step
        log.info("resumed from %s at step %d%s", path, self.step,
                 "" if loaded.same_layout else " (saved under another layout; rank 0's RNG state on every rank)")

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum
        log.warning("received signal %d: will save and exit after this step", signum)

    def _install_signals(self) -> None:
        """SIGTERM / SIGUSR1 set the stop flag. The handler holds the trainer weakly: a handler
        keeping it alive would free the runner's process groups only at interpreter shutdown,
        where gloo's worker threads can no longer release the tensors they hold. Once the
        trainer is gone a signal takes its default action again."""
        import weakref

        ref = weakref.ref(self)

        def handler(signum, frame):
            trainer = ref()
            if trainer is not None:
                trainer._on_signal(signum, frame)
            else:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal is not None else 0.0])
        if self.world > 1:
            self.watchdog.enter("stop-signal all-reduce", collective=True)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ------------------------------------------------------------------ loop
    def train(self) -> list[dict]:
        cfg = self.cfg.train
        self._install_signals()
        metrics = MetricsLogger(self.run_dir, cfg.steps, self.step, enabled=self.rank == 0,
                                progress=cfg.progress, tensorboard=cfg.tensorboard)
        history = []
        setup = self.setup_report()
        wd = self.watchdog
        wd.start()
        try:
            while self.step < cfg.steps:
                row = self.train_step()
                if setup:  # the first step's row carries the set-up figures
                    row, setup = {**row, **setup}, {}
                if self.eval_samples and self.step % self.cfg.eval.interval == 0:
                    wd.enter("evaluation", collective=self.world > 1)
                    row["eval_loss"] = self.evaluate()
                history.append(row)
                if self.step % cfg.log_interval == 0 or self.step == cfg.steps:
                    metrics.log(self.step, row)
                if cfg.save_interval and self.step % cfg.save_interval == 0 and self.step < cfg.steps:
                    if self.health.streak:  # "latest" keeps naming the last good step
                        log.warning("no checkpoint at step %d: the step was skipped", self.step)
                    else:
                        self.save()
                if self._should_stop():
                    self.save()
                    log.warning("stopped by signal %s at step %d after saving", self._stop_signal, self.step)
                    return history
            if cfg.steps > 0 and (not self.ckpt.published() or self.ckpt.published()[-1] != f"step_{self.step:08d}"):
                self.save()
        except Exception:
            if self.world > 1:  # a collective failed: say where the other ranks were
                wd.explain()
            raise
        finally:
            wd.stop()
            metrics.close()
            self.loader.close()  # its worker processes; a later step starts them again
        return history

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        wd, step = self.watchdog, self.step + 1
        wd.enter("data: next step", step=step)
        f = self.cfg.faults
        if f.stall_seconds > 0 and step == f.stall_at_step and self.rank == f.stall_rank:  # hang drill
            wd.enter("stall (fault drill faults.stall_*)")
            log.warning("fault drill: rank %d stalls for %g s at step %d", self.rank, f.stall_seconds, step)
            time.sleep(f.stall_seconds)
        if hasattr(self.loader.dataset, "shape"):  # shapes only: the runner loads this rank's share
            batch = self.loader.next_batch()
            sources = batch.sources
        else:  # a data set without a shape index (in-memory or custom data sets): whole steps, every rank
            batch = self.loader.next_step()
            sources = [getattr(s, "source", "?") for s in batch]
        self.runner.optimizer.zero_grad(set_to_none=True)
        self.runner.poison_loss = self.step + 1 in self.cfg.faults.nan_at_steps  # fault drill
        stats = self.runner.forward_backward(batch)
        self.runner.poison_loss = False
        wd.enter("gradient norm (all-reduce)", collective=self.world > 1)
        grad_norm = self.runner.clip_grad_norm(self.cfg.train.grad_clip)
        wd.enter("optimizer step")
        lr = self.scheduler.get_last_lr()[0]
        if "straggler/rank" in stats:
            self.health.straggler(self.step + 1, int(stats["straggler/rank"]), stats["straggler/ratio"])
        bad = self.health.check(stats["loss"], grad_norm) if stats["weight_total"] > 0 else None
        if bad is not None:  # the loss and the norm are global: every rank skips the same steps
            self.health.skip(self.step + 1, bad, sources)
        elif stats["weight_total"] > 0:
            self.runner.optimizer.step()
            self.scheduler.step()
        else:
            log.warning("step %d has no supervised tokens (all samples skipped?): optimizer step skipped",
                        self.step + 1)
            self.scheduler.step()
        self.step += 1
        dt = time.perf_counter() - t0
        skipped = self.loader.skipped_total()
        return {"loss": stats["loss"], "lr": lr, "grad_norm": grad_norm, "tokens": stats["tokens"],
                "text_tokens": stats["text_tokens"], "visual_tokens": stats["visual_tokens"],
                "samples": stats["samples"], "skipped_samples": skipped, "skipped_steps": self.health.skipped,
                "step_time": dt, "tokens_per_s": stats["tokens"] / dt if dt > 0 else 0.0,
                **{k: v for k, v in stats.items() if k.startswith(("balance/", "skip/", "straggler/", "data/"))},
                **stats.get("metrics", {})}
