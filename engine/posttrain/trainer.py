"""``PostTrainer``: the engine's training loop for SFT, MPO and PRM runs.

It is ``engine.trainer.Trainer`` (loop, checkpoints, exact resume, signals, metrics) with its own
set-up: initial weights from ``posttrain.init``, the data set of the mode, and for MPO the MPO
objective (``engine.posttrain.objective``) for the trainer's runner and (``reference=precomputed``)
the first pass over the pairs.

* sft: InternVL conversations (``data.meta_path``), loss on assistant turns, the usual runner;
* prm: PRM conversations (``data.meta_path``), loss on the ``+``/``-`` label tokens only;
* mpo: preference pairs (``posttrain.data``), the MPO objective; metrics add rewards
  (chosen, rejected, accuracy, margin), the three loss parts and the BCO shift.
"""

from __future__ import annotations

import logging
import os

import torch.distributed as dist

from engine.config import Config, ConfigError
from engine.data.loader import StepLoader
from engine.posttrain.config import PostTrainConfig, save_posttrain_config, validate_posttrain
from engine.trainer import Trainer, build_model

log = logging.getLogger("engine.posttrain")


class PostTrainer(Trainer):
    """``Trainer`` with the set-up of a post-training mode (its hooks); the loop is the trainer's."""

    def __init__(self, cfg: Config, pt: PostTrainConfig):
        self.pt = pt
        super().__init__(cfg)

    # ------------------------------------------------------------------ set-up by mode
    def _validate(self) -> None:
        if self.cfg.eval.interval:
            raise ConfigError(f"eval.interval={self.cfg.eval.interval}: held-out evaluation is not available in "
                              "post-training yet (use engine.train)")
        validate_posttrain(self.pt, self.cfg)

    def _build_loader(self) -> StepLoader:
        cfg, pt = self.cfg, self.pt
        if pt.mode == "mpo":
            from engine.posttrain.preference import PreferenceDataset

            dataset = PreferenceDataset(pt.data, cfg.data, cfg.model, cfg.train.seed, self.tokenizer)
        elif pt.mode == "prm":
            from engine.posttrain.prm import PRMDataset

            dataset = PRMDataset(cfg.data, cfg.model, cfg.train.seed, self.tokenizer, pt.prm.plus, pt.prm.minus)
        else:
            from engine.data.dataset import InternVLDataset

            dataset = InternVLDataset(cfg.data, cfg.model, cfg.train.seed, self.tokenizer)
        self.dataset = dataset
        workers = int(cfg.data.num_workers)
        return StepLoader(dataset, cfg.train.global_batch, num_workers=workers,
                          prefetch=workers > 0 and cfg.data.prefetch)

    def _build_model(self):
        model = build_model(self.cfg)
        if self.pt.init:
            from engine.posttrain.checkpoints import load_weights

            load_weights(model, self.pt.init)
            log.info("initial weights from %s", self.pt.init)
        return model

    def _objective(self):
        if self.pt.mode == "mpo":
            from engine.posttrain.objective import MPO

            return MPO(self.pt.mpo, self.cfg)
        return super()._objective()

    def _build_runner(self, model, pad_id: int):
        """The trainer's runner; for MPO with ``reference=model`` also the frozen initial policy, sharded
        like the policy."""
        reference = None
        if self.pt.mode == "mpo" and self.pt.mpo.reference == "model":
            from engine.posttrain.objective import frozen_copy

            reference = frozen_copy(model)
        runner = super()._build_runner(model, pad_id)
        if reference is not None:
            runner.objective.reference = runner.shard_like(reference)
        return runner

    def _after_resume(self) -> None:
        if self.pt.mode == "mpo" and self.pt.mpo.reference == "precomputed":
            self._reference_store()

    def _save_configs(self) -> None:
        super()._save_configs()
        save_posttrain_config(self.pt, os.path.join(self.run_dir, "posttrain.yaml"))

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
            objective = self.runner.objective
            store = precompute_reference(lambda pairs: self.runner.forward_only(pairs, objective.score, 2), loader,
                                         self.cfg.train.steps,
                                         {k: v for k, v in expect.items() if k != "steps"})
            if self.rank == 0:
                os.makedirs(self.run_dir, exist_ok=True)
                store.save(path)
            if self.world > 1:
                dist.barrier()
        self.runner.objective.set_reference_store(store)
