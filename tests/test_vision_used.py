"""Does it look? After a short training run the tiny model's caption/answer loss with the right
images is clearly lower than with the images shuffled between samples (the vision path is used)."""

import collections
import copy
import os

import torch

from conftest import tiny_overrides
from engine.config import load_config
from engine.step import evaluate_loss, pack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_trained_model_uses_the_images(tmp_path):
    from engine.trainer import Trainer
    from tools.make_synthetic_data import generate

    data = str(tmp_path / "data")
    generate(data, num_samples=2000, seed=1)
    # Multimodal samples only, one tile per image and no system prompt: cheap steps, all supervision about images.
    cfg = load_config(os.path.join(ROOT, "examples/configs/tiny.yaml"), tiny_overrides(data, str(tmp_path / "run"), **{
        "train.steps": 300, "train.lr": 3e-3, "train.min_lr": 1e-3, "train.warmup_steps": 20, "train.global_batch": 8,
        "train.save_interval": 0, "data.lm_ratio": 0.0, "data.max_dynamic_patch": 1, "data.system_prompt": '""'}))
    trainer = Trainer(cfg)
    history = trainer.train()
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]

    model = trainer.runner.model.eval()
    dataset = trainer.loader.dataset
    loaded = [dataset.load(i) for i in range(10**6, 10**6 + 256)]  # a later epoch, in a new order
    by_tiles = collections.defaultdict(list)
    for s in loaded:
        if s is not None and s.num_tiles:
            by_tiles[s.num_tiles].append(s)
    right, shuffled = [], []
    for group in by_tiles.values():
        if len(group) < 2:
            continue
        right += group
        for i, s in enumerate(group):  # each sample gets the next sample's image
            other = copy.copy(s)
            other.pixel_values = group[(i + 1) % len(group)].pixel_values
            shuffled.append(other)
    assert len(right) > 100
    device = torch.device("cpu")
    loss_right = evaluate_loss(model, [pack(right[i:i + 16], cfg) for i in range(0, len(right), 16)], device)
    loss_shuffled = evaluate_loss(model, [pack(shuffled[i:i + 16], cfg) for i in range(0, len(shuffled), 16)], device)
    print(f"caption loss: right images {loss_right:.4f}, shuffled images {loss_shuffled:.4f}")
    assert loss_shuffled > 1.2 * loss_right, (loss_right, loss_shuffled)
