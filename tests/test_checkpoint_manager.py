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
    assert m.latest().endswith("step_00000003") and m.last_step == 3
    assert m.load_rank(m.latest(), 0)["x"].item() == 3
    m.save(3, {"x": torch.tensor([33])})  # the same step again replaces it in place
    assert m.load_rank(m.latest(), 0)["x"].item() == 33
    assert sorted(os.listdir(tmp_path / "ck")) == ["latest", "step_00000002", "step_00000003"]
    os.replace(tmp_path / "ck" / "step_00000003", tmp_path / "ck" / ".old-step_00000003")  # killed mid-replace
    assert m.latest().endswith(".old-step_00000003") and m.load_rank(m.latest(), 0)["x"].item() == 33


def test_incomplete_and_corrupt_are_named(tmp_path):
    m = CheckpointManager(str(tmp_path / "ck"))
    path = m.save(5, {"x": 1})
    os.remove(os.path.join(path, "rank_00000.pt"))
    with pytest.raises(CheckpointError, match="missing rank_00000.pt"):
        m.load_rank(path, 0)
    path = m.save(6, {"x": 1})
    size = os.path.getsize(os.path.join(path, "rank_00000.pt"))
    with open(os.path.join(path, "rank_00000.pt"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(CheckpointError, match=f"rank_00000.pt is truncated or altered: 7 bytes, the manifest says {size}"):
        m.load_rank(path, 0)
    with open(os.path.join(path, "rank_00000.pt"), "wb") as f:
        f.write(b"g" * size)  # same size, unreadable
    with pytest.raises(CheckpointError, match="rank_00000.pt is corrupt"):
        m.load_rank(path, 0)
    os.remove(os.path.join(path, "manifest.json"))
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        m.load_rank(path, 0)
    with pytest.raises(CheckpointError, match="does not exist"):
        m.check(str(tmp_path / "nope"))


def test_failed_write_publishes_nothing(tmp_path):
    m = CheckpointManager(str(tmp_path / "ck"))
    m.save(1, {"x": 1})

    def broken(tmp: str) -> list[str]:
        raise OSError("disk full")

    with pytest.raises(CheckpointError, match="(?s)step 2 not published: rank 0 failed to write.*OSError: disk full"):
        m.save(2, broken)
    assert m.latest().endswith("step_00000001") and m.published() == ["step_00000001"]


def test_async_save_publishes_on_wait(tmp_path):
    m = CheckpointManager(str(tmp_path / "ck"), async_save=True)
    m.save(1, {"x": 1}, blocking=True)
    started = []

    def slow(tmp: str) -> list[str]:
        started.append(tmp)
        torch.save({"x": 2}, os.path.join(tmp, "rank_00000.pt"))
        return ["rank_00000.pt"]

    m.save(2, slow)
    assert m.latest().endswith("step_00000001")  # not published until wait() or the next save
    assert m.wait().endswith("step_00000002")
    assert started and m.latest().endswith("step_00000002") and m.last_step == 2
    assert m.load_rank(m.latest(), 0)["x"] == 2
    assert m.wait() is None
