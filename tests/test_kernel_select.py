"""The model gives the same loss and gradients with the Triton kernels (interpreted on CPU) and the reference."""

import os

import pytest
import torch

from engine.config import KernelsConfig
from engine.models.internvl import InternVLModel
from engine.models.kernel_select import configure_kernels
from engine.models.presets import preset_model_config

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs a GPU or the Triton interpreter")


def _batch():
    from engine.data.batch import Sample
    from engine.data.packing import pack_samples

    g = torch.Generator().manual_seed(1)
    samples = []
    for i, tiles in enumerate([1, 0, 2]):
        ids = [3, 11, 12] + ([5] + [7] * (16 * tiles) + [6] if tiles else []) + torch.randint(9, 500, (9,), generator=g).tolist()
        labels = [-100] * (len(ids) - 5) + ids[-5:]
        pv = torch.randn(tiles, 3, 112, 112, generator=g) if tiles else None
        samples.append(Sample(torch.tensor(ids), torch.tensor(labels), pv, [tiles] if tiles else [], index=i))
    deltas = [[0.25] * len(s.image_tiles) for s in samples]
    return pack_samples(samples, 256, 7, "square", deltas=deltas)


def test_kernels_match_reference():
    batch = _batch()
    results = []
    for mode in ("reference", "triton"):
        torch.manual_seed(0)
        model = InternVLModel(preset_model_config("tiny"))
        configure_kernels(model, KernelsConfig(rotary=mode, pixel_shuffle=mode, loss=mode))
        ls, ws = model.loss_terms(batch)
        (ls / ws).backward()
        results.append((ls.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (la, ga), (lb, gb) = results
    assert torch.allclose(la, lb, rtol=1e-5)
    for n in ga:
        scale = ga[n].abs().max().clamp(min=1e-6)
        assert ((ga[n] - gb[n]).abs().max() / scale) < 1e-4, n
