"""``train.param_dtype=bfloat16``: bf16 parameters, fp32 main grads, fp32 master weights (engine/precision.py).

Unit tests of the hooks, the optimizers and the checkpointed masters; then the tiny preset:
100 steps in bf16 track the fp32 run, a bf16 run resumes bit-exactly (one process, and 2 gloo
ranks with ZeRO-1), its masters reshard from ZeRO dp2 to one process bitwise, and dp2 + ZeRO-1
follows the one-process bf16 curve to bf16 tolerance.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from conftest import tiny_overrides
from dist_utils import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples/configs/tiny.yaml")
BF16 = {"train.param_dtype": "bfloat16", "train.dtype": "bfloat16"}
STEPS, SAVE_AT = 8, 4
DP2_TOL = 1e-2  # relative: a dp2 sum of two half-batch bf16 gradients vs one whole-batch bf16 gradient


# ----------------------------------------------------------------------------- units


def _scalar_model(dtype: str):
    from engine.precision import apply_param_dtype

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.5)
    apply_param_dtype(model, dtype, torch.device("cpu"))
    return model


def _backward(model, x: float) -> None:
    model(torch.tensor([[x]], dtype=model.weight.dtype)).sum().backward()  # d/dw = x


def test_hooks_accumulate_microbatches_in_fp32_main_grads():
    from engine.optim import MasterAdamW
    from engine.precision import grad_of

    model = _scalar_model("bfloat16")
    w = model.weight
    assert w.dtype == torch.bfloat16 and w.main_grad.dtype == torch.float32
    _backward(model, 256.0)
    _backward(model, 1.0)  # bf16 accumulation would round 256 + 1 to 256
    assert w.grad is None and w.main_grad.item() == 257.0
    assert grad_of(w) is w.main_grad
    opt = MasterAdamW([{"params": [w], "weight_decay": 0.0}], lr=0.1)
    opt.zero_grad(set_to_none=True)
    assert w.main_grad.item() == 0.0 and w.grad is None and grad_of(w) is w.main_grad

    plain = _scalar_model("float32")  # fp32: no main grad, autograd's .grad as before
    _backward(plain, 2.0)
    assert not hasattr(plain.weight, "main_grad") and grad_of(plain.weight) is plain.weight.grad
    assert plain.weight.grad.item() == 2.0


def test_master_adamw_steps_fp32_masters_and_restores_them_exactly():
    from engine.optim import MasterAdamW, build_optimizer, clip_grad_norm
    from engine.config import TrainConfig
    from engine.precision import apply_param_dtype, grad_of

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    ref = [(p.detach().to(torch.bfloat16).float() if p.ndim >= 2 else p.detach()).clone().requires_grad_(True)
           for p in model.parameters()]  # weights are stored in bf16, biases stay fp32
    apply_param_dtype(model, "bfloat16", torch.device("cpu"))
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(model.named_parameters(), cfg, torch.device("cpu"))
    assert isinstance(opt, MasterAdamW) and all(m.dtype == torch.float32 for m in opt.masters)
    ref_opt = torch.optim.AdamW([{"params": [ref[0], ref[2]], "weight_decay": 0.1},
                                 {"params": [ref[1], ref[3]], "weight_decay": 0.0}], lr=1e-2)
    for step in range(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(4, 8)).float().pow(2).sum().backward()
        norm = clip_grad_norm(list(model.parameters()), 0.5)
        assert norm > 0.5  # clipped: the main grads were scaled
        for r, p in zip(ref, model.parameters()):
            r.grad = grad_of(p).clone()
        ref_opt.step()
        opt.step()
        ref_by_param = dict(zip((id(p) for p in model.parameters()), ref))
        for p, m in zip(opt.params, opt.masters):
            assert torch.equal(m.detach(), ref_by_param[id(p)].detach()), step
            assert torch.equal(p.detach(), m.detach().to(p.dtype)), step
    state = opt.state_dict()
    saved = [m.detach().clone() for m in opt.masters]
    with torch.no_grad():
        for m in opt.masters:
            m.add_(1.0)
    opt.load_state_dict(state)
    for m, s, p in zip(opt.masters, saved, opt.params):
        assert torch.equal(m.detach(), s) and torch.equal(p.detach(), s.to(p.dtype))


def test_param_dtype_is_validated():
    from engine.config import ConfigError, load_config

    from engine.precision import resolve_param_dtype

    with pytest.raises(ConfigError, match=r"train.param_dtype='float16' must be one of auto, float32, bfloat16"):
        load_config(CONFIG, ["train.param_dtype=float16"])
    assert load_config(CONFIG, []).train.param_dtype == "auto"  # fp32 on a CPU, bf16 on a GPU
    with pytest.raises(ConfigError, match="train.param_dtype=bfloat16 needs bf16 autocast"):
        load_config(CONFIG, ["train.param_dtype=bfloat16", "train.dtype=float32"])
    assert resolve_param_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_param_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_param_dtype("float32", torch.device("cuda")) == torch.float32


def _bf16_toy(seed: int):
    torch.manual_seed(seed)
    # weight matrices only: every parameter is stored in bf16 (norm gains and biases would stay fp32)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7, bias=False), torch.nn.Linear(7, 3, bias=False))
    from engine.precision import apply_param_dtype

    apply_param_dtype(model, "bfloat16", torch.device("cpu"))
    return model


class _Runner:
    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer


def _zero_rank(model, rank: int, world: int, masters: torch.Tensor):
    """A bf16 ``ZeroAdamW`` as rank ``rank`` of ``world`` would hold it (slice bounds set by hand),
    its master slice cut from the full flat fp32 ``masters``."""
    from conftest import zero_as_rank

    opt, shard, master = zero_as_rank(model, rank, world)
    master.data = torch.nn.functional.pad(masters, (0, shard.padded - masters.numel()))[shard.start:shard.end].clone()
    opt.state[master] = {"step": torch.tensor(4.0), "exp_avg": torch.zeros_like(master),
                         "exp_avg_sq": torch.zeros_like(master)}
    return _Runner(model, opt)


def test_masters_reshard_between_zero_sizes_and_without_zero(tmp_path, monkeypatch):
    """Masters saved by 3 ZeRO ranks load bitwise into 2 ZeRO ranks and into ``MasterAdamW``,
    which saves them back unchanged; a float32 run loading them takes the masters as weights."""
    import json

    import engine.checkpoint.state as S
    from engine.checkpoint import CheckpointReader
    from engine.checkpoint.state import collect_runner_state, load_model, load_optimizer
    from engine.checkpoint.store import merge_index
    from engine.optim import MasterAdamW

    monkeypatch.setattr(S, "check_model", lambda reader, cfg: None)  # a toy model, not InternVL
    model = _bf16_toy(0)
    n = sum(p.numel() for p in model.parameters())
    masters = torch.randn(n)  # fp32 values that bf16 cannot hold
    with torch.no_grad():  # the parameters are the masters rounded, as after a step
        off = 0
        for p in model.parameters():
            p.copy_(masters[off:off + p.numel()].view_as(p))
            off += p.numel()

    def publish(path, writers):
        os.makedirs(path)
        for w in writers:
            w.write(path)
        merge_index(path, sorted(f for f in os.listdir(path) if f.endswith(".index.json")))
        S.write_meta(path, {"format": "engine-sharded", "version": 1, "kind": "train", "step": 4})
        files = {f: os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)}
        with open(os.path.join(path, "manifest.json"), "w") as f:
            json.dump({"step": 4, "world_size": len(writers), "files": files}, f)

    writers = [collect_runner_state(_zero_rank(model, r, 3, masters), r) for r in range(3)]
    for w in writers[1:]:
        w.items = [it for it in w.items if not it.key.startswith("model/")]
    publish(str(tmp_path / "ck"), writers)
    reader = CheckpointReader(str(tmp_path / "ck"))
    assert reader.read("model/0.weight").dtype == torch.bfloat16
    off = 0
    for name, p in model.named_parameters():
        assert torch.equal(reader.read(f"optim/master/{name}"), masters[off:off + p.numel()].view_as(p)), name
        off += p.numel()

    for r in range(2):  # 2 ZeRO ranks
        target = _zero_rank(_bf16_toy(1), r, 2, torch.zeros(n))
        load_model(reader, target, None)
        load_optimizer(reader, target)
        shard, master = target.optimizer.shards[0], target.optimizer.param_groups[0]["params"][0]
        assert torch.equal(master.detach(), torch.nn.functional.pad(masters, (0, shard.padded - n))[shard.start:shard.end])

    plain_model = _bf16_toy(2)  # no ZeRO
    opt = MasterAdamW([{"params": list(plain_model.parameters()), "weight_decay": 0.0}], lr=1e-3)
    plain = _Runner(plain_model, opt)
    load_model(reader, plain, None)
    load_optimizer(reader, plain)
    off = 0
    for m, p in zip(opt.masters, opt.params):
        assert torch.equal(m.detach(), masters[off:off + p.numel()].view_as(p))
        assert torch.equal(p.detach(), m.detach().to(p.dtype))
        off += p.numel()
    publish(str(tmp_path / "again"), [collect_runner_state(plain, 0)])
    again = CheckpointReader(str(tmp_path / "again"))
    for key in reader.keys():
        assert torch.equal(again.read(key), reader.read(key)), key

    fp32_model = torch.nn.Sequential(torch.nn.Linear(5, 7, bias=False), torch.nn.Linear(7, 3, bias=False))
    fp32 = _Runner(fp32_model, torch.optim.AdamW(fp32_model.parameters()))
    load_model(reader, fp32, None)
    load_optimizer(reader, fp32)
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in fp32_model.parameters()]), masters)


def _zero_gather_dtype(rank: int, world: int) -> dict:
    """A bf16 ZeroAdamW over 2 ranks: which dtype its all-gather sends, the parameters after a step,
    and its state dict round trip (the master slices come back exactly, the parameters follow)."""
    from engine.parallel.data_parallel import FlatShard, ZeroAdamW

    model = _bf16_toy(0)  # the same on both ranks
    group = dist.new_group(list(range(world)))
    opt = ZeroAdamW([{"params": list(model.parameters()), "weight_decay": 0.0, "dp_group": group}], 1e-2,
                    (0.9, 0.999), 1e-8)
    sent = []
    real = dist.all_gather

    def recording(parts, tensor, group=None, async_op=False):
        sent.append((tensor.dtype, [t.dtype for t in parts]))
        return real(parts, tensor, group=group, async_op=async_op)

    dist.all_gather = recording
    try:
        for p in model.parameters():
            p.main_grad.fill_(1.0)
        opt.step()
        shard: FlatShard = opt.shards[0]
        gathered = shard.gather(opt.param_groups[0]["params"][0])
    finally:
        dist.all_gather = real
    master = opt.param_groups[0]["params"][0]
    state, saved = opt.state_dict(), master.detach().clone()
    assert "masters" in state
    with torch.no_grad():
        master.add_(1.0)
        for p in model.parameters():
            p.zero_()
    opt.load_state_dict(state)
    assert torch.equal(master.detach(), saved)
    return {"sent": sent, "gathered": gathered.dtype, "shard_dtype": shard.dtype,
            "params": [p.detach().clone() for p in model.parameters()],
            "master": opt.param_groups[0]["params"][0].detach().clone(), "start": shard.start}


def test_zero1_all_gathers_bf16_parameters():
    ranks = run_distributed(_zero_gather_dtype, 2, timeout=120)
    for r in ranks:
        assert r["shard_dtype"] == torch.bfloat16 and r["gathered"] == torch.bfloat16
        assert r["sent"] and all(d == torch.bfloat16 and set(parts) == {torch.bfloat16} for d, parts in r["sent"])
    masters = torch.cat([r["master"] for r in ranks])  # the two slices, in order
    off = 0
    for i, p in enumerate(ranks[0]["params"]):
        assert torch.equal(ranks[1]["params"][i], p)
        assert torch.equal(p, masters[off:off + p.numel()].view_as(p).to(torch.bfloat16))
        off += p.numel()


# ----------------------------------------------------------------------------- the tiny preset


def _train_inprocess(opts: list[str]):
    from engine.config import load_config
    from engine.trainer import Trainer

    trainer = Trainer(load_config(CONFIG, opts))
    return trainer, trainer.train()


def test_bf16_tracks_fp32_over_100_steps(synthetic_data, tmp_path):
    import time

    out = {}
    for name, extra in (("fp32", {}), ("bf16", BF16)):
        t0 = time.perf_counter()
        trainer, hist = _train_inprocess(tiny_overrides(synthetic_data, str(tmp_path / name),
                                                        **{"train.steps": 100, **extra}))
        out[name] = [h["loss"] for h in hist]
        params = list(trainer.runner.model.parameters())
        assert {p.dtype for p in params if p.ndim >= 2} == ({torch.bfloat16} if extra else {torch.float32}), name
        assert {p.dtype for p in params if p.ndim < 2} == {torch.float32}, name  # norm gains and biases
        print(f"{name}: {time.perf_counter() - t0:.1f} s, first loss {out[name][0]:.4f}, final loss {out[name][-1]:.4f}")
    f32, b16 = (sum(v[-10:]) / 10 for v in (out["fp32"], out["bf16"]))  # the final loss, over the last 10 steps
    rel = abs(b16 - f32) / f32
    print(f"final loss (mean of the last 10 steps) fp32 {f32:.5f} bf16 {b16:.5f} relative difference {rel:.2e}; "
          f"last step fp32 {out['fp32'][-1]:.5f} bf16 {out['bf16'][-1]:.5f}")
    assert len(out["bf16"]) == 100 and out["bf16"][-1] < 0.8 * out["bf16"][0]
    assert rel <= 0.03


def full_masters(runner) -> dict[str, torch.Tensor]:
    """Collective: every parameter's fp32 master, full, on every rank (no tensor parallelism here)."""
    from engine.optim import MasterAdamW
    from engine.parallel.data_parallel import ZeroAdamW

    names = {id(p): n for n, p in runner.model.named_parameters()}
    opt = runner.optimizer
    if isinstance(opt, MasterAdamW):
        return {names[id(p)]: m.detach().clone() for p, m in zip(opt.params, opt.masters)}
    assert isinstance(opt, ZeroAdamW)
    out = {}
    for shard, group in zip(opt.shards, opt.param_groups):
        local = group["params"][0].detach()
        parts = [local]
        if shard.group is not None:
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size(shard.group))]
            dist.all_gather(parts, local.contiguous(), group=shard.group)
        flat, off = torch.cat(parts), 0
        for p in shard.params:
            out[names[id(p)]] = flat[off:off + p.numel()].view_as(p).clone()
            off += p.numel()
    return out


def train_and_resume(rank: int, world: int, opts: list[str], resume_from: str = "") -> dict:
    """Train ``STEPS`` steps saving at ``SAVE_AT`` (masters recorded there), then a fresh trainer
    resumes from that checkpoint and finishes. ``resume_from``: only resume, from that checkpoint."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from engine.config import load_config
    from engine.trainer import Trainer

    def row(h):
        return h["loss"], h["grad_norm"], h["lr"]

    out: dict = {}
    run_dir = [o.split("=", 1)[1] for o in opts if o.startswith("run.dir=")][-1]
    if not resume_from:
        trainer = Trainer(load_config(CONFIG, opts))
        from conftest import record_at_save

        record_at_save(trainer, SAVE_AT, lambda: out.__setitem__("saved_masters", full_masters(trainer.runner)))
        out["history"] = [row(h) for h in trainer.train()]
        resume_from = os.path.join(run_dir, "checkpoints", f"step_{SAVE_AT:08d}")
    again = Trainer(load_config(CONFIG, opts + [f"run.dir={run_dir}-resumed", f"train.resume={resume_from}"]))
    out["start"] = again.step
    out["loaded_masters"] = full_masters(again.runner)
    out["resumed"] = [row(h) for h in again.train()]
    out["param_dtypes"] = sorted({str(p.dtype) for p in again.runner.model.parameters()})
    out["optimizer"] = type(again.runner.optimizer).__name__
    return out


def _opts(data: str, run_dir: str, **extra) -> list[str]:
    return tiny_overrides(data, run_dir, **{"train.steps": STEPS, "train.save_interval": SAVE_AT, **BF16, **extra})


@pytest.fixture(scope="module")
def one_process(synthetic_data, tmp_path_factory):
    return train_and_resume(0, 1, _opts(synthetic_data, str(tmp_path_factory.mktemp("bf16_w1") / "run")))


@pytest.fixture(scope="module")
def dp2_zero1(synthetic_data, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("bf16_dp2") / "run")
    ranks = run_distributed(train_and_resume, 2, _opts(synthetic_data, run, **{"parallel.zero1": "true"}),
                            timeout=300)
    return {"ranks": ranks, "checkpoint": os.path.join(run, "checkpoints", f"step_{SAVE_AT:08d}")}


def _assert_masters_equal(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    for n, t in want.items():
        assert t.dtype == torch.float32 and torch.equal(got[n], t), f"{what}: master of {n}"


def test_bf16_resume_is_exact_in_one_process(one_process):
    r = one_process
    assert r["param_dtypes"] == ["torch.bfloat16", "torch.float32"] and r["optimizer"] == "MasterAdamW"
    assert r["start"] == SAVE_AT and len(r["resumed"]) == STEPS - SAVE_AT
    assert r["resumed"] == r["history"][SAVE_AT:]  # losses, grad norms and lr: bitwise
    _assert_masters_equal(r["loaded_masters"], r["saved_masters"], "one process")


def test_bf16_resume_is_exact_with_dp2_zero1(dp2_zero1):
    ranks = dp2_zero1["ranks"]
    for r in ranks:
        assert r["param_dtypes"] == ["torch.bfloat16", "torch.float32"] and r["optimizer"] == "ZeroAdamW"
        assert r["start"] == SAVE_AT
        assert r["history"] == ranks[0]["history"]
        assert r["resumed"] == r["history"][SAVE_AT:]
        _assert_masters_equal(r["loaded_masters"], r["saved_masters"], "dp2 zero1")


def test_bf16_dp2_zero1_checkpoint_reshards_to_one_process(dp2_zero1, synthetic_data, tmp_path):
    """The dp2 ZeRO-1 masters load bitwise into one process (no ZeRO), which then continues the
    dp2 curve to bf16 tolerance."""
    dp2 = dp2_zero1["ranks"][0]
    r = train_and_resume(0, 1, _opts(synthetic_data, str(tmp_path / "w1")), resume_from=dp2_zero1["checkpoint"])
    assert r["start"] == SAVE_AT and r["optimizer"] == "MasterAdamW"
    _assert_masters_equal(r["loaded_masters"], dp2["saved_masters"], "dp2 -> one process")
    for (l1, _, lr1), (l0, _, lr0) in zip(r["resumed"], dp2["history"][SAVE_AT:]):
        assert abs(l1 - l0) <= DP2_TOL * abs(l0) and lr1 == lr0


def test_bf16_dp2_zero1_follows_one_process(dp2_zero1, one_process):
    got, want = dp2_zero1["ranks"][0]["history"], one_process["history"]
    assert len(got) == len(want) == STEPS
    rel = [abs(a[0] - b[0]) / abs(b[0]) for a, b in zip(got, want)]
    rel_norm = [abs(a[1] - b[1]) / abs(b[1]) for a, b in zip(got, want)]
    print(f"dp2+zero1 vs one process (bf16): max relative loss difference {max(rel):.2e}, "
          f"grad norm {max(rel_norm):.2e}")
    assert max(rel) <= DP2_TOL
    assert all(a[2] == b[2] for a, b in zip(got, want))
