"""Tensor, sequence and head parallelism on CPU gloo: parity with the single-process model.

Each world size is spawned once (module fixtures); every rank builds the single-process model
from a seed, computes its loss and gradients, then the parallel model's, and returns the
differences. The tests assert on them per layout.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed, run_jobs
from engine.config import ConfigError, config_from_dict
from engine.data.batch import IGNORE_INDEX, PackedBatch
from engine.models.internvl import InternVLModel
from engine.models.loss import loss_weights
from engine.data.v2pe import v2pe_positions_1d

# name -> (preset, model overrides, parallel section[, activation checkpointing])
LAYOUTS_2 = {
    "llm_tp2": ("tiny", {}, {"llm": {"tp": 2}}),
    "llm_tp2_sp": ("tiny", {}, {"llm": {"tp": 2, "sp": True}}),
    "llm_hp2": ("tiny", {}, {"llm": {"hp": 2}}),
    "vit_tp2_head_padding": ("tiny-6b-vit", {}, {"vit": {"tp": 2}}),
    "vit_hp2": ("tiny", {}, {"vit": {"hp": 2}}),
    "vit_tp2_sp_qknorm": ("tiny-6b-vit", {}, {"vit": {"tp": 2, "sp": True}}),
}
LAYOUTS_4 = {
    "llm_tp4_kv_replicated_vocab_padded": ("tiny", {"llm": {"vocab_size": 510}}, {"llm": {"tp": 4}}),
    "vit_tp4_sp_head_padding": ("tiny-6b-vit", {}, {"vit": {"tp": 4, "sp": True}}),
    "llm_tp2_sp_hp2_vit_tp2_sp_hp2_checkpointing": ("tiny", {}, {"llm": {"tp": 2, "sp": True, "hp": 2},
                                                                 "vit": {"tp": 2, "sp": True, "hp": 2}}, True),
    "llm_hp4_kv_expanded_vit_hp4": ("tiny", {}, {"llm": {"hp": 4}, "vit": {"hp": 4}}),
}


def make_config(preset: str, model: dict, parallel: dict):
    return config_from_dict({"model": {"preset": preset, **model}, "parallel": parallel})


def make_batch(cfg, seed: int = 0) -> PackedBatch:
    """Two rows of 48 tokens, four samples, three tiles (one 1-tile and one 2-tile image with
    different V2PE deltas), a padding segment, square loss weights."""
    m = cfg.model
    g = torch.Generator().manual_seed(seed)
    T = m.num_image_token
    ctx, start, end = m.img_context_token_id, m.img_start_token_id, m.img_end_token_id

    def text(n):
        return torch.randint(8, m.llm.vocab_size, (n,), generator=g).tolist()

    samples = [  # (ids, deltas) per row
        [(text(3) + [start] + [ctx] * T + [end] + text(6), [0.25]), (text(15), [])],
        [(text(2) + [start] + [ctx] * (2 * T) + [end] + text(5), [1.0]), (text(7), [])],
    ]
    S = 48
    ids, tgt, pos, cu = [], [], [], [0]
    for row in samples:
        r_ids, r_tgt, r_pos = [], [], []
        for s, deltas in row:
            r_ids += s
            r_pos += v2pe_positions_1d(s, ctx, deltas)
            r_tgt += [s[i + 1] if s[i + 1] >= 8 else IGNORE_INDEX for i in range(len(s) - 1)] + [IGNORE_INDEX]
            cu.append(len(ids) + len(r_ids))
        pad = S - len(r_ids)
        if pad:
            r_ids, r_tgt, r_pos = r_ids + [0] * pad, r_tgt + [IGNORE_INDEX] * pad, r_pos + [0.0] * pad
            cu.append(len(ids) + S)
        ids += r_ids
        tgt += r_tgt
        pos += r_pos
    input_ids = torch.tensor(ids).view(2, S)
    targets = torch.tensor(tgt).view(2, S)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    size = m.vision.image_size
    return PackedBatch(input_ids=input_ids, targets=targets, loss_weights=loss_weights(targets, cu_seqlens, "square"),
                       position_ids=torch.tensor(pos, dtype=torch.float32).view(2, S), cu_seqlens=cu_seqlens,
                       pixel_values=torch.randn(3, 3, size, size, generator=g), image_tiles=torch.tensor([1, 2]),
                       num_samples=4)


def _padding_nonzero(model) -> tuple[int, int]:
    """(nonzero padded weights, nonzero padded grads) of this rank's shards."""
    import torch.distributed as dist

    from engine.parallel.tensor_parallel import shard_info

    w_bad = g_bad = 0
    for p in model.parameters():
        info = shard_info(p)
        if info.dim is None or info.padded == info.full:
            continue
        tp = info.padded // p.shape[info.dim] * info.replicas
        rank = dist.get_rank() % tp  # tp varies fastest in both grids
        a, b = info.local_range(rank, tp)
        if b > info.full:
            lo = max(0, info.full - a)
            w_bad += int(p.detach().narrow(info.dim, lo, b - a - lo).count_nonzero())
            if p.grad is not None:
                g_bad += int(p.grad.narrow(info.dim, lo, b - a - lo).count_nonzero())
    return w_bad, g_bad


ZERO_GRADIENT = re.compile(r"vision_model\.layers\.\d+\.attn\.k_proj\.bias")


def _parity(rank: int, world: int, preset: str, model_over: dict, parallel: dict, checkpointing: bool = False) -> dict:
    from engine.parallel.parallelize import (gather_full_state_dict, parallel_loss_terms, parallelize_model,
                                             reduce_model_parallel_grads)
    from engine.parallel.tensor_parallel import gather_full
    from engine.parallel.topology import build_topology

    cfg = make_config(preset, model_over, parallel)
    torch.manual_seed(0)
    ref = InternVLModel(cfg.model)
    par = copy.deepcopy(ref)
    batch = make_batch(cfg)
    ce, w = ref.loss_terms(batch)
    (ce / w).backward()

    topo = build_topology(cfg, rank, world)
    par, layout = parallelize_model(par, topo, cfg)
    par.set_activation_checkpointing(checkpointing)
    weights = gather_full_state_dict(par, topo)
    ce_p, w_p = parallel_loss_terms(par, layout, batch)
    (ce_p / w_p).backward()
    grads = gather_full_state_dict(par, topo, grads=True)
    reduce_model_parallel_grads(par, topo)  # in place: the grads are now complete shards
    reduced = {n: gather_full(p.grad, p.shard_info, (topo.llm if p.shard_info.grid == "llm" else topo.vit).group("tp"))
               for n, p in par.named_parameters()}

    ref_params = dict(ref.named_parameters())
    model_scale = max(p.grad.abs().max().item() for p in ref_params.values())
    worst, worst_name = 0.0, ""
    for name, p in ref_params.items():
        # Softmax ignores a per-query shift of the logits, so the key bias of an attention without
        # rotary has an exact gradient of 0 (both sides hold ~1e-13 of rounding): compare it
        # against the model's largest gradient instead of its own.
        scale = model_scale if ZERO_GRADIENT.fullmatch(name) else p.grad.abs().max().item()
        err = (grads[name] - p.grad).abs().max().item() / max(scale, 1e-30)
        if err > worst:
            worst, worst_name = err, name
    out = {
        "loss_rel": abs(ce_p.item() - ce.item()) / abs(ce.item()),
        "weight_sum_rel": abs(w_p.item() - w.item()) / w.item(),
        "grad_rel": worst, "grad_worst": worst_name,
        "names_match": sorted(grads) == sorted(ref_params),
        "reduced_equal_summed": all(torch.equal(reduced[n], grads[n]) for n in grads),
        "weights_roundtrip": max((weights[n] - p).abs().max().item() for n, p in ref_params.items()),
        "nonzero_grads": sum(int(p.grad.count_nonzero() > 0) for p in ref_params.values()),
    }
    if not layout.llm.sp and layout.llm.grid.size("hp") == 1:  # InternVLModel.loss_terms still applies
        with torch.no_grad():
            out["model_loss_terms_rel"] = abs(par.loss_terms(batch)[0].item() - ce.item()) / abs(ce.item())
    torch.optim.AdamW(par.parameters(), lr=1e-2, weight_decay=0.1).step()
    out["padding_nonzero"] = _padding_nonzero(par)
    out["padded_params"] = sum(1 for p in par.parameters()
                               if getattr(p, "shard_info", None) and p.shard_info.padded > p.shard_info.full)
    return out


def _mappings(rank: int, world: int) -> dict:
    """Each mapping against the single-process meaning of "every rank backpropagates its own
    loss": the gradients are those of the sum of the ranks' losses."""
    from engine.parallel import mappings as M

    g = torch.Generator().manual_seed(1)
    X = [torch.randn(2, 8, 8, generator=g) for _ in range(world)]  # one per rank
    C = [torch.randn(2, 8, 8, generator=g) for _ in range(world)]  # upstream grads per rank
    c, s = lambda t: t.chunk(world, -1)[rank], lambda t: t.chunk(world, 1)[rank]
    errs = {}

    def check(name, fn, x, want_y, grad_out, want_grad):
        x = x.clone().requires_grad_()
        y = fn(x)
        y.backward(grad_out)
        errs[name] = max((y - want_y).abs().max().item(), (x.grad - want_grad).abs().max().item())

    tot_c, full = sum(C), X[0]
    check("copy_to_region", lambda x: M.copy_to_region(x, dist.group.WORLD), full, full, C[rank], tot_c)
    check("reduce_from_region", lambda x: M.reduce_from_region(x, dist.group.WORLD), X[rank], sum(X), C[0], C[0])
    check("scatter_to_region", lambda x: M.scatter_to_region(x, dist.group.WORLD), full, c(full), c(C[rank]),
          torch.cat([t.chunk(world, -1)[r] for r, t in enumerate(C)], -1))
    check("gather_from_region", lambda x: M.gather_from_region(x, dist.group.WORLD), c(full), full, C[0], c(C[0]))
    check("scatter_to_sequence", lambda x: M.scatter_to_sequence(x, dist.group.WORLD), full, s(full), s(C[rank]),
          torch.cat([t.chunk(world, 1)[r] for r, t in enumerate(C)], 1))
    zeros = torch.zeros_like(full)
    check("split_to_sequence", lambda x: M.split_to_sequence(x, dist.group.WORLD), full, s(full), s(C[rank]),
          torch.cat([s(C[rank]) if r == rank else zeros.chunk(world, 1)[r] for r in range(world)], 1))
    check("gather_from_sequence", lambda x: M.gather_from_sequence(x, dist.group.WORLD), s(full), full, C[rank], s(tot_c))
    check("gather_from_sequence_split", lambda x: M.gather_from_sequence(x, dist.group.WORLD, reduce_grads=False),
          s(full), full, C[0], s(C[0]))
    check("reduce_scatter_to_sequence", lambda x: M.reduce_scatter_to_sequence(x, dist.group.WORLD), X[rank], s(sum(X)),
          s(C[rank]), torch.cat([t.chunk(world, 1)[r] for r, t in enumerate(C)], 1))
    Q, G = torch.randn(2, 8, 2 * world, 4, generator=g), torch.randn(2, 8, 2 * world, 4, generator=g)
    heads = lambda t: t.chunk(world, 2)[rank]
    check("all_to_all", lambda x: M.all_to_all(x, dist.group.WORLD, 2, 1), s(Q), heads(Q), heads(G), s(G))
    # all_reduce_stat: L = sum_r (sqrt(sum_r' |X_r'|^2) * C_r), differentiated on one process
    xs = [x.clone().requires_grad_() for x in X]
    total = sum((x ** 2).sum(-1, keepdim=True) for x in xs)
    sum((total.sqrt() * cr[..., :1]).sum() for cr in C).backward()
    check("all_reduce_stat", lambda x: M.all_reduce_stat((x ** 2).sum(-1, keepdim=True), dist.group.WORLD).sqrt(),
          X[rank], total.detach().sqrt(), C[rank][..., :1], xs[rank].grad)
    return errs


def _megatron_linears(rank: int, world: int) -> dict:
    """Our column -> row parallel pair against megatron-core's (no sequence parallelism)."""
    import torch.nn as nn
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear as MCol
    from megatron.core.tensor_parallel import RowParallelLinear as MRow

    from engine.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear, ShardInfo

    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 12), nn.Linear(12, 8)
    x = torch.randn(5, 3, 8)
    ours = nn.Sequential(ColumnParallelLinear(fc1, ShardInfo("llm", 0, 12, 12), dist.group.WORLD, input_mode="copy"),
                         RowParallelLinear(fc2, ShardInfo("llm", 1, 12, 12), ShardInfo("llm"), dist.group.WORLD))
    mcfg = ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True,
                               perform_initialization=False)
    mcol = MCol(8, 12, config=mcfg, init_method=nn.init.zeros_, bias=True, gather_output=False, tp_group=dist.group.WORLD)
    mrow = MRow(12, 8, config=mcfg, init_method=nn.init.zeros_, bias=True, input_is_parallel=True,
                skip_bias_add=False, tp_group=dist.group.WORLD)
    with torch.no_grad():
        mcol.weight.copy_(ours[0].weight), mcol.bias.copy_(ours[0].bias)
        mrow.weight.copy_(ours[1].weight), mrow.bias.copy_(ours[1].bias)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = ours(xa)
    yb = mrow(mcol(xb)[0])[0]
    ya.square().sum().backward()
    yb.square().sum().backward()
    pairs = [(ya, yb), (xa.grad, xb.grad), (ours[0].weight.grad, mcol.weight.grad),
             (ours[0].bias.grad, mcol.bias.grad), (ours[1].weight.grad, mrow.weight.grad),
             (ours[1].bias.grad, mrow.bias.grad)]
    ref = fc2(fc1(x))
    return {"vs_megatron": max((a - b).abs().max().item() for a, b in pairs),
            "vs_single": (ya - ref).abs().max().item()}


def _bad_length(rank: int, world: int) -> str:
    from engine.parallel.parallelize import parallelize_model, shard_tokens
    from engine.parallel.topology import build_topology

    cfg = make_config("tiny", {}, {"llm": {"hp": world}})
    model, layout = parallelize_model(InternVLModel(cfg.model), build_topology(cfg, rank, world), cfg)
    b = make_batch(cfg)
    b.input_ids, b.targets, b.loss_weights, b.position_ids = (t[:, :45] for t in (b.input_ids, b.targets,
                                                                                   b.loss_weights, b.position_ids))
    try:
        shard_tokens(b, layout.llm)
    except ValueError as e:
        return str(e)
    return "no error"




def _run(world: int, layouts: dict, extra: dict) -> list[dict]:
    jobs = {name: (_parity, spec) for name, spec in layouts.items()}
    jobs.update(extra)
    return run_distributed(run_jobs, world, jobs, timeout=240)


@pytest.fixture(scope="module")
def world2():
    return _run(2, LAYOUTS_2, {"mappings": (_mappings, ()), "megatron": (_megatron_linears, ()),
                               "bad_length": (_bad_length, ())})


@pytest.fixture(scope="module")
def world4():
    return _run(4, LAYOUTS_4, {"mappings": (_mappings, ())})


def _results(ranks: list[dict], name: str) -> list[dict]:
    res = [r[name] for r in ranks]
    for i, r in enumerate(res):
        assert not (isinstance(r, dict) and "error" in r), f"rank {i}: {r['error']}"
    return res


def _assert_parity(ranks, name):
    for i, r in enumerate(_results(ranks, name)):
        assert r["names_match"], f"rank {i}: parameter names differ from the single-process model"
        assert r["reduced_equal_summed"], f"rank {i}: reduce_model_parallel_grads disagrees with grad_sum"
        assert r.get("model_loss_terms_rel", 0.0) <= 1e-5, f"rank {i}: InternVLModel.loss_terms differs"
        assert r["weights_roundtrip"] == 0.0, f"rank {i}: sharded weights do not gather back exactly"
        assert r["loss_rel"] <= 1e-5, f"rank {i}: loss relative difference {r['loss_rel']:.2e}"
        assert r["weight_sum_rel"] <= 1e-6, f"rank {i}: sum(w) relative difference {r['weight_sum_rel']:.2e}"
        assert r["grad_rel"] <= 1e-5, f"rank {i}: {r['grad_worst']} gradient differs by {r['grad_rel']:.2e} (rel.)"
        assert r["nonzero_grads"] > 50, "the batch leaves most parameters without gradient"
        assert r["padding_nonzero"] == (0, 0), f"rank {i}: padded rows (weights, grads) not zero: {r['padding_nonzero']}"


@pytest.mark.parametrize("name", list(LAYOUTS_2))
def test_parity_world2(world2, name):
    _assert_parity(world2, name)


@pytest.mark.parametrize("name", list(LAYOUTS_4))
def test_parity_world4(world4, name):
    _assert_parity(world4, name)


def test_padding_is_exercised(world2, world4):
    """The head/vocab padding layouts really hold padded parameters."""
    assert all(r["padded_params"] > 0 for r in _results(world2, "vit_tp2_head_padding"))
    assert all(r["padded_params"] > 0 for r in _results(world4, "llm_tp4_kv_replicated_vocab_padded"))
    assert all(r["padded_params"] > 0 for r in _results(world4, "vit_tp4_sp_head_padding"))


@pytest.mark.parametrize("world", [2, 4])
def test_mappings(world2, world4, world):
    for i, errs in enumerate(_results(world2 if world == 2 else world4, "mappings")):
        bad = {k: v for k, v in errs.items() if v > 1e-5}
        assert len(errs) == 11 and not bad, f"rank {i}: {bad}"


def test_linears_match_megatron_core(world2):
    for r in _results(world2, "megatron"):
        assert r["vs_megatron"] <= 1e-6 and r["vs_single"] <= 1e-6, r


def test_sequence_length_must_split(world2):
    for msg in _results(world2, "bad_length"):
        assert "45" in msg and "pad_to_multiple=2" in msg, msg


@pytest.mark.parametrize("preset,parallel,needle", [
    ("tiny", {"llm": {"tp": 8}}, "parallel.llm.tp=8 must divide model.llm.num_heads=4"),
    ("tiny-6b-vit", {"vit": {"tp": 8}}, "parallel.vit.tp=8 exceeds model.vision.num_heads=5"),
    ("tiny", {"llm": {"hp": 3}}, "parallel.llm.hp=3 must divide the attention heads per tp rank"),
    ("tiny-6b-vit", {"vit": {"tp": 2, "hp": 2}}, "parallel.vit.hp=2 must divide the ViT heads per tp rank (3)"),
])
def test_bad_layout_is_rejected(preset, parallel, needle):
    from engine.parallel.parallelize import check_layout

    with pytest.raises(ConfigError) as e:
        check_layout(make_config(preset, {}, parallel))
    assert needle in str(e.value)
