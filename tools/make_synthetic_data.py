"""Write a small, learnable multimodal data set in InternVL's format.

Images of coloured shapes with questions that need the image (colour, shape, count, position),
a text-only corpus with templated regularities, MMPR-style preference pairs, and a
sentencepiece tokenizer whose special ids match the ``tiny`` preset::

    python tools/make_synthetic_data.py --out data/synthetic [--num-samples 2000] [--seed 0] [--with-bad]

Files: images/, train.jsonl, meta.json, text.jsonl, preference.jsonl, preference_meta.json,
colour_pairs.jsonl + colour_pairs_meta.json (preference pairs learnable from colour alone),
prm/ (VisualPRM steps, policy SFT data, evaluation questions), tokenizer.model; with --with-bad also bad.jsonl and meta_bad.json (deliberately broken records).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import time
from typing import Any

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (240, 220, 20), "purple": (140, 40, 180), "orange": (250, 140, 10),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (250, 250, 250), "gray": (128, 128, 128),
                                                 "black": (10, 10, 10)}
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
OBJECT_COLOURS = {"grass": "green", "the sky": "blue", "a banana": "yellow", "a tomato": "red",
                  "an orange": "orange", "a plum": "purple", "snow": "white", "coal": "black"}
SIDES = {"triangle": "three", "square": "four", "circle": "no"}
SPECIAL_SYMBOLS = ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
SYSTEM_PROMPT_LINES = ["你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"]


# ----------------------------------------------------------------------------- images


def _image_size(rng: random.Random) -> tuple[int, int]:
    """Mostly small squares (1 tile); some 2:1 / 1:2 (2 tiles + thumbnail) and 3:1 / 1:3 (3 + thumbnail)."""
    u = rng.random()
    if u < 0.6:
        s = rng.randrange(64, 150, 2)
        return s, s
    if u < 0.85:
        h = rng.randrange(48, 100, 2)
        return (2 * h, h) if rng.random() < 0.7 else (h, 2 * h)
    h = rng.randrange(40, 76, 2)
    return (3 * h, h) if rng.random() < 0.7 else (h, 3 * h)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def _render(size: tuple[int, int], background: str, items: list[tuple[str, str, float, float]],
            radius: float) -> Image.Image:
    img = Image.new("RGB", size, BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    for shape, colour, fx, fy in items:
        _draw_shape(draw, shape, fx * size[0], fy * size[1], radius, COLOURS[colour])
    return img


def _cells(size: tuple[int, int], n: int, rng: random.Random) -> tuple[list[tuple[float, float]], float]:
    """``n`` distinct cell centres (fractions of the image) of a grid fitted to the aspect ratio."""
    w, h = size
    cols = 2 if w <= h else 2 * round(w / h)
    rows = 2 if h <= w else 2 * round(h / w)
    cells = rng.sample([(c, r) for c in range(cols) for r in range(rows)], n)
    radius = 0.38 * min(w / cols, h / rows)
    return [((c + 0.5) / cols, (r + 0.5) / rows) for c, r in cells], radius


def _other(rng: random.Random, options: tuple | list, exclude: str) -> str:
    return rng.choice([o for o in options if o != exclude])


def make_sample(rng: random.Random) -> tuple[Image.Image, list[dict], tuple[str, str, str]]:
    """One image with its conversation turns and a preference triple (question, chosen, rejected)."""
    size = _image_size(rng)
    w, h = size
    bg = rng.choice(list(BACKGROUNDS))
    colours = [c for c in COLOURS]
    kind = rng.random()
    if kind < 0.45:  # one shape: colour / shape / caption
        shape, colour = rng.choice(SHAPES), rng.choice(colours)
        radius = 0.35 * min(w, h)
        img = _render(size, bg, [(shape, colour, 0.5, 0.5)], radius)
        qa = [("What colour is the shape?", colour, _other(rng, colours, colour)),
              ("What shape is this?", shape, _other(rng, SHAPES, shape)),
              ("Describe the image.", f"a {colour} {shape} on a {bg} background.",
               f"a {_other(rng, colours, colour)} {shape} on a {bg} background.")]
    elif kind < 0.75:  # several identical shapes: count
        n = rng.randint(1, 3)
        shape, colour = rng.choice(SHAPES), rng.choice(colours)
        centres, radius = _cells(size, n, rng)
        img = _render(size, bg, [(shape, colour, x, y) for x, y in centres], radius)
        noun = shape if n == 1 else PLURAL[shape]
        qa = [("How many shapes are there?", NUMBERS[n], NUMBERS[n % 3 + 1]),
              (f"How many {PLURAL[shape]} are in the image?", NUMBERS[n], NUMBERS[n % 3 + 1]),
              ("Describe the image.", f"{NUMBERS[n]} {colour} {noun}.", f"{NUMBERS[n % 3 + 1]} {colour} {noun}.")]
    else:  # two different shapes: position
        s1, s2 = rng.sample(SHAPES, 2)
        c1, c2 = rng.sample(colours, 2)
        if w >= h:
            where = ("left", "right")
            pos = [(0.25, 0.5), (0.75, 0.5)]
            radius = 0.2 * min(w, 2 * h) * (0.9 if w == h else 1.0)
        else:
            where = ("top", "bottom")
            pos = [(0.5, 0.25), (0.5, 0.75)]
            radius = 0.2 * min(2 * w, h) * (0.9 if w == h else 1.0)
        img = _render(size, bg, [(s1, c1, *pos[0]), (s2, c2, *pos[1])], radius)
        qa = [(f"What colour is the shape on the {where[0]}?", c1, c2),
              (f"What shape is on the {where[1]}?", s2, s1),
              (f"Where is the {c1} {s1}?", f"on the {where[0]}.", f"on the {where[1]}."),
              ("Describe the image.", f"a {c1} {s1} on the {where[0]} and a {c2} {s2} on the {where[1]}.",
               f"a {c2} {s2} on the {where[0]} and a {c1} {s1} on the {where[1]}.")]
    rng.shuffle(qa)
    turns = qa[: rng.choice((1, 1, 2))]
    convs: list[dict] = []
    for k, (q, a, _) in enumerate(turns):
        if k == 0 and rng.random() < 0.7:  # otherwise the loader prepends the placeholder
            q = "<image>\n" + q
        convs += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    q, a, wrong = qa[0]
    return img, convs, (q, a, wrong)


def _save(img: Image.Image, path: str, rng: random.Random) -> None:
    if path.endswith(".jpg"):
        img.save(path, format="JPEG", quality=rng.randint(85, 95))
    else:
        img.save(path, format="PNG")


# ----------------------------------------------------------------------------- text corpus


def make_text_doc(rng: random.Random) -> str:
    """A few templated sentences with regularities a small model can learn."""
    sentences = []
    for _ in range(rng.randint(3, 8)):
        t = rng.randrange(6)
        if t == 0:
            a, b = rng.randint(0, 5), rng.randint(0, 5)
            sentences.append(f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}.")
        elif t == 1:
            d = rng.randrange(7)
            sentences.append(f"after {DAYS[d]} comes {DAYS[(d + 1) % 7]}.")
        elif t == 2:
            obj = rng.choice(list(OBJECT_COLOURS))
            sentences.append(f"the colour of {obj} is {OBJECT_COLOURS[obj]}.")
        elif t == 3:
            shape = rng.choice(SHAPES)
            sentences.append(f"a {shape} has {SIDES[shape]} corners.")
        elif t == 4:
            a = rng.randint(0, 6)
            sentences.append(" ".join(NUMBERS[a: a + 4]) + ".")
        else:
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            n = rng.randint(2, 3)
            sentences.append(f"there are {NUMBERS[n]} {colour} {PLURAL[shape]} and one {colour} {shape}.")
    return " ".join(sentences)


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(sentences: list[str], prefix: str, vocab_size: int = 512) -> None:
    """Train ``{prefix}.model``: <pad>=0, <unk>=1, <|endoftext|>=2 (eos), then the InternVL specials 3..7
    and a newline piece."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, unk_id=1, eos_id=2, bos_id=-1, eos_piece="<|endoftext|>",
        user_defined_symbols=SPECIAL_SYMBOLS + ["\n"], normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, character_coverage=1.0,
        hard_vocab_limit=False, num_threads=1, minloglevel=2, shuffle_input_sentence=False)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    expected = {"<pad>": 0, "<unk>": 1, "<|endoftext|>": 2, "<|im_start|>": 3, "<|im_end|>": 4,
                "<img>": 5, "</img>": 6, "<IMG_CONTEXT>": 7}
    for piece, i in expected.items():
        got = sp.piece_to_id(piece)
        assert got == i, f"tokenizer: {piece} has id {got}, expected {i}"
    assert sp.get_piece_size() <= vocab_size, f"tokenizer vocab {sp.get_piece_size()} > {vocab_size}"


# ----------------------------------------------------------------------------- bad records


def _write_bad(out: str, good_image: str, rng: random.Random) -> int:
    """bad.jsonl + meta_bad.json: one good record and one of each kind of broken record."""
    images = os.path.join(out, "images")
    with open(os.path.join(images, "bad_corrupt.png"), "wb") as f:
        f.write(b"this is not an image at all" * 8)
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (200, 10, 10)).save(buf, format="PNG")
    with open(os.path.join(images, "bad_truncated.png"), "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    ok = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"}]
    lines = [
        json.dumps({"image": good_image, "conversations": ok}),  # line 1: good
        json.dumps({"image": "bad_missing.png", "conversations": ok}),  # 2: missing_image
        json.dumps({"image": "bad_corrupt.png", "conversations": ok}),  # 3: corrupt_image (header)
        json.dumps({"image": "bad_truncated.png", "conversations": ok}),  # 4: corrupt_image (pixels)
        '{"image": "' + good_image + '", "conversations": [',  # 5: malformed JSON
        json.dumps({"image": good_image, "conversations": []}),  # 6: malformed (empty)
        json.dumps({"image": good_image, "conversations": list(reversed(ok))}),  # 7: malformed (roles)
        json.dumps({"image": good_image, "conversations": ok[:1]}),  # 8: malformed (no assistant turn)
        json.dumps({"image": good_image, "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhat colour is the shape?"},
            {"from": "gpt", "value": "red"}]}),  # 9: image_mismatch
        json.dumps({"image": good_image, "conversations": [
            ok[0], {"from": "gpt", "value": " ".join(["red"] * 5000)}]}),  # 10: too_long
    ]
    with open(os.path.join(out, "bad.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "meta_bad.json"), "w") as f:
        json.dump({"synthetic_bad": {"root": "images", "annotation": "bad.jsonl", "repeat_time": 1,
                                     "length": len(lines)}}, f, indent=2)
    return len(lines)


# ----------------------------------------------------------------------------- main


def generate(out: str, num_samples: int = 2000, seed: int = 0, with_bad: bool = False,
             num_text_docs: int | None = None, num_multi_image: int | None = None) -> dict[str, Any]:
    """Write the data set into ``out``; returns a summary (counts and paths)."""
    if num_samples < 1:
        raise ValueError(f"--num-samples={num_samples} must be >= 1")
    rng = random.Random(seed)
    images = os.path.join(out, "images")
    os.makedirs(images, exist_ok=True)
    records: list[dict] = []
    prefs: list[dict] = []
    corpus: list[str] = []
    n_multi = num_samples // 20 if num_multi_image is None else num_multi_image
    for i in range(num_samples):
        name = f"{i:06d}." + ("jpg" if rng.random() < 0.3 else "png")
        img, convs, (q, chosen, rejected) = make_sample(rng)
        _save(img, os.path.join(images, name), rng)
        records.append({"id": i, "image": name, "conversations": convs})
        prefs.append({"image": name, "question": "<image>\n" + q, "chosen": chosen, "rejected": rejected})
        corpus += [t["value"].replace("<image>\n", "") for t in convs]
    for j in range(n_multi):  # two images: answer about the second one
        a, b = rng.sample(range(num_samples), 2)
        second = records[b]
        q = second["conversations"][0]["value"].replace("<image>\n", "")
        convs = [{"from": "human", "value": f"Image-1: <image>\nImage-2: <image>\nAbout the second image: {q}"},
                 {"from": "gpt", "value": second["conversations"][1]["value"]}]
        records.append({"id": num_samples + j, "image": [records[a]["image"], second["image"]],
                        "conversations": convs})
        corpus += [t["value"].replace("<image>", "") for t in convs]
    rng.shuffle(records)
    with open(os.path.join(out, "train.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump({"synthetic_shapes": {"root": "images", "annotation": "train.jsonl",
                                        "repeat_time": 1, "length": len(records)}}, f, indent=2)
    with open(os.path.join(out, "preference.jsonl"), "w") as f:
        for p in prefs:
            f.write(json.dumps(p) + "\n")
    with open(os.path.join(out, "preference_meta.json"), "w") as f:
        json.dump({"synthetic_preference": {"root": "images", "annotation": "preference.jsonl",
                                            "repeat_time": 1, "length": len(prefs)}}, f, indent=2)
    # Post-training sets: colour preference pairs (chosen = the shape's colour) and VisualPRM data.
    from engine.posttrain.synthetic import PRM_QUESTION, solution_steps, write_colour_pairs, write_prm_data

    write_colour_pairs(out, num_pairs=1000, seed=seed)
    write_prm_data(os.path.join(out, "prm"), num_images=200, seed=seed)
    corpus += [PRM_QUESTION.replace("<image>\n", "")] * 20
    corpus += [s for shape in SHAPES for colour in COLOURS for s in solution_steps(shape, colour, "white")]
    n_docs = max(num_samples // 2, 1) if num_text_docs is None else num_text_docs
    docs = [make_text_doc(rng) for _ in range(n_docs)]
    with open(os.path.join(out, "text.jsonl"), "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    template = ["system", "user", "assistant", "Image-1: Image-2: About the second image:"]
    ascii_line = "".join(chr(c) for c in range(32, 127))  # every printable ASCII character gets a piece
    train_tokenizer(corpus + docs + template * 50 + SYSTEM_PROMPT_LINES * 200 + [ascii_line] * 5,
                    os.path.join(out, "tokenizer"))
    n_bad = _write_bad(out, records[0]["image"] if isinstance(records[0]["image"], str) else records[0]["image"][0],
                       rng) if with_bad else 0
    return {"out": out, "samples": len(records), "text_docs": n_docs, "preference_pairs": len(prefs),
            "bad_records": n_bad}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/synthetic")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--num-text-docs", type=int, default=None, help="default: num-samples / 2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--with-bad", action="store_true", help="also write bad.jsonl / meta_bad.json")
    args = p.parse_args(argv)
    t0 = time.time()
    summary = generate(args.out, args.num_samples, args.seed, args.with_bad, args.num_text_docs)
    summary["seconds"] = round(time.time() - t0, 2)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
