"""Tokenizers: a sentencepiece ``.model`` file or a local transformers tokenizer directory.

Both backends behave the same way: special tokens written in the text (``<|im_start|>``,
``<img>``, ...) are split out first and map to their single ids; the text between them is
encoded by the backend without BOS or any other added token.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Callable, Sequence

SPECIAL_TOKENS: dict[str, str] = {
    "eos": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "img_start": "<img>",
    "img_end": "</img>",
    "img_context": "<IMG_CONTEXT>",
}


class TokenizerError(ValueError):
    """The tokenizer file is missing or lacks a required special token."""


class Tokenizer:
    """Uniform tokenizer over a backend ``encode_plain(text) -> ids`` / ``decode_ids(ids) -> str``.

    ``specials`` maps every special token string to its id; ``pad_id`` is the padding id.
    """

    def __init__(self, path: str, encode_plain: Callable[[str], list[int]], decode_ids: Callable[[list[int]], str],
                 vocab_size: int, specials: dict[str, int], pad_id: int) -> None:
        self.path = path
        self._encode_plain = encode_plain
        self._decode_ids = decode_ids
        self.vocab_size = int(vocab_size)
        self.specials = dict(specials)
        for name, tok in SPECIAL_TOKENS.items():
            if tok not in self.specials:
                raise TokenizerError(f"tokenizer {path}: special token {tok!r} ({name}) is missing")
        self.pad_id = int(pad_id)
        self.eos_id = self.specials[SPECIAL_TOKENS["eos"]]
        self.im_start_id = self.specials[SPECIAL_TOKENS["im_start"]]
        self.im_end_id = self.specials[SPECIAL_TOKENS["im_end"]]
        self.img_start_id = self.specials[SPECIAL_TOKENS["img_start"]]
        self.img_end_id = self.specials[SPECIAL_TOKENS["img_end"]]
        self.img_context_id = self.specials[SPECIAL_TOKENS["img_context"]]
        # Longest first so that a special token never matches a prefix of a longer one.
        alternatives = sorted(self.specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS); special tokens become their single ids."""
        ids: list[int] = []
        for piece in self._split.split(text):
            if not piece:
                continue
            special = self.specials.get(piece)
            if special is not None:
                ids.append(special)
            else:
                ids.extend(self._encode_plain(piece))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are written out as their strings."""
        by_id = {v: k for k, v in self.specials.items()}
        out: list[str] = []
        run: list[int] = []
        for i in (int(x) for x in ids):
            if i in by_id:
                if run:
                    out.append(self._decode_ids(run))
                    run = []
                out.append(by_id[i])
            else:
                run.append(i)
        if run:
            out.append(self._decode_ids(run))
        return "".join(out)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _load_sentencepiece(path: str) -> Tokenizer:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    unk = sp.unk_id()
    specials: dict[str, int] = {}
    for tok in SPECIAL_TOKENS.values():
        i = sp.piece_to_id(tok)
        if i == unk:
            raise TokenizerError(f"tokenizer {path}: special token {tok!r} is not a piece of the model")
        specials[tok] = int(i)
    pad = sp.pad_id()
    pad_id = pad if pad >= 0 else specials[SPECIAL_TOKENS["eos"]]
    return Tokenizer(path, lambda s: list(sp.encode(s, out_type=int)), lambda ids: sp.decode(ids),
                     sp.get_piece_size(), specials, pad_id)


def _load_transformers(path: str) -> Tokenizer:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    vocab = tok.get_vocab()
    specials: dict[str, int] = {}
    for s in SPECIAL_TOKENS.values():
        if s not in vocab:
            raise TokenizerError(f"tokenizer {path}: special token {s!r} is not in the vocabulary")
        specials[s] = int(vocab[s])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else specials[SPECIAL_TOKENS["eos"]]
    lock = threading.Lock()  # a fast tokenizer must not be entered by two threads at once

    def encode_plain(text: str) -> list[int]:
        with lock:
            return list(tok.encode(text, add_special_tokens=False))

    return Tokenizer(path, encode_plain,
                     lambda ids: tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
                     len(tok), specials, int(pad_id))


def load_tokenizer(path: str) -> Tokenizer:
    """Load a sentencepiece ``.model`` file or a transformers tokenizer directory (offline)."""
    if not path:
        raise TokenizerError("data.tokenizer is empty: give a sentencepiece .model file or a tokenizer directory")
    if os.path.isdir(path):
        return _load_transformers(path)
    if os.path.isfile(path):
        return _load_sentencepiece(path)
    raise TokenizerError(f"data.tokenizer={path!r}: no such file or directory")
