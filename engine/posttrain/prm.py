"""VisualPRM: a process reward model trained on multi-turn step-by-step solutions.

Training format (InternVL conversations, one solution step per user turn, the assistant
answers each step with a label)::

    human: "<image>\\n{question}\\n{step 1}"   gpt: "+"
    human: "{step 2}"                         gpt: "-"   ...

Only the label tokens are supervised (not the assistant's end token). A step's score is
P(plus) / (P(plus) + P(minus)) at its label position; a solution's score is the mean over its
steps, and Best-of-N keeps the candidate with the highest score.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from engine.config import DataConfig, ModelConfig
from engine.data.batch import IGNORE_INDEX, Sample
from engine.data.conversation import tokenize_conversation
from engine.data.dataset import BadSample, DataError, InternVLDataset, _Prepared
from engine.data.packing import pack_samples
from engine.data.tokenizer import Tokenizer


def label_ids(tokenizer: Tokenizer, plus: str = "+", minus: str = "-") -> tuple[int, int]:
    """Token ids of the two labels; each must be a single token."""
    out = []
    for key, text in (("posttrain.prm.plus", plus), ("posttrain.prm.minus", minus)):
        ids = tokenizer.encode(text)
        if len(ids) != 1:
            raise DataError(f"{key}={text!r} is {len(ids)} tokens {ids} in tokenizer {tokenizer.path}; it must be one")
        out.append(ids[0])
    return out[0], out[1]


def keep_labels_only(labels: Sequence[int], label_set: tuple[int, int], im_end_id: int) -> list[int]:
    """Supervise only the label token of each assistant turn; every supervised run must be
    ``[label, <|im_end|>]`` (raises BadSample otherwise)."""
    out = [IGNORE_INDEX] * len(labels)
    k, turn = 0, 0
    while k < len(labels):
        if labels[k] == IGNORE_INDEX:
            k += 1
            continue
        end = k
        while end < len(labels) and labels[end] != IGNORE_INDEX:
            end += 1
        run = list(labels[k:end])
        if len(run) != 2 or run[0] not in label_set or run[1] != im_end_id:
            raise BadSample("malformed", f"assistant turn {turn} has tokens {run}: a PRM turn must be exactly one "
                                         f"label token {list(label_set)} (then <|im_end|>)")
        out[k] = run[0]
        k, turn = end, turn + 1
    return out


class PRMDataset(InternVLDataset):
    """``InternVLDataset`` whose conversations are PRM solutions: loss on the label tokens only."""

    def __init__(self, data: DataConfig, model: ModelConfig, seed: int, tokenizer: Optional[Tokenizer] = None,
                 plus: str = "+", minus: str = "-", **kwargs) -> None:
        self._label_text = (plus, minus)
        super().__init__(data, model, seed, tokenizer, **kwargs)

    def _prepare(self, kind: str, a: int, line: int) -> _Prepared:
        if not hasattr(self, "_labels"):
            self._labels = label_ids(self.tokenizer, *self._label_text)
        p = super()._prepare(kind, a, line)
        if kind == "text":
            return p
        p.labels = keep_labels_only(p.labels, self._labels, self.tokenizer.im_end_id)
        return p


def prm_conversation(question: str, steps: Sequence[str], labels: Optional[Sequence[str]] = None,
                     plus: str = "+") -> list[dict]:
    """The PRM conversation of a solution (labels default to ``plus``: placeholders for scoring)."""
    if not steps:
        raise ValueError("a solution needs at least one step")
    labels = list(labels) if labels is not None else [plus] * len(steps)
    if len(labels) != len(steps):
        raise ValueError(f"{len(steps)} steps but {len(labels)} labels")
    conv = []
    for k, (step, label) in enumerate(zip(steps, labels)):
        conv.append({"from": "human", "value": f"{question}\n{step}" if k == 0 else step})
        conv.append({"from": "gpt", "value": label})
    return conv


def split_steps(answer: str) -> list[str]:
    """Solution steps: the non-empty lines of an answer."""
    return [line.strip() for line in answer.split("\n") if line.strip()]


@torch.no_grad()
def score_steps(model, tokenizer: Tokenizer, question: str, solutions: Sequence[Sequence[str]],
                pixel_values: Optional[torch.Tensor], image_tiles: Sequence[int], plus: str = "+", minus: str = "-",
                system_prompt: Optional[str] = None, v2pe_delta: float = 1.0) -> list[list[float]]:
    """P(plus) at every step of every solution of one question (image encoded once)."""
    plus_id, minus_id = label_ids(tokenizer, plus, minus)
    device = next(model.parameters()).device
    cfg = model.config
    samples, which = [], []
    for j, steps in enumerate(solutions):
        if not steps:
            continue
        ids, labels = tokenize_conversation(prm_conversation(question, steps, plus=plus), tokenizer,
                                            list(image_tiles), cfg.num_image_token, system_prompt)
        labels = keep_labels_only(labels, (plus_id, minus_id), tokenizer.im_end_id)
        light = None if pixel_values is None else pixel_values[:, :0]
        samples.append(Sample(torch.tensor(ids), torch.tensor(labels), light, list(image_tiles)))
        which.append(j)
    out: list[list[float]] = [[] for _ in solutions]
    if not samples:
        return out
    batch = pack_samples(samples, max(s.num_tokens for s in samples), cfg.img_context_token_id, "token",
                         deltas=[[v2pe_delta] * len(image_tiles) for _ in samples]).to(device)
    feats = None
    if pixel_values is not None and sum(image_tiles):
        one = model.extract_feature(pixel_values.to(device))
        feats = one.repeat(len(samples), 1, 1)
    lm = model.language_model
    h = model.embed(batch.input_ids, feats, batch.image_tiles, batch.cu_seqlens)
    h = lm.norm(lm.forward_layers(h, model.sequence_context(batch.input_ids, batch.position_ids, batch.cu_seqlens)))
    where = (batch.targets != IGNORE_INDEX).reshape(-1).nonzero().flatten()
    logits = lm.lm_head(h.reshape(-1, h.shape[-1])[where]).float()
    p_plus = torch.softmax(logits[:, [plus_id, minus_id]], dim=-1)[:, 0].cpu().tolist()
    # label positions come in packed order: the segment of each gives its sample
    segment = torch.searchsorted(batch.cu_seqlens[1:].long().cpu(), where.cpu(), right=True).tolist()
    sample_of_segment = _packed_order(samples, batch)
    for seg, p in zip(segment, p_plus):
        out[which[sample_of_segment[seg]]].append(p)
    return out


def _packed_order(samples: Sequence[Sample], batch) -> list[int]:
    """Sample position of every segment of a packed batch (-1 for padding segments)."""
    from engine.data.packing import first_fit

    rows = first_fit([s.num_tokens for s in samples], max(s.num_tokens for s in samples))
    S = batch.input_ids.shape[1]
    out = []
    for row in rows:
        out.extend(row)
        if sum(samples[k].num_tokens for k in row) < S:
            out.append(-1)
    return out


def solution_score(step_scores: Sequence[float]) -> float:
    """Mean step score (0 for a solution without steps)."""
    return float(sum(step_scores) / len(step_scores)) if step_scores else 0.0
