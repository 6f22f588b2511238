"""InternVL chat template for Qwen2.5 (``internvl2_5``) and text-only documents.

A conversation becomes::

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n   ...

Each ``<image>`` in a user turn becomes ``<img>`` + ``<IMG_CONTEXT>`` x (num_image_token x tiles)
+ ``</img>``. Only assistant contents and their ``<|im_end|>`` are supervised. A text document is
its tokens followed by eos, all supervised.
"""

from __future__ import annotations

from typing import Any, Sequence

from engine.data.batch import IGNORE_INDEX
from engine.data.tokenizer import Tokenizer

IMAGE_PLACEHOLDER = "<image>"
INTERNVL_SYSTEM_PROMPT = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
ROLES = {"human": "user", "gpt": "assistant"}


class ConversationError(ValueError):
    """A sample that cannot be turned into tokens; ``reason`` is its skip-counter key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def validate_conversation(conversations: Any) -> tuple[str | None, list[dict]]:
    """``(system or None, turns)`` with turns alternating human, gpt, ... and ending on gpt."""
    if not isinstance(conversations, list) or not conversations:
        raise ConversationError("malformed", "'conversations' is empty or not a list")
    system = None
    turns = list(conversations)
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise ConversationError("malformed", f"turn {k} must be an object with string 'from' and 'value'")
    if turns[0]["from"] == "system":
        system = turns[0]["value"]
        turns = turns[1:]
    if not turns:
        raise ConversationError("malformed", "conversation has no human/gpt turns")
    for k, turn in enumerate(turns):
        expected = "human" if k % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise ConversationError("malformed", f"turn {k}: role {turn['from']!r}, expected {expected!r}")
        if expected == "gpt" and IMAGE_PLACEHOLDER in turn["value"]:
            raise ConversationError("malformed", f"turn {k}: {IMAGE_PLACEHOLDER} in an assistant turn")
    if turns[-1]["from"] != "gpt":
        raise ConversationError("malformed", "conversation does not end with an assistant (gpt) turn")
    return system, turns


def count_placeholders(turns: Sequence[dict]) -> int:
    return sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns if t["from"] == "human")


def insert_missing_placeholders(turns: list[dict], num_images: int) -> list[dict]:
    """Prepend ``<image>\\n`` to the first user turn for every image without a placeholder.
    More placeholders than images is an error."""
    n = count_placeholders(turns)
    if n > num_images:
        raise ConversationError("image_mismatch", f"{n} {IMAGE_PLACEHOLDER} placeholders but {num_images} images")
    if n == num_images:
        return turns
    out = [dict(t) for t in turns]
    out[0]["value"] = (IMAGE_PLACEHOLDER + "\n") * (num_images - n) + out[0]["value"]
    return out


def _encode_user(text: str, tok: Tokenizer, image_tokens: list[int], cursor: list[int]) -> list[int]:
    """Tokens of ``text`` with each placeholder replaced by the next image's token block."""
    ids: list[int] = []
    parts = text.split(IMAGE_PLACEHOLDER)
    for k, part in enumerate(parts):
        if part:
            ids.extend(tok.encode(part))
        if k < len(parts) - 1:
            n = image_tokens[cursor[0]]
            cursor[0] += 1
            ids.append(tok.img_start_id)
            ids.extend([tok.img_context_id] * n)
            ids.append(tok.img_end_id)
    return ids


def tokenize_conversation(conversations: Any, tok: Tokenizer, image_tiles: Sequence[int], num_image_token: int,
                          system_prompt: str | None = None) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of an InternVL conversation whose images have ``image_tiles`` tiles."""
    system, turns = validate_conversation(conversations)
    turns = insert_missing_placeholders(turns, len(image_tiles))
    if system is None:
        system = INTERNVL_SYSTEM_PROMPT if system_prompt is None else system_prompt
    image_tokens = [int(t) * num_image_token for t in image_tiles]
    cursor = [0]
    ids: list[int] = []
    labels: list[int] = []

    def add(piece: list[int], supervised: bool) -> None:
        ids.extend(piece)
        labels.extend(piece if supervised else [IGNORE_INDEX] * len(piece))

    add(tok.encode(f"<|im_start|>system\n{system}<|im_end|>\n"), False)
    for turn in turns:
        if turn["from"] == "human":
            add(tok.encode("<|im_start|>user\n"), False)
            add(_encode_user(turn["value"], tok, image_tokens, cursor), False)
            add(tok.encode("<|im_end|>\n"), False)
        else:
            add(tok.encode("<|im_start|>assistant\n"), False)
            add(tok.encode(turn["value"]) + [tok.im_end_id], True)
            add(tok.encode("\n"), False)
    return ids, labels


def tokenize_text_document(text: Any, tok: Tokenizer) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a pretraining document: all tokens then eos, all supervised."""
    if not isinstance(text, str) or not text.strip():
        raise ConversationError("malformed", "'text' is missing, empty or not a string")
    ids = tok.encode(text) + [tok.eos_id]
    return ids, list(ids)
