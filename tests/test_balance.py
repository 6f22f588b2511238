"""Balancer core: coverage, packing limit, determinism, quality vs naive, errors, simulator CLI."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from engine.balance import Assignment, CostModel, Layout, SampleShape, balance, fit_llm, fit_vit, naive
from engine.balance.cost import fit_exchange
from engine.balance.layout import sample_arrays
from engine.balance.packing import pack_first_fit_decreasing, pack_next_fit
from engine.balance.partition import lpt, refine
from engine.balance.workload import WorkloadConfig, draw_workload, image_tiles, read_samples

ROOT = Path(__file__).resolve().parents[1]


def _sim():
    spec = importlib.util.spec_from_file_location("simulate_balance", ROOT / "tools" / "simulate_balance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _verify(a: Assignment, samples: list[SampleShape], layout: Layout) -> None:
    """Independent check: every sample once in the LLM, every tile once in the ViT, rows within the limit."""
    placed = sorted(s for d in range(layout.llm_dp) for s in a.dp_samples(d))
    assert placed == list(range(len(samples)))
    for mbs in a.llm:
        assert len(mbs) == layout.microbatches
        for mb in mbs:
            assert mb, "empty microbatch"
            for row in mb:
                assert sum(samples[s].llm_tokens(layout.num_image_token) for s in row) <= layout.max_packed_tokens
    tiles = sorted(p for v in range(layout.vit_ranks) for p in a.vit_tiles(v))
    assert tiles == [(s, t) for s, x in enumerate(samples) for t in range(x.tiles)]
    a.check(*sample_arrays(samples, layout), layout)


@pytest.mark.parametrize("layout", [
    Layout(world=16, llm_tp=2, llm_pp=2, vit_tp=2, microbatches=4),
    Layout(world=8, llm_tp=1, llm_pp=1, vit_tp=1, microbatches=2, max_packed_tokens=4096),
    Layout(world=12, llm_tp=3, llm_pp=1, vit_tp=4, microbatches=3, max_packed_tokens=8192),
])
def test_every_sample_and_tile_placed_once_rows_within_limit(layout):
    cfg = WorkloadConfig(max_tokens=layout.max_packed_tokens, frames=(8, 12))
    samples = draw_workload(160, cfg, seed=3)
    for a in (balance(samples, layout, seed=1), naive(samples, layout)):
        _verify(a, samples, layout)


def test_vit_ranks_get_floor_or_ceil_of_tiles_in_contiguous_ranges():
    layout = Layout(world=32, llm_tp=4, microbatches=2)
    samples = draw_workload(96, seed=5)
    a = balance(samples, layout)
    total = sum(s.tiles for s in samples)
    per_rank = [sum(b - e for _, e, b in ranges) for ranges in a.vit]
    assert set(per_rank) <= {total // 32, -(-total // 32)}
    for ranges in a.vit:  # ranges are non-empty, and one sample's range on a rank is contiguous
        assert all(b > e for _, e, b in ranges)
        assert len({s for s, _, _ in ranges}) == len(ranges)


def test_transfers_route_every_tile_to_its_dp_rank():
    layout = Layout(world=16, llm_tp=4, microbatches=2)
    samples = draw_workload(64, seed=8)
    a = balance(samples, layout)
    where = a.locations()
    moved = 0
    for (v, d), ranges in a.transfers().items():
        assert all(where[s][0] == d for s, _, _ in ranges)
        if d not in layout.vit_groups(v):
            moved += sum(b - e for _, e, b in ranges)
    assert sum(b - e for ranges in a.transfers().values() for _, e, b in ranges) == sum(x.tiles for x in samples)
    assert moved * layout.num_image_token * CostModel().exchange_bytes_per_token == a.exchange_bytes


def test_identical_groups_need_no_exchange():
    layout = Layout(world=16, llm_tp=4, microbatches=2)  # 4 dp groups of 4 ViT ranks
    samples = [SampleShape(4, 100, (4,))] * 32
    a = balance(samples, layout)
    assert a.exchange_bytes == 0 and a.exchange_time == 0.0
    assert a.vit_imbalance == 1.0 and a.llm_imbalance == pytest.approx(1.0)


def test_deterministic_for_a_seed():
    layout = Layout(world=16, llm_tp=2, llm_pp=2, microbatches=4)
    samples = draw_workload(200, seed=11)
    first = balance(samples, layout, seed=7).to_dict()
    assert balance(samples, layout, seed=7).to_dict() == first
    # equal-cost samples are ordered by the seed: another seed permutes them, with the same quality
    same = [SampleShape(2, 300)] * 64
    a, b = balance(same, layout, seed=1), balance(same, layout, seed=2)
    assert a.to_dict()["llm"] != b.to_dict()["llm"]
    assert a.llm_time == pytest.approx(b.llm_time)


def test_assignment_round_trips_through_json():
    layout = Layout(world=8, llm_tp=2, llm_pp=2, microbatches=2)
    samples = draw_workload(40, seed=2)
    a = balance(samples, layout)
    b = Assignment.from_dict(json.loads(json.dumps(a.to_dict())))
    assert b == a and b.step_time == a.step_time
    with pytest.raises(ValueError, match="missing"):
        Assignment.from_dict({"method": "x"})


def test_check_rejects_a_duplicated_sample():
    layout = Layout(world=4, llm_tp=2, microbatches=1)
    samples = draw_workload(20, seed=0)
    d = balance(samples, layout).to_dict()
    d["llm"][0][0].append([d["llm"][1][0][0][0]])  # the same sample again, in a row of its own
    with pytest.raises(ValueError, match="placed 2 times"):
        Assignment.from_dict(d).check(*sample_arrays(samples, layout), layout)


def test_skewed_workload_balanced_beats_naive():
    # the loader yields all videos first, then short text: the naive contiguous split is badly skewed
    samples = [SampleShape(32, 400, (1,) * 32)] * 64 + [SampleShape(0, 600)] * 192
    layout = Layout(world=32, llm_tp=4, microbatches=4)
    n, b = naive(samples, layout), balance(samples, layout)
    assert n.llm_imbalance > 1.5 and n.vit_imbalance > 3
    assert b.llm_imbalance <= 1.05 and b.vit_imbalance <= 1.05
    assert b.step_time < n.step_time / 1.5


def test_pipeline_bubble_counts_the_largest_microbatch():
    # with pp > 1 one 16k-token document must not sit on a rank that also has an average share
    samples = [SampleShape(0, 16000)] + [SampleShape(1, 900, (1,))] * 255
    layout = Layout(world=32, llm_tp=2, llm_pp=2, microbatches=8)
    a = balance(samples, layout)
    d = a.locations()[0][0]
    mb = np.array(a.microbatch_time)
    assert mb[d].sum() < np.median(mb.sum(axis=1))  # the rank holding it does less in total
    assert a.llm_imbalance < 1.02


def test_default_mix_at_64_ranks_meets_goals():
    layout = Layout(world=64, llm_tp=8, microbatches=4)  # 64 ViT ranks, 8 LLM dp ranks
    rng = np.random.default_rng(0)
    steps = [draw_workload(128, seed=rng) for _ in range(3)]  # 16 samples per dp rank
    naive_t, bal_t = 0.0, 0.0
    for samples in steps:
        b, n = balance(samples, layout), naive(samples, layout)
        assert b.vit_imbalance <= 1.05 and b.llm_imbalance <= 1.05
        naive_t += n.step_time
        bal_t += b.step_time
    assert naive_t / bal_t >= 1.3


def test_overlong_sample_raises_before_balancing():
    samples = [SampleShape(2, 100)] * 7 + [SampleShape(40, 10, (40,))]
    layout = Layout(world=2, microbatches=1, max_packed_tokens=4096)
    for fn in (balance, naive):
        with pytest.raises(ValueError, match=r"sample 7 has 10250 LLM tokens.*max_packed_tokens=4096"):
            fn(samples, layout)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(world=12, llm_tp=8), "llm_tp"),
    (dict(world=8, vit_tp=3), "vit_tp=3"),
    (dict(world=8, microbatches=0), "microbatches=0"),
])
def test_bad_layout_is_named(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Layout(**kwargs)


def test_bad_samples_are_named():
    with pytest.raises(ValueError, match="tiles=-1"):
        SampleShape(-1, 5)
    with pytest.raises(ValueError, match="sum to 3 tiles"):
        SampleShape(4, 5, (1, 2))
    with pytest.raises(ValueError, match="cannot fill"):
        balance([SampleShape(1, 5)] * 3, Layout(world=4, microbatches=1))


# ---------------------------------------------------------------------- parts


def test_refine_reaches_the_optimum_lpt_misses():
    costs = np.array([3.0, 3.0, 2.0, 2.0, 2.0])
    first = lpt(costs, 2, np.arange(5))
    assert np.bincount(first, weights=costs).max() == 7.0
    best = refine(costs, first, 2)
    assert np.bincount(best, weights=costs).max() == 6.0


def test_lpt_and_refine_keep_minimum_counts():
    rng = np.random.default_rng(0)
    costs = np.sort(rng.lognormal(0, 1.5, 64))[::-1].copy()
    costs[:4] *= 50  # four huge items would leave bins nearly empty without the constraint
    a = refine(costs, lpt(costs, 8, np.arange(64), min_count=6), 8, min_count=6)
    assert np.bincount(a, minlength=8).min() >= 6


def test_packing_respects_capacity_and_order():
    tokens = [700, 300, 500, 500, 200, 800]
    ffd = pack_first_fit_decreasing(range(6), tokens, 1000)
    assert sorted(s for r in ffd for s in r) == list(range(6)) and len(ffd) == 3
    assert all(sum(tokens[s] for s in r) <= 1000 for r in ffd)
    assert pack_next_fit(range(6), tokens, 1000) == [[0, 1], [2, 3], [4, 5]]
    assert pack_next_fit(range(6), tokens, 999) == [[0], [1, 2], [3, 4], [5]]
    with pytest.raises(ValueError, match="sample 5 has 800 tokens"):
        pack_next_fit(range(6), tokens, 750)


def test_cost_model_json_round_trip_and_errors(tmp_path):
    c = CostModel(vit_per_tile=1e-3, llm_per_row=2e-4)
    c.save(tmp_path / "c.json")
    assert CostModel.load(tmp_path / "c.json") == c
    (tmp_path / "bad.json").write_text('{"vit_per_tiel": 1.0}')
    with pytest.raises(ValueError, match="vit_per_tiel"):
        CostModel.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="llm_per_token=-1"):
        CostModel(llm_per_token=-1)


def test_fits_recover_coefficients():
    rng = np.random.default_rng(0)
    rows = [rng.integers(100, 8000, rng.integers(1, 5)).tolist() for _ in range(40)]
    true = dict(llm_per_token=2e-5, llm_per_token_sq=3e-10, llm_per_row=1e-3)
    meas = [(r, true["llm_per_token"] * sum(r) + true["llm_per_token_sq"] * sum(x * x for x in r)
             + true["llm_per_row"]) for r in rows]
    fit = fit_llm(meas)
    for k, v in true.items():
        assert fit[k] == pytest.approx(v, rel=1e-6)
    vit = fit_vit([(t, 0.004 * t + 0.01) for t in (1, 4, 9, 13)])
    assert vit["vit_per_tile"] == pytest.approx(0.004) and vit["vit_fixed"] == pytest.approx(0.01)
    ex = fit_exchange([(b, 1e-5 + b / 2e10) for b in (1e3, 1e6, 1e8)])
    assert ex["exchange_bandwidth"] == pytest.approx(2e10) and ex["exchange_latency"] == pytest.approx(1e-5)


def test_llm_fit_stays_non_negative():
    # time falls with length: the unconstrained slope is negative, the fit must clamp it to zero
    meas = [([1000], 1.0), ([2000], 0.9), ([4000], 0.8)]
    fit = fit_llm(meas)
    assert min(fit.values()) >= 0 and fit["llm_per_token"] == 0.0 and fit["llm_per_token_sq"] == 0.0
    assert fit["llm_per_row"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="measurement 0"):
        fit_llm([([0], 1.0)])


def test_internvl_tiling_rule():
    w = np.array([448, 896, 1000, 3000, 300, 1344])
    h = np.array([448, 896, 750, 300, 900, 1344])
    # square 896: 2x2 beats 1x1 (area > half of 4 tiles) but not 3x3; 4:3 -> 4x3; 10:1 -> 10x1; 1:3 -> 1x3;
    # square 1344: 3x3 (area > half of 9 tiles)
    assert image_tiles(w, h, 12).tolist() == [1, 5, 13, 11, 4, 10]
    assert image_tiles(w, h, 12, use_thumbnail=False).tolist() == [1, 4, 12, 10, 3, 9]
    assert image_tiles(w[3:4], h[3:4], 6).tolist() == [7]  # 6x1 is the widest grid of at most 6 tiles


def test_workload_token_mix():
    samples = draw_workload(4000, seed=0)
    tokens = np.array([s.llm_tokens() for s in samples])
    text = np.array([s.tiles == 0 for s in samples])
    assert tokens[text].sum() / tokens.sum() == pytest.approx(0.25, abs=0.03)
    assert max(s.tiles for s in samples if len(s.images) == 1) == 13
    assert {s.tiles for s in samples if s.images and set(s.images) == {1} and s.tiles >= 8} <= set(range(8, 33))
    assert np.percentile(tokens, 95) / np.percentile(tokens, 5) > 10


# ---------------------------------------------------------------------- simulator


def _jsonl(path: Path) -> Path:
    lines = [json.dumps({"tiles": 1 + i % 7, "text_tokens": 100 + 37 * i}) for i in range(40)]
    lines[3] = "{not json"
    lines[9] = json.dumps({"tiles": 2})
    lines[17] = json.dumps({"tiles": 3, "text_tokens": 5, "images": [1, 1]})
    lines[25] = json.dumps({"tiles": 100, "text_tokens": 5})  # 25605 tokens > 16384
    lines.insert(30, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_samples_counts_bad_lines(tmp_path):
    samples, bad = read_samples(_jsonl(tmp_path / "w.jsonl"), max_tokens=16384)
    assert len(samples) == 36 and len(bad) == 4
    assert [m.split(":")[1] for m in bad] == ["4", "10", "18", "26"]
    assert "text_tokens" in bad[1] and "sum to 2 tiles" in bad[2] and "16384" in bad[3]


def test_cli_json_from_samples_file(tmp_path, capsys):
    sim = _sim()
    rc = sim.main(["--samples", str(_jsonl(tmp_path / "w.jsonl")), "--world", "8", "--llm-tp", "2",
                   "--microbatches", "2", "--global-batch", "16", "--steps", "3", "--json"])
    assert rc == 0
    out, err = capsys.readouterr()
    res = json.loads(out)
    for k in ("naive", "balanced"):
        assert {"vit_imbalance", "llm_imbalance", "step_time"} <= set(res[k])
    assert res["speedup"] == pytest.approx(res["naive"]["step_time"] / res["balanced"]["step_time"])
    assert res["balancer_ms"] > 0 and res["workload"]["skipped_lines"] == 4
    assert "w.jsonl:4:" in err


def test_cli_table_and_plot(tmp_path, capsys):
    sim = _sim()
    png = tmp_path / "h.png"
    assert sim.main(["--world", "16", "--llm-tp", "2", "--llm-pp", "2", "--global-batch", "64", "--steps", "2",
                     "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "LLM imbalance" in out and "speed-up" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiling_agrees_with_the_data_pipeline():
    from engine.data.images import num_tiles

    rng = np.random.default_rng(0)
    w = np.concatenate([rng.integers(50, 5000, 300), 448 * rng.integers(1, 5, 100)])
    h = np.concatenate([rng.integers(50, 5000, 300), 448 * rng.integers(1, 5, 100)])
    for max_num in (12, 6, 4, 3, 1):
        ours = image_tiles(w, h, max_num).tolist()
        assert ours == [num_tiles(int(a), int(b), 1, max_num, 448, True) for a, b in zip(w, h)]


def test_layout_from_engine_config():
    from engine.config import load_config

    cfg = load_config(None, ["parallel.llm.tp=2", "parallel.llm.pp=2", "parallel.llm.microbatches=4"])
    lay = Layout.from_config(cfg, world=8)
    assert (lay.llm_dp, lay.microbatches, lay.max_packed_tokens) == (2, 4, cfg.data.max_packed_tokens)
    assert lay.num_image_token == cfg.model.num_image_token


def _padded_tokens(a: Assignment, tokens: np.ndarray) -> np.ndarray:
    """Per dp rank: rows x longest row, summed over microbatches (a microbatch is padded to its longest row)."""
    return np.array([sum(len(mb) * max((int(tokens[row].sum()) for row in mb), default=0) for mb in mbs)
                     for mbs in a.llm])


def test_without_pipeline_microbatches_take_whole_rows_of_similar_length():
    layout = Layout(world=8, microbatches=2, max_packed_tokens=4096)
    samples = draw_workload(96, WorkloadConfig(max_tokens=4096, frames=(8, 12)), seed=11)
    _, tokens = sample_arrays(samples, layout)
    b, n = balance(samples, layout, seed=2), naive(samples, layout)
    _verify(b, samples, layout)
    for mbs in b.llm:  # rows of a microbatch are at least as long as any row of a later one
        lengths = [sorted((int(tokens[r].sum()) for r in mb), reverse=True) for mb in mbs]
        assert all(lengths[k][-1] >= lengths[k + 1][0] for k in range(len(lengths) - 1))
        assert abs(len(mbs[0]) - len(mbs[-1])) <= 1
    pb, pn = _padded_tokens(b, tokens), _padded_tokens(n, tokens)
    assert pb.max() < pn.max() and pb.sum() <= pn.sum()
