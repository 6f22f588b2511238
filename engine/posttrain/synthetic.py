"""Synthetic post-training data: step-by-step solutions for a PRM, and colour preference pairs.

Images are one shape (circle, square or triangle) of one colour on a plain background. Every
question needs the image.

``write_prm_data(out)`` writes, beside ``images/``:

* ``prm.jsonl`` / ``prm_meta.json``: PRM training conversations. The question asks for the shape
  step by step; a solution has three steps (shape, colour, background), each a claim labelled
  ``+`` when true and ``-`` when false; some solutions are all true, others have false steps.
* ``sft.jsonl`` / ``sft_meta.json``: the same questions answered by the true steps, one per line
  (policy SFT data).
* ``questions.jsonl``: ``{image, question, answer}`` for Best-of-N evaluation (image paths relative
  to ``out``).

``write_colour_pairs(out)`` writes ``colour_pairs.jsonl`` / ``colour_pairs_meta.json``: MMPR-style
pairs whose chosen answer names the shape's colour and whose rejected answer names another.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (240, 220, 20), "purple": (140, 40, 180), "orange": (250, 140, 10),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (250, 250, 250), "gray": (128, 128, 128),
                                                 "black": (10, 10, 10)}
SHAPES = ("circle", "square", "triangle")
PRM_QUESTION = "<image>\nDescribe the shape step by step."
COLOUR_QUESTION = "<image>\nWhat colour is the shape?"


def render(shape: str, colour: str, background: str, size: int = 96) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    c, r = size / 2, 0.35 * size
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([c - r, c - r, c + r, c + r], fill=fill)
    elif shape == "square":
        d.rectangle([c - r, c - r, c + r, c + r], fill=fill)
    else:
        d.polygon([(c, c - r), (c - r, c + r), (c + r, c + r)], fill=fill)
    return img


def solution_steps(shape: str, colour: str, background: str) -> list[str]:
    return [f"the shape is a {shape}.", f"it is {colour}.", f"the background is {background}."]


def _other(rng: random.Random, options, exclude: str) -> str:
    return rng.choice([o for o in options if o != exclude])


def _facts(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))


def _meta(out: str, name: str, annotation: str, n: int) -> None:
    with open(os.path.join(out, f"{name}_meta.json"), "w") as f:
        json.dump({name: {"root": "images", "annotation": annotation, "repeat_time": 1, "length": n}}, f, indent=2)


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def write_prm_data(out: str, num_images: int = 200, seed: int = 0, solutions_per_image: int = 2,
                   size: int = 96) -> dict[str, Any]:
    """PRM, SFT and evaluation files for ``num_images`` images (see the module docstring)."""
    from engine.posttrain.prm import prm_conversation

    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    prm, sft, questions = [], [], []
    for i in range(num_images):
        shape, colour, bg = _facts(rng)
        name = f"prm_{i:05d}.png"
        render(shape, colour, bg, size).save(os.path.join(out, "images", name))
        truth = solution_steps(shape, colour, bg)
        for j in range(solutions_per_image):
            wrong = set() if j == 0 else set(rng.sample(range(3), rng.randint(1, 3)))
            steps = solution_steps(_other(rng, SHAPES, shape) if 0 in wrong else shape,
                                   _other(rng, list(COLOURS), colour) if 1 in wrong else colour,
                                   _other(rng, list(BACKGROUNDS), bg) if 2 in wrong else bg)
            labels = ["-" if k in wrong else "+" for k in range(3)]
            prm.append({"image": name, "conversations": prm_conversation(PRM_QUESTION, steps, labels)})
        sft.append({"image": name, "conversations": [{"from": "human", "value": PRM_QUESTION},
                                                     {"from": "gpt", "value": "\n".join(truth)}]})
        questions.append({"image": f"images/{name}", "question": PRM_QUESTION, "answer": "\n".join(truth)})
    rng.shuffle(prm)
    _write_jsonl(os.path.join(out, "prm.jsonl"), prm)
    _write_jsonl(os.path.join(out, "sft.jsonl"), sft)
    _write_jsonl(os.path.join(out, "questions.jsonl"), questions)
    _meta(out, "prm", "prm.jsonl", len(prm))
    _meta(out, "sft", "sft.jsonl", len(sft))
    return {"out": out, "prm_solutions": len(prm), "sft_samples": len(sft), "questions": len(questions)}


def write_colour_pairs(out: str, num_pairs: int = 1000, seed: int = 0, size: int = 64) -> dict[str, Any]:
    """``colour_pairs.jsonl``: chosen = the shape's colour, rejected = another colour."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    pairs = []
    for i in range(num_pairs):
        shape, colour, bg = _facts(rng)
        name = f"colour_{i:05d}.png"
        render(shape, colour, bg, size).save(os.path.join(out, "images", name))
        pairs.append({"image": name, "question": COLOUR_QUESTION, "chosen": colour,
                      "rejected": _other(rng, list(COLOURS), colour)})
    _write_jsonl(os.path.join(out, "colour_pairs.jsonl"), pairs)
    _meta(out, "colour_pairs", "colour_pairs.jsonl", len(pairs))
    return {"out": out, "pairs": len(pairs)}
