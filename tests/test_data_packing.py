"""Packing samples into rows: limits, targets, weights, V2PE positions, segments, image order."""

from __future__ import annotations

import math

import pytest
import torch

from engine.data.batch import IGNORE_INDEX, Sample
from engine.data.packing import first_fit, pack_samples, sample_v2pe_deltas
from engine.data.v2pe import V2PE_DELTAS

CTX, START, END, PAD = 7, 5, 6, 0
NIT = 4  # visual tokens per tile in these tests


def make_sample(tag: int, text: int, tiles: list[int], supervised_tail: int = 3) -> Sample:
    """``text`` ordinary tokens with one image block per entry of ``tiles`` after the first token;
    the last ``supervised_tail`` tokens are supervised. Pixels hold ``tag*10 + image`` for checking order."""
    ids = [100 + tag]
    pix = []
    for k, t in enumerate(tiles):
        ids += [START] + [CTX] * (t * NIT) + [END]
        pix.append(torch.full((t, 3, 2, 2), float(tag * 10 + k)))
    ids += [20 + (tag + j) % 200 for j in range(text - 1)]
    ids = torch.tensor(ids, dtype=torch.int64)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[-supervised_tail:] = ids[-supervised_tail:]
    return Sample(input_ids=ids, labels=labels, pixel_values=torch.cat(pix) if pix else None,
                  image_tiles=list(tiles), source=f"sample{tag}.jsonl:{tag + 1}")


@pytest.fixture
def samples():
    return [make_sample(0, 10, [1]), make_sample(1, 30, []), make_sample(2, 5, [2, 1]),
            make_sample(3, 12, [3], supervised_tail=6), make_sample(4, 4, []), make_sample(5, 20, [1])]


def test_first_fit_in_order():
    assert first_fit([6, 5, 4, 3, 1], 10) == [[0, 2], [1, 3, 4]]
    assert first_fit([6, 5, 3, 1], 10) == [[0, 2, 3], [1]]
    assert first_fit([10, 10], 10) == [[0], [1]]


@pytest.mark.parametrize("mode", ["token", "sample", "square"])
def test_pack_invariants(samples, mode):
    limit = 40
    b = pack_samples(samples, limit, CTX, mode, pad_id=PAD, pad_to_multiple=8)
    B, S = b.input_ids.shape
    assert S % 8 == 0 and b.targets.shape == b.loss_weights.shape == b.position_ids.shape == (B, S)
    assert b.cu_seqlens.dtype == torch.int32 and int(b.cu_seqlens[0]) == 0 and int(b.cu_seqlens[-1]) == B * S
    assert b.num_samples == len(samples)
    flat_ids = b.input_ids.reshape(-1)
    flat_t = b.targets.reshape(-1)
    flat_w = b.loss_weights.reshape(-1)
    flat_p = b.position_ids.reshape(-1)
    by_tokens = {tuple(s.input_ids.tolist()): s for s in samples}
    seen = 0
    row_used = [0] * B
    bounds = b.cu_seqlens.tolist()
    for a, e in zip(bounds[:-1], bounds[1:]):
        assert a // S == (e - 1) // S, "a segment never crosses rows"
        seg = tuple(flat_ids[a:e].tolist())
        s = by_tokens.get(seg)
        if s is None:  # row padding: its own segment, at the end of the row, ignored
            assert e % S == 0 and all(t == PAD for t in seg)
            assert (flat_t[a:e] == IGNORE_INDEX).all() and (flat_w[a:e] == 0).all()
            continue
        seen += 1
        row_used[a // S] += e - a
        # targets are the labels shifted by one inside the sample; the last token has none
        assert torch.equal(flat_t[a:e - 1], s.labels[1:]) and int(flat_t[e - 1]) == IGNORE_INDEX
        n = s.num_targets
        want = {"token": 1.0, "sample": 1.0 / n, "square": 1.0 / math.sqrt(n)}[mode]
        w = flat_w[a:e]
        assert torch.allclose(w[flat_t[a:e] != IGNORE_INDEX], torch.full((n,), want))
        assert (w[flat_t[a:e] == IGNORE_INDEX] == 0).all()
        # delta 1: positions restart at 0 and equal arange
        assert torch.equal(flat_p[a:e], torch.arange(e - a, dtype=torch.float32))
    assert seen == len(samples)
    assert max(row_used) <= limit
    assert b.visual_tokens == sum(int((s.input_ids == CTX).sum()) for s in samples)
    assert b.text_tokens == sum(s.num_tokens for s in samples) - b.visual_tokens
    assert b.max_seqlen <= S


def test_pixel_order_follows_flattened_runs(samples):
    b = pack_samples(samples, 40, CTX, "token", pad_id=PAD)
    flat = b.input_ids.reshape(-1)
    # walk the runs of <IMG_CONTEXT> in the flattened batch; each must meet its own pixels in order
    tags = []
    k = 0
    while k < flat.numel():
        if int(flat[k]) == CTX:
            e = k
            while e < flat.numel() and int(flat[e]) == CTX:
                e += 1
            tags.append((e - k) // NIT)
            k = e
        else:
            k += 1
    assert b.image_tiles.tolist() == tags
    assert b.num_tiles == sum(tags) == int(b.image_tiles.sum())
    # pixel values follow the rows' order, not the input order (first-fit moves samples)
    expected = []
    bounds = b.cu_seqlens.tolist()
    by_first = {int(s.input_ids[0]): s for s in samples}
    for a in bounds[:-1]:
        s = by_first.get(int(flat[a]))
        if s is not None and s.pixel_values is not None:
            expected.append(s.pixel_values)
    assert torch.equal(b.pixel_values, torch.cat(expected))
    order = [int(s.input_ids[0]) - 100 for s in samples]
    assert [int(flat[a]) - 100 for a in bounds[:-1] if int(flat[a]) >= 100] != order  # reordering happened


def test_v2pe_positions_with_deltas():
    s = make_sample(0, 3, [1, 2])  # 1 text, image(4), 1 text... layout: t <img> ctx*4 </img> <img> ctx*8 </img> t t
    b = pack_samples([s, make_sample(1, 3, [])], 100, CTX, "token", deltas=[[0.5, 0.25], []])
    p = b.position_ids[0].tolist()
    ids = b.input_ids[0].tolist()
    n0 = s.num_tokens
    assert p[0] == 0.0 and p[1] == 1.0  # text, <img>
    assert p[2:6] == [1.5, 2.0, 2.5, 3.0]  # 4 visual tokens at delta 0.5
    assert p[6] == 4.0  # </img>: ceil(last visual) + 1
    assert p[7] == 5.0 and p[8:16] == [5.25 + 0.25 * j for j in range(8)]
    assert p[16] == math.ceil(p[15]) + 1
    assert p[n0] == 0.0 and ids[n0] == 101  # next sample restarts at 0
    with pytest.raises(ValueError, match="deltas"):
        pack_samples([s], 100, CTX, "token", deltas=[[0.5]])


def test_sample_v2pe_deltas_deterministic():
    s = make_sample(0, 3, [1, 1, 2])
    d = sample_v2pe_deltas(s, seed=1, index=42, random=True)
    assert len(d) == 3 and all(x in V2PE_DELTAS for x in d)
    assert d == sample_v2pe_deltas(s, seed=1, index=42, random=True)
    draws = {tuple(sample_v2pe_deltas(s, seed=1, index=i, random=True)) for i in range(50)}
    assert len(draws) > 10
    assert sample_v2pe_deltas(s, 1, 42, random=False, fixed=0.25) == [0.25] * 3


def test_pack_errors(samples):
    with pytest.raises(ValueError, match=r"sample1\.jsonl:2 has 30 tokens > max_packed_tokens=20"):
        pack_samples(samples, 20, CTX, "token")
    with pytest.raises(ValueError, match="loss reduction"):
        pack_samples(samples, 40, CTX, "mean")
    bad = make_sample(9, 5, [1, 1])
    bad.image_tiles = [2]
    with pytest.raises(ValueError, match="sample9"):
        pack_samples([bad], 40, CTX, "token")


def test_empty_step_gives_inert_batch():
    b = pack_samples([], 40, CTX, "square", pad_to_multiple=4)
    assert b.input_ids.shape == (1, 4) and b.loss_weights.sum() == 0 and b.num_samples == 0
    assert b.pixel_values is None and b.cu_seqlens.tolist() == [0, 4]
