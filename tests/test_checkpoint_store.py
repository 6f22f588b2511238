"""The checkpoint tensor store: box arithmetic, streamed safetensors, ZeRO-1 slices mapped to
per-parameter tensors and back under another data-parallel size, clear errors on damage."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from safetensors import safe_open

from engine.checkpoint import CheckpointError, CheckpointReader
from engine.checkpoint.regions import Placement, flat_range_boxes, intersect, take
from engine.checkpoint.safetensors_io import SafetensorsWriter, read_header
from engine.checkpoint.state import collect_runner_state, load_model, load_optimizer, write_meta
from engine.checkpoint.store import ShardWriter, merge_index


def test_flat_range_boxes_tile_the_range_in_order():
    rng = random.Random(0)
    for _ in range(200):
        shape = tuple(rng.randint(1, 4) for _ in range(rng.randint(0, 4)))
        n = torch.Size(shape).numel()
        a = rng.randint(0, n)
        b = rng.randint(a, n)
        flat = torch.arange(n).view(shape) if shape else torch.tensor(0)
        got = []
        for box, start in flat_range_boxes(shape, a, b):
            part = take(flat, box).reshape(-1)
            assert part.tolist() == list(range(start, start + part.numel())), (shape, a, b, box)
            got += part.tolist()
        assert got == list(range(a, b)), (shape, a, b)
        assert len(flat_range_boxes(shape, a, b)) <= 2 * max(1, len(shape)) - 1


def test_placement_strips_padding():
    # a vocab-parallel shard: local rows 6..9 of a 10-row padded tensor whose real size is 8
    p = Placement(global_shape=(8, 3), local_shape=(4, 3), dim=0, start=6)
    assert p.stored() == (((6, 0), (2, 3)), ((0, 0), (2, 3)))
    assert p.to_global(((2, 0), (2, 3))) is None  # all padding
    assert intersect(((0, 0), (4, 4)), ((3, 3), (4, 4))) == ((3, 3), (1, 1))
    assert intersect(((0,), (2,)), ((2,), (2,))) is None


def test_streamed_safetensors_are_standard_and_checked(tmp_path):
    path = str(tmp_path / "a.safetensors")
    a, b = torch.randn(3, 5).bfloat16(), torch.arange(7, dtype=torch.int64)
    w = SafetensorsWriter(path, [("a", a.dtype, a.shape), ("b", b.dtype, b.shape), ("s", torch.float32, ())])
    w.write("b", b)  # any order
    with pytest.raises(ValueError, match="'a' is torch.float32"):
        w.write("a", a.float())
    w.write("a", a)
    with pytest.raises(ValueError, match="never written: s"):
        w.close()
    with SafetensorsWriter(path, [("a", a.dtype, a.shape), ("s", torch.float32, ())]) as w:
        w.write("s", torch.tensor(2.5))
        w.write("a", a[:, :])
    with safe_open(path, "pt") as f:
        assert torch.equal(f.get_tensor("a"), a) and f.get_tensor("s").item() == 2.5
        assert torch.equal(f.get_slice("a")[1:3, 2:4], a[1:3, 2:4])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)
    with pytest.raises(ValueError, match="truncated"):
        read_header(path)


class FakeRunner:
    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))


def _zero_rank(model, rank: int, world: int, fill: dict[str, torch.Tensor]):
    """A ZeroAdamW as rank ``rank`` of ``world`` data-parallel ranks would hold it (one process:
    the slice bounds are set by hand), its state cut from the full flat vectors ``fill``."""
    from conftest import zero_as_rank

    opt, shard, master = zero_as_rank(model, rank, world)
    master.data = shard.owned([p.data for p in shard.params])
    if fill:
        opt.state[master] = {"step": torch.tensor(4.0)}
        for k, v in fill.items():
            opt.state[master][k] = torch.nn.functional.pad(v, (0, shard.padded - v.numel()))[shard.start:shard.end].clone()
    return FakeRunner(model, opt)


def _publish(path: str, writers: list[ShardWriter], kind: str = "train") -> None:
    os.makedirs(path)
    for w in writers:
        w.write(path)
    merge_index(path, sorted(f for f in os.listdir(path) if f.endswith(".index.json")))
    write_meta(path, {"format": "engine-sharded", "version": 1, "kind": kind, "step": 4})
    files = {f: os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump({"step": 4, "world_size": len(writers), "files": files}, f)


def test_zero1_slices_reshard_across_data_parallel_sizes(tmp_path, monkeypatch):
    import engine.checkpoint.state as S

    monkeypatch.setattr(S, "check_model", lambda reader, cfg: None)  # a toy model, not InternVL
    model = _model(0)
    n = sum(p.numel() for p in model.parameters())  # 5*7+7 + 7+7 + 7*3+3 = 80
    fill = {"exp_avg": torch.randn(n), "exp_avg_sq": torch.rand(n)}
    # 3 ranks: slices of 27 elements cut through the middle of weight rows and across tensors
    writers = [collect_runner_state(_zero_rank(model, r, 3, fill), r) for r in range(3)]
    for w in writers[1:]:  # data-parallel ranks > 0 hold the same weights and do not write them
        w.items = [it for it in w.items if not it.key.startswith("model/")]
    assert sum(len(w.items) for w in writers) > 3 * len(list(model.parameters()))
    _publish(str(tmp_path / "ck"), writers)
    reader = CheckpointReader(str(tmp_path / "ck"))
    offset = 0
    for name, p in model.named_parameters():  # per-parameter tensors in the parameter's shape
        for k, v in fill.items():
            assert torch.equal(reader.read(f"optim/{k}/{name}"), v[offset:offset + p.numel()].view_as(p)), (k, name)
        assert reader.scalar(f"optim/step/{name}") == 4.0
        offset += p.numel()

    # load into 2 ZeRO ranks and into a plain AdamW: the same numbers
    for r in range(2):
        target = _zero_rank(_model(1), r, 2, {})
        load_model(reader, target, None)
        load_optimizer(reader, target)
        shard, master = target.optimizer.shards[0], target.optimizer.param_groups[0]["params"][0]
        state = target.optimizer.state[master]
        for k, v in fill.items():
            want = torch.nn.functional.pad(v, (0, shard.padded - n))[shard.start:shard.end]
            assert torch.equal(state[k], want), (r, k)
        assert float(state["step"]) == 4.0
        assert torch.equal(master.detach(), shard.owned([p.data for p in model.parameters()]))
    plain_model = _model(2)
    plain = FakeRunner(plain_model, torch.optim.AdamW(plain_model.parameters()))
    load_model(reader, plain, None)
    load_optimizer(reader, plain)
    offset = 0
    for (name, p), q in zip(model.named_parameters(), plain_model.parameters()):
        assert torch.equal(p, q), name
        st = plain.optimizer.state[q]
        assert torch.equal(st["exp_avg"], fill["exp_avg"][offset:offset + p.numel()].view_as(p))
        assert float(st["step"]) == 4.0
        offset += p.numel()

    # and back: the plain AdamW saves the same tensors
    _publish(str(tmp_path / "again"), [collect_runner_state(plain, 0)])
    again = CheckpointReader(str(tmp_path / "again"))
    for key in reader.keys():
        assert torch.equal(again.read(key), reader.read(key)), key


def test_damaged_store_names_what_is_wrong(tmp_path):
    model = _model(0)
    w0, w1 = ShardWriter(0), ShardWriter(1)
    weight = model[0].weight.detach()
    w0.add("model/0.weight", (7, 5), ((0, 0), (4, 5)), weight[:4])
    w1.add("model/0.weight", (7, 5), ((4, 0), (3, 5)), weight[4:])
    _publish(str(tmp_path / "ok"), [w0, w1])
    assert torch.equal(CheckpointReader(str(tmp_path / "ok")).read("model/0.weight"), weight)
    assert torch.equal(CheckpointReader(str(tmp_path / "ok")).read("model/0.weight", ((3, 1), (2, 2))), weight[3:5, 1:3])

    w0, w1 = ShardWriter(0), ShardWriter(1)
    w0.add("model/0.weight", (7, 5), ((0, 0), (4, 5)), weight[:4])
    w1.add("model/0.weight", (7, 5), ((4, 0), (2, 5)), weight[4:6])
    with pytest.raises(CheckpointError, match=r"model/0\.weight: the ranks wrote 30 of its 35 elements"):
        _publish(str(tmp_path / "short"), [w0, w1])

    path = str(tmp_path / "ok")
    with open(os.path.join(path, "index.json")) as f:
        index = json.load(f)
    index["tensors"]["model/0.weight"]["pieces"][1]["offsets"] = [3, 0]  # overlaps, leaves row 6 out
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["files"]["index.json"] = os.path.getsize(os.path.join(path, "index.json"))
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(CheckpointError, match=r"model/0\.weight box .*: 5 elements in no piece, 5 in several"):
        CheckpointReader(path).read("model/0.weight")
    with pytest.raises(CheckpointError, match="rank_00001.safetensors is truncated or altered"):
        with open(os.path.join(path, "rank_00001.safetensors"), "r+b") as f:
            f.truncate(100)
        CheckpointReader(path)
    os.remove(os.path.join(path, "rank_00001.safetensors"))
    with pytest.raises(CheckpointError, match="incomplete: missing rank_00001.safetensors"):
        CheckpointReader(path)
