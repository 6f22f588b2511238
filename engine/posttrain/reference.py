"""Reference log-probs computed in a first pass (``posttrain.mpo.reference=precomputed``).

Before the first step the initial policy scores every pair the run will see (steps x global
batch, in the loader's order; each rank loads only its share of each step, as in training); the
store maps each pair's global index to its (chosen, rejected) log-probs and is saved in the run
directory, so a resumed run reuses it and no frozen copy of the model is kept in memory.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import torch

from engine.data.loader import StepBatch, StepLoader

log = logging.getLogger("engine.posttrain")

FILE = "reference_logps.pt"


class ReferenceStore:
    def __init__(self, indices: torch.Tensor, logps: torch.Tensor, meta: dict, path: str = ""):
        if indices.shape[0] != logps.shape[0] or logps.ndim != 2 or logps.shape[1] != 2:
            raise ValueError(f"reference store: {indices.shape[0]} indices for log-probs of shape {tuple(logps.shape)}")
        self.meta, self.path = dict(meta), path
        self.logps = logps.double()
        self.row = {int(i): k for k, i in enumerate(indices.tolist())}

    def __len__(self) -> int:
        return len(self.row)

    def lookup(self, indices: Sequence[int]) -> torch.Tensor:
        """``[pairs, 2]`` float64 reference log-probs of the pairs with these global indices."""
        rows = []
        for i in indices:
            k = self.row.get(int(i))
            if k is None:
                raise KeyError(f"pair {i} has no precomputed reference log-probs in {self.path or 'the store'} "
                               f"(covers {self.meta.get('steps')} steps)")
            rows.append(k)
        return self.logps[torch.tensor(rows, dtype=torch.long)] if rows else torch.zeros(0, 2, dtype=torch.float64)

    def save(self, path: str) -> None:
        indices = torch.tensor(sorted(self.row), dtype=torch.long)
        logps = self.logps[torch.tensor([self.row[int(i)] for i in indices], dtype=torch.long)]
        torch.save({"indices": indices, "logps": logps, "meta": self.meta}, path + ".part")
        os.replace(path + ".part", path)
        self.path = path

    @classmethod
    def load(cls, path: str, expect: dict) -> "ReferenceStore":
        """Load and check that it was made for this data order and covers ``expect['steps']``."""
        state = torch.load(path, map_location="cpu", weights_only=False)
        meta = state["meta"]
        for key in ("seed", "global_batch", "data"):
            if meta.get(key) != expect.get(key):
                raise ValueError(f"{path} was computed for {key}={meta.get(key)!r}, this run has {expect.get(key)!r}; "
                                 f"delete it to recompute from the initial weights")
        if int(meta.get("steps", 0)) < int(expect["steps"]):
            raise ValueError(f"{path} covers {meta.get('steps')} steps but train.steps={expect['steps']}; the policy "
                             f"has moved since, so the reference cannot be extended: restart the run")
        return cls(state["indices"], state["logps"], meta, path)


def precompute_reference(score: Callable[[StepBatch | Sequence], torch.Tensor], loader: StepLoader, steps: int,
                         meta: dict) -> ReferenceStore:
    """Score the pairs of steps ``0 .. steps-1`` with ``score(pairs) -> [pairs, 2]`` (the initial
    policy, no gradients: the runner's ``forward_only``). ``loader`` is a fresh loader over the training
    data. With a shape index (``PreferenceDataset``) a step comes as a ``StepBatch`` of which each rank
    loads only its share (the runner drops the pairs no rank could load before scoring them); otherwise
    every rank loads whole steps."""
    indices, logps = [], []
    for step in range(steps):
        batch = loader.next_batch() if hasattr(loader.dataset, "shape") else loader.next_step()
        if len(batch):
            logps.append(score(batch).double().cpu())
            indices.extend(batch.indices if isinstance(batch, StepBatch) else [p.index for p in batch])
        if (step + 1) % 100 == 0:
            log.info("reference log-probs: %d/%d steps", step + 1, steps)
    values = torch.cat(logps) if logps else torch.zeros(0, 2, dtype=torch.float64)
    return ReferenceStore(torch.tensor(indices, dtype=torch.long), values, {**meta, "steps": steps})
