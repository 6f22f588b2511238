import os

import pytest
import torch

from engine.checkpoint import CheckpointError, CheckpointManager


def test_save_latest_keep_last(tmp_path):
    m = CheckpointManager(str(tmp_path / "ck"), keep_last=2)
    assert m.latest() is None
    for step in (1, 2, 3):
        m.save(step, {"x": torch.tensor([step])})
    assert m.published() == ["step_00000002", "step_00000003"]
    assert m.latest().endswith("step_00000003")
    assert m.load_rank(m.latest(), 0)["x"].item() == 3


def test_incomplete_and_corrupt_are_named(tmp_path):
    m = CheckpointManager(str(tmp_path / "ck"))
    path = m.save(5, {"x": 1})
    os.remove(os.path.join(path, "rank_00000.pt"))
    with pytest.raises(CheckpointError, match="missing rank_00000.pt"):
        m.load_rank(path, 0)
    path = m.save(6, {"x": 1})
    with open(os.path.join(path, "rank_00000.pt"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        m.load_rank(path, 0)
    os.remove(os.path.join(path, "manifest.json"))
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        m.load_rank(path, 0)
    with pytest.raises(CheckpointError, match="does not exist"):
        m.check(str(tmp_path / "nope"))
