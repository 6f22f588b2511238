"""KV-cache generation equals uncached argmax decoding; sampling is seeded; stop tokens end a sequence."""

from __future__ import annotations

import pytest
import torch

from engine.config import config_from_dict
from engine.models.internvl import InternVLModel
from engine.posttrain.generate import generate


@pytest.fixture(scope="module")
def model():
    cfg = config_from_dict({"model": {"preset": "tiny", "v2pe_delta": 0.25}})
    torch.manual_seed(0)
    return InternVLModel(cfg.model).eval()


def _prompts(model):
    m = model.config
    T, ctx = m.num_image_token, m.img_context_token_id
    return [[10, 11, 12, m.img_start_token_id] + [ctx] * T + [m.img_end_token_id, 13, 14],
            [20, 21],  # short: left-padded the most
            [30, 31, m.img_start_token_id] + [ctx] * (2 * T) + [m.img_end_token_id, 32, 33, 34, 35]]


def _uncached(model, prompts, pixels, steps):
    """Greedy decoding by a full forward of the growing sequence (model's own V2PE positions)."""
    out = []
    for p, px in zip(prompts, pixels):
        ids, got = list(p), []
        for _ in range(steps):
            with torch.no_grad():
                logits = model(torch.tensor([ids]), px)
            got.append(int(logits[0, -1].argmax()))
            ids.append(got[-1])
        out.append(got)
    return out


def test_cached_greedy_equals_uncached_argmax(model):
    prompts = _prompts(model)
    g = torch.Generator().manual_seed(1)
    size = model.config.vision.image_size
    px = [torch.randn(1, 3, size, size, generator=g), None, torch.randn(2, 3, size, size, generator=g)]
    with torch.no_grad():
        emb = model.extract_feature(torch.cat([px[0], px[2]]))
    got = generate(model, prompts, emb, max_new_tokens=8)
    assert got == _uncached(model, prompts, px, 8)
    assert all(len(o) == 8 for o in got)
    assert len({tuple(o) for o in got}) == 3


def test_sampling_is_seeded_and_stops(model):
    prompts = [[40, 41, 42]] * 4
    a = generate(model, prompts, max_new_tokens=12, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompts, max_new_tokens=12, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert a == b
    assert len({tuple(o) for o in a}) > 1  # the four samples differ
    stop = a[0][2]
    c = generate(model, prompts, max_new_tokens=12, temperature=1.0, generator=torch.Generator().manual_seed(3),
                 stop_ids=[stop])
    assert c[0] == a[0][:3]  # ends with the stop token
    for full, cut in zip(a, c):
        k = full.index(stop) + 1 if stop in full else len(full)
        assert cut == full[:k]


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []])
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1, 2]], temperature=-1.0)
