"""``PostTrainer``: the engine's training loop for SFT, MPO and PRM runs.

It is ``engine.trainer.Trainer`` (loop, checkpoints, exact resume, signals, metrics) with its own
set-up: initial weights from ``posttrain.init``, the data set of the mode, and for MPO the MPO
runner and (``reference=precomputed``) the first pass over the pairs.

* sft: InternVL conversations (``data.meta_path``), loss on assistant turns, the usual runner;
* prm: PRM conversations (``data.meta_path``), loss on the ``+``/``-`` label tokens only;
* mpo: preference pairs (``posttrain.data``), the MPO objective; metrics add rewards
  (chosen, rejected, accuracy, margin), the three loss parts and the BCO shift.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

import torch.distributed as dist

from engine.checkpoint import CheckpointManager
from engine.config import Config, ConfigError, save_config, validate_config
from engine.data.loader import StepLoader
from engine.metrics import setup_logging
from engine.optim import build_scheduler
from engine.posttrain.config import PostTrainConfig, save_posttrain_config, validate_posttrain
from engine.trainer import (StepHealth, Trainer, build_model, init_distributed, resolve_device, resolve_dtype, seed_everything,
                            sync_token_ids)
from engine.watchdog import Watchdog, job_store

log = logging.getLogger("engine.posttrain")


class PostTrainer(Trainer):
    def __init__(self, cfg: Config, pt: PostTrainConfig):
        t_start = time.perf_counter()
        self.cfg, self.pt = cfg, pt
        if cfg.eval.interval:
            raise ConfigError(f"eval.interval={cfg.eval.interval}: held-out evaluation is not available in "
                              "post-training yet (use engine.train)")
        self.rank, self.world, self.local_rank = init_distributed()
        setup_logging(self.rank)
        validate_config(cfg, self.world)
        validate_posttrain(pt, cfg)
        self.device = resolve_device(cfg.train.device, self.local_rank)
        self.autocast_dtype = resolve_dtype(cfg.train.dtype, self.device)
        self.run_dir = cfg.run_dir
        seed_everything(cfg.train.seed)

        from engine.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        sync_token_ids(cfg, self.tokenizer)
        self.dataset = self._build_dataset()
        workers = int(cfg.data.num_workers)
        self.loader = StepLoader(self.dataset, cfg.train.global_batch, num_workers=workers, prefetch=workers > 0)

        model = build_model(cfg)
        if pt.init:
            from engine.posttrain.checkpoints import load_weights

            load_weights(model, pt.init)
            log.info("initial weights from %s", pt.init)
        pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        self.runner = self._build_runner(model, pad_id)
        self.scheduler = build_scheduler(self.runner.optimizer, cfg.train)
        self.ckpt = CheckpointManager(os.path.join(self.run_dir, "checkpoints"), cfg.train.keep_last)
        self.step = 0
        self.health = StepHealth(cfg.train)
        self.watchdog = Watchdog(cfg.train.hang_timeout_s, self.rank, self.world, job_store())
        self.runner.watchdog = self.watchdog
        self.eval_samples: list = []
        self._stop_signal: Optional[int] = None
        self._resume()
        if pt.mode == "mpo" and pt.mpo.reference == "precomputed":
            self._reference_store()
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
            save_posttrain_config(pt, os.path.join(self.run_dir, "posttrain.yaml"))
        self.setup_seconds = time.perf_counter() - t_start

    # ------------------------------------------------------------------ set-up by mode
    def _build_dataset(self):
        cfg, pt = self.cfg, self.pt
        if pt.mode == "mpo":
            from engine.posttrain.preference import PreferenceDataset

            return PreferenceDataset(pt.data, cfg.data, cfg.model, cfg.train.seed, self.tokenizer)
        if pt.mode == "prm":
            from engine.posttrain.prm import PRMDataset

            return PRMDataset(cfg.data, cfg.model, cfg.train.seed, self.tokenizer, pt.prm.plus, pt.prm.minus)
        from engine.data.dataset import InternVLDataset

        return InternVLDataset(cfg.data, cfg.model, cfg.train.seed, self.tokenizer)

    def _build_runner(self, model, pad_id: int):
        cfg = self.cfg
        if self.pt.mode == "mpo":
            from engine.posttrain.runner import build_mpo_runner

            return build_mpo_runner(model, cfg, self.pt.mpo, self.device, self.world, self.autocast_dtype, pad_id)
        if self.world > 1:
            from engine.parallel.runner import ParallelRunner

            return ParallelRunner(model, cfg, self.device, self.autocast_dtype, pad_id=pad_id)
        from engine.step import LocalRunner

        return LocalRunner(model, cfg, self.device, self.autocast_dtype, pad_id=pad_id)

    def _reference_store(self) -> None:
        """Load the run's precomputed reference log-probs, or compute them with the initial
        policy before the first step (an error once the policy has moved)."""
        from engine.posttrain.reference import FILE, ReferenceStore, precompute_reference

        path = os.path.join(self.run_dir, FILE)
        expect = {"seed": self.cfg.train.seed, "global_batch": self.cfg.train.global_batch,
                  "data": os.path.abspath(self.pt.data), "steps": self.cfg.train.steps}
        if os.path.exists(path):
            store = ReferenceStore.load(path, expect)
        elif self.step > 0:
            raise FileNotFoundError(f"{path} is missing but the run resumes at step {self.step}: the reference "
                                    f"log-probs must come from the initial weights; restart the run")
        else:
            log.info("computing reference log-probs of %d steps with the initial policy", self.cfg.train.steps)
            loader = StepLoader(self.dataset, self.cfg.train.global_batch)
            store = precompute_reference(self.runner.sequence_logps, loader, self.cfg.train.steps,
                                         {k: v for k, v in expect.items() if k != "steps"})
            if self.rank == 0:
                os.makedirs(self.run_dir, exist_ok=True)
                store.save(path)
            if self.world > 1:
                dist.barrier()
        self.runner.set_reference_store(store)

    # ------------------------------------------------------------------ loop
    def train_step(self) -> dict:
        row = super().train_step()
        if self.pt.mode == "mpo":
            row.update(self.runner.last_metrics)
            row["pairs"] = row.pop("samples") // 2
        return row


def run(cfg: Config, pt: PostTrainConfig) -> list[dict]:
    """Train; returns the per-step metric rows."""
    trainer = PostTrainer(cfg, pt)
    history = trainer.train()
    if trainer.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return history

