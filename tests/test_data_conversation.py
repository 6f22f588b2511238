"""Chat template, label masks and <image> expansion."""

from __future__ import annotations

import pytest

from engine.data.batch import IGNORE_INDEX
from engine.data.conversation import (INTERNVL_SYSTEM_PROMPT, ConversationError, tokenize_conversation,
                                      tokenize_text_document)
from engine.data.tokenizer import load_tokenizer
from tools.make_synthetic_data import generate

NIT = 16  # visual tokens per tile (tiny preset)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(str(out), num_samples=40, num_text_docs=20, seed=5)
    return load_tokenizer(str(out / "tokenizer.model"))


def _conv(*pairs):
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


def test_template_and_label_mask(tok):
    conv = _conv(("<image>\nWhat colour is the shape?", "red"), ("What shape is this?", "a circle."))
    ids, labels = tokenize_conversation(conv, tok, [1], NIT, system_prompt="You are a bot.")
    assert len(ids) == len(labels)
    text = tok.decode(ids)
    image = "<img>" + "<IMG_CONTEXT>" * NIT + "</img>"
    assert text == ("<|im_start|>system\nYou are a bot.<|im_end|>\n"
                    f"<|im_start|>user\n{image}\nWhat colour is the shape?<|im_end|>\n"
                    "<|im_start|>assistant\nred<|im_end|>\n"
                    "<|im_start|>user\nWhat shape is this?<|im_end|>\n"
                    "<|im_start|>assistant\na circle.<|im_end|>\n")
    supervised = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert tok.decode(supervised) == "red<|im_end|>a circle.<|im_end|>"
    for i, l in zip(ids, labels):  # supervised labels are the tokens themselves
        assert l in (IGNORE_INDEX, i)
    # user text, system prompt, role headers and visual tokens are never supervised
    assert all(l == IGNORE_INDEX for i, l in zip(ids, labels) if i in (tok.img_context_id, tok.im_start_id))
    assert sum(1 for i, l in zip(ids, labels) if i == tok.im_end_id and l != IGNORE_INDEX) == 2


def test_default_system_prompt_and_system_turn(tok):
    ids, _ = tokenize_conversation(_conv(("hi", "red")), tok, [], NIT)
    assert INTERNVL_SYSTEM_PROMPT in tok.decode(ids)
    conv = [{"from": "system", "value": "Be brief."}] + _conv(("hi", "red"))
    ids, _ = tokenize_conversation(conv, tok, [], NIT, system_prompt="ignored")
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_image_expansion_counts(tok):
    conv = _conv(("Image-1: <image>\nImage-2: <image>\nAbout the second image: What shape is this?", "circle"))
    ids, labels = tokenize_conversation(conv, tok, [3, 1], NIT)
    runs, run = [], 0
    for i in ids + [-1]:
        if i == tok.img_context_id:
            run += 1
        elif run:
            runs.append(run)
            run = 0
    assert runs == [3 * NIT, 1 * NIT]
    assert ids.count(tok.img_start_id) == 2 and ids.count(tok.img_end_id) == 2
    k = ids.index(tok.img_start_id)
    assert ids[k + 1 + 3 * NIT] == tok.img_end_id


def test_missing_placeholders_are_prepended(tok):
    conv = _conv(("What colour is the shape?", "red"))
    ids, _ = tokenize_conversation(conv, tok, [2, 1], NIT)
    text = tok.decode(ids)
    img2 = "<img>" + "<IMG_CONTEXT>" * 2 * NIT + "</img>"
    img1 = "<img>" + "<IMG_CONTEXT>" * NIT + "</img>"
    assert f"<|im_start|>user\n{img2}\n{img1}\nWhat colour is the shape?<|im_end|>" in text
    # one placeholder written, two images: the missing one goes first
    ids, _ = tokenize_conversation(_conv(("<image>\nWhat?", "red")), tok, [1, 1], NIT)
    assert ids.count(tok.img_start_id) == 2


@pytest.mark.parametrize("conv,reason", [
    ([], "malformed"),
    (None, "malformed"),
    ([{"from": "gpt", "value": "red"}, {"from": "human", "value": "q"}], "malformed"),
    ([{"from": "human", "value": "q"}], "malformed"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}], "malformed"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image> red"}], "malformed"),
    ([{"from": "human", "value": "<image>\n<image>\nq"}, {"from": "gpt", "value": "red"}], "image_mismatch"),
])
def test_bad_conversations(tok, conv, reason):
    with pytest.raises(ConversationError) as e:
        tokenize_conversation(conv, tok, [1], NIT)
    assert e.value.reason == reason


def test_text_document(tok):
    ids, labels = tokenize_text_document("one plus two is three.", tok)
    assert ids[-1] == tok.eos_id and labels == ids
    assert tok.decode(ids) == "one plus two is three.<|endoftext|>"
    for bad in ("", "   ", None, 5):
        with pytest.raises(ConversationError):
            tokenize_text_document(bad, tok)
