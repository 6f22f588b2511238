import math

import pytest
import torch

from engine.data.batch import IGNORE_INDEX
from engine.models.internvl import InternVLModel
from engine.models.layers import apply_rotary_reference, rotary_angles
from engine.models.loss import loss_weights, token_weight
from engine.models.presets import preset_model_config
from engine.models.projector import pixel_shuffle_reference
from engine.data.v2pe import V2PE_DELTAS, v2pe_position_ids, v2pe_positions_1d

CTX = 7


def tiny(name="tiny"):
    torch.manual_seed(0)
    return InternVLModel(preset_model_config(name)).eval()


def test_v2pe_delta_one_is_integer_positions():
    ids = [1, 2, 5] + [CTX] * 32 + [6, 9, CTX, CTX, 3]
    assert v2pe_positions_1d(ids, CTX, 1.0) == [float(i) for i in range(len(ids))]


def test_v2pe_fractional_and_ceil():
    pos = v2pe_positions_1d([1, CTX, CTX, CTX, CTX, 2, CTX, CTX, 3], CTX, [0.25, 0.5])
    assert pos == [0.0, 0.25, 0.5, 0.75, 1.0, 2.0, 2.5, 3.0, 4.0]
    pos = v2pe_positions_1d([1, CTX, CTX, CTX, 2], CTX, [0.25])
    assert pos[-1] == math.ceil(0.75) + 1
    assert set(V2PE_DELTAS) == {2**i / 256 for i in range(9)}


def test_v2pe_restarts_per_segment():
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    pos = v2pe_position_ids(ids, CTX, 1.0, torch.tensor([0, 4, 6]))
    assert pos.tolist() == [[0, 1, 2, 3, 0, 1]]


def test_loss_weights_modes():
    t = torch.tensor([[5, 5, IGNORE_INDEX, 5, 5, 5, 5, IGNORE_INDEX]])
    cu = torch.tensor([0, 3, 8])
    for mode, a, b in [("token", 1, 1), ("sample", 1 / 2, 1 / 4), ("square", 1 / 2**0.5, 1 / 2)]:
        w = loss_weights(t, cu, mode)[0]
        assert torch.allclose(w, torch.tensor([a, a, 0, b, b, b, b, 0]).float())
    assert token_weight(0, "square") == 0.0


def test_rotary_accuracy_at_large_positions():
    pos = torch.tensor([[1e6 + 0.25, 5e5 + 0.125]])
    cos, sin = rotary_angles(pos, 128, 1e6)
    inv = 1.0 / (1e6 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    ang = pos.double()[..., None] * inv
    assert (cos[..., :64].double() - ang.cos()).abs().max() < 1e-6
    q = torch.randn(1, 2, 3, 128)
    q2, _ = apply_rotary_reference(q, q[:, :, :1], pos, 1e6)
    assert torch.allclose(q2.norm(dim=-1), q.norm(dim=-1), atol=1e-4)  # a rotation


def test_pixel_shuffle_element_map():
    x = torch.randn(2, 4, 6, 3)
    y = pixel_shuffle_reference(x, 0.5, "v2")
    C = 3
    for p in range(2):
        for j in range(3):
            for q in range(2):
                for k in range(2):
                    assert torch.equal(y[:, p, j, q * 2 * C + k * C:q * 2 * C + (k + 1) * C], x[:, 2 * p + q, 2 * j + k])
    v1 = pixel_shuffle_reference(x, 0.5, "v1")
    assert v1.shape == (2, 3, 2, 12)


def _row(n_tiles, text=6, T=16):
    return [1, 2] + ([5] + [CTX] * (T * n_tiles) + [6] if n_tiles else []) + list(range(10, 10 + text))


@pytest.mark.parametrize("name", ["tiny", "tiny-6b-vit"])
def test_packed_equals_separate(name):
    """Two samples packed in one row give the same logits as each on its own."""
    m = tiny(name)
    a, b = _row(1), _row(2, text=4)
    pv = torch.randn(3, 3, 112, 112)
    la = m(torch.tensor([a]), pv[:1])
    lb = m(torch.tensor([b]), pv[1:])
    packed = torch.tensor([a + b])
    lp = m(packed, pv, cu_seqlens=torch.tensor([0, len(a), len(a) + len(b)]))
    assert torch.allclose(lp[0, :len(a)], la[0], atol=1e-5)
    assert torch.allclose(lp[0, len(a):], lb[0], atol=1e-5)


def test_image_changes_logits_and_count_mismatch_is_clear():
    m = tiny()
    ids = torch.tensor([_row(1)])
    l1 = m(ids, torch.randn(1, 3, 112, 112))
    l2 = m(ids, torch.randn(1, 3, 112, 112))
    assert (l1 - l2).abs().max() > 1e-4
    with pytest.raises(ValueError, match="16 <IMG_CONTEXT> tokens but 32 image features"):
        m(ids, torch.randn(2, 3, 112, 112))


def test_position_embedding_interpolation():
    m = tiny()
    out = m.vision_model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1 + 16 * 16, 64)


def test_loss_terms_match_logits():
    m = tiny()
    ids = torch.tensor([_row(1), _row(1)])
    pv = torch.randn(2, 3, 112, 112)
    logits = m(ids, pv)
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = IGNORE_INDEX
    w = torch.rand(ids.shape)

    class B:
        pass

    b = B()
    b.input_ids, b.pixel_values, b.position_ids, b.cu_seqlens, b.image_tiles = ids, pv, None, None, None
    b.targets, b.loss_weights = targets, w
    ls, ws = m.loss_terms(b)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), targets.reshape(-1).clamp(min=0), reduction="none")
    mask = (targets.reshape(-1) != IGNORE_INDEX).float()
    assert torch.allclose(ls, (ce * w.reshape(-1) * mask).sum(), rtol=1e-5)
    assert torch.allclose(ws, (w.reshape(-1) * mask).sum())
