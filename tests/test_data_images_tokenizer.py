"""Tokenizer backends, dynamic tiling, normalisation and JPEG augmentation."""

from __future__ import annotations

import random
import re

import pytest
import torch
from PIL import Image

from engine.data.images import (IMAGENET_MEAN, IMAGENET_STD, ImageProcessor, dynamic_preprocess,
                                find_closest_aspect_ratio, num_tiles, normalize_tile, target_ratios, tile_grid)
from engine.data.tokenizer import SPECIAL_TOKENS, TokenizerError, load_tokenizer
from tools.make_synthetic_data import generate

S = 112  # tiny preset tile size


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(str(out), num_samples=40, num_text_docs=20, seed=3)
    return out


# ----------------------------------------------------------------------------- tokenizer


def test_sentencepiece_special_ids_and_roundtrip(synth):
    tok = load_tokenizer(str(synth / "tokenizer.model"))
    assert (tok.pad_id, tok.eos_id, tok.im_start_id, tok.im_end_id) == (0, 2, 3, 4)
    assert (tok.img_start_id, tok.img_end_id, tok.img_context_id) == (5, 6, 7)
    assert tok.vocab_size <= 512
    for name, s in SPECIAL_TOKENS.items():
        assert tok.encode(s) == [tok.specials[s]], name
    text = "<|im_start|>user\nWhat colour is the shape?<|im_end|>\n<img><IMG_CONTEXT><IMG_CONTEXT></img>red<|endoftext|>"
    ids = tok.encode(text)
    assert ids[0] == 3 and ids.count(7) == 2 and ids[-1] == 2
    assert tok.decode(ids) == text
    printable = "".join(chr(c) for c in range(32, 127))
    assert 1 not in tok.encode(printable) and tok.decode(tok.encode(printable)) == printable  # no <unk> on ASCII


def _hf_tokenizer_dir(path) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    base.train_from_iterator(["the red circle is on the left.", "what colour is the shape?\n"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=base, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<img>", "</img>", "<IMG_CONTEXT>"]})
    fast.save_pretrained(str(path))
    return str(path)


def test_transformers_tokenizer_dir(tmp_path):
    d = _hf_tokenizer_dir(tmp_path / "hf")
    tok = load_tokenizer(d)
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(d, local_files_only=True)
    vocab = ref.get_vocab()
    assert tok.img_context_id == vocab["<IMG_CONTEXT>"] and tok.img_start_id == vocab["<img>"]
    assert tok.im_end_id == vocab["<|im_end|>"] and tok.eos_id == vocab["<|endoftext|>"] == tok.pad_id
    assert tok.vocab_size == len(ref)
    text = "<|im_start|>user\nwhat colour is the shape?<img><IMG_CONTEXT></img><|im_end|>\n"
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False)  # same as transformers, no BOS
    assert ids.count(tok.img_context_id) == 1 and ids[0] == tok.im_start_id
    assert tok.decode(ids) == text


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(str(tmp_path / "nope.model"))
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=base).save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(TokenizerError, match=re.escape("<|endoftext|>")):
        load_tokenizer(str(tmp_path / "plain"))


# ----------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("size,grid,tiles", [
    ((100, 100), (1, 1), 1),      # square below half the 2x2 area stays one tile
    ((158, 158), (1, 1), 1),
    ((160, 160), (2, 2), 5),      # tie on ratio 1: larger grid once the image covers half of it
    ((448, 448), (3, 3), 10),     # max 12: 4x4 is out of range
    ((224, 112), (2, 1), 3),
    ((112, 336), (1, 3), 4),
    ((300, 100), (3, 1), 4),
    ((150, 120), (4, 3), 13),     # 1.25 is closest to 4/3 among grids of <= 12 tiles
])
def test_tiling_counts(size, grid, tiles):
    assert tile_grid(*size, 1, 12, S) == grid
    assert num_tiles(*size, 1, 12, S, True) == tiles
    img = Image.new("RGB", size, (10, 20, 30))
    out = dynamic_preprocess(img, 1, 12, S, use_thumbnail=True)
    assert len(out) == tiles and all(t.size == (S, S) for t in out)


def test_closest_ratio_is_optimal():
    rng = random.Random(0)
    ratios = target_ratios(1, 6)
    assert ratios[0] == (1, 1) and len(ratios) == len(set(ratios))
    assert all(1 <= c * r <= 6 for c, r in ratios) and (3, 2) in ratios and (4, 2) not in ratios
    for _ in range(200):
        w, h = rng.randint(20, 900), rng.randint(20, 900)
        c, r = find_closest_aspect_ratio(w / h, ratios, w, h, S)
        best = min(abs(w / h - a / b) for a, b in ratios)
        assert abs(w / h - c / r) == best


def test_tile_content_and_thumbnail():
    img = Image.new("RGB", (224, 112), (255, 0, 0))
    img.paste((0, 0, 255), (112, 0, 224, 112))
    tiles = dynamic_preprocess(img, 1, 12, S, use_thumbnail=True)
    assert len(tiles) == 3
    assert tiles[0].getpixel((50, 50)) == (255, 0, 0) and tiles[1].getpixel((50, 50)) == (0, 0, 255)
    thumb = tiles[2]  # whole image squeezed: left half red, right half blue
    assert thumb.getpixel((10, 50)) == (255, 0, 0) and thumb.getpixel((100, 50)) == (0, 0, 255)
    assert len(dynamic_preprocess(img, 1, 12, S, use_thumbnail=False)) == 2
    assert len(dynamic_preprocess(img, 1, 1, S, use_thumbnail=True)) == 1  # max 1 tile: no thumbnail


def test_normalisation():
    x = normalize_tile(Image.new("RGB", (S, S), (255, 0, 128)), S)
    assert x.dtype == torch.float32 and x.shape == (3, S, S)
    want = [(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], (0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
            (128 / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]]
    for c in range(3):
        torch.testing.assert_close(x[c], torch.full((S, S), want[c]), rtol=0, atol=1e-6)
    proc = ImageProcessor(image_size=S, max_num=6)
    out = proc(Image.new("RGB", (300, 100), (255, 0, 128)))
    assert out.shape == (4, 3, S, S) and out.dtype == torch.float32
    torch.testing.assert_close(out[3, 0], torch.full((S, S), want[0]), rtol=0, atol=1e-5)


def test_jpeg_augmentation_is_seeded():
    rng = random.Random(0)
    img = Image.new("RGB", (S, S))
    img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(S * S)])
    plain = ImageProcessor(image_size=S)(img)
    aug = ImageProcessor(image_size=S, jpeg_aug_prob=1.0)
    a, b = aug(img, random.Random(7)), aug(img, random.Random(7))
    assert torch.equal(a, b)
    assert (a - plain).abs().mean() > 0.01  # JPEG at quality <= 100 changes noisy pixels
    assert torch.equal(ImageProcessor(image_size=S, jpeg_aug_prob=0.0)(img, random.Random(7)), plain)
    with pytest.raises(ValueError, match="random generator"):
        aug(img)
