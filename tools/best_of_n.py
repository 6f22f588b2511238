"""Best-of-N with a visual process reward model.

For every question the policy samples N answers (batched, KV cache); the PRM scores each step
(one line of an answer) with P("+"); a candidate's score is the mean of its steps; the best
candidate is kept. Reports the accuracy of Best-of-N against Best-of-1 (the first sample)::

    python tools/best_of_n.py --policy runs/sft_tiny --prm runs/prm_tiny \\
        --data data/synthetic/prm/questions.jsonl --n 8 [--limit 50] [--out report.json]

``--policy`` / ``--prm``: an engine run directory, an engine checkpoint directory or a
transformers directory (``--policy-config`` / ``--prm-config``: an engine config YAML whose data
section applies, e.g. the training run's config.yaml). ``--data``: a JSONL file (or an InternVL meta JSON naming one) of
``{image (optional path or list), question, answer}`` records (``chosen`` is read as the answer
when ``answer`` is absent), images relative to the file's folder or ``--image-root``.
A candidate is correct when its text equals the answer (case, surrounding space and a final
period ignored, line by line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def normalize(text: str) -> str:
    lines = [line.strip().lower().rstrip(".").strip() for line in text.strip().split("\n")]
    return "\n".join(line for line in lines if line)


def read_questions(path: str, image_root: Optional[str] = None) -> list[dict[str, Any]]:
    """Records with absolute image paths; bad lines raise naming file:line."""
    root = image_root
    if path.endswith(".json"):
        with open(path) as f:
            meta = json.load(f)
        entry = next(iter(meta.values()))
        base = os.path.dirname(os.path.abspath(path))
        path = os.path.join(base, entry["annotation"])
        root = root or os.path.join(base, entry["root"])
    root = root or os.path.dirname(os.path.abspath(path))
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            answer = rec.get("answer", rec.get("chosen"))
            if not isinstance(rec.get("question"), str) or not isinstance(answer, str):
                raise ValueError(f"{path}:{n}: a record needs string 'question' and 'answer' (or 'chosen')")
            images = rec.get("image") or []
            images = [images] if isinstance(images, str) else list(images)
            out.append({"question": rec["question"], "answer": answer, "source": f"{path}:{n}",
                        "images": [p if os.path.isabs(p) else os.path.join(root, p) for p in images]})
    return out


class Scorer:
    """A model with what it needs to read prompts: tokenizer, image processor, V2PE delta."""

    def __init__(self, path: str, tokenizer_path: Optional[str], device: torch.device, config: Optional[str] = None):
        from engine.config import load_config
        from engine.data.images import ImageProcessor
        from engine.data.tokenizer import load_tokenizer
        from engine.posttrain.checkpoints import load_model

        self.model, cfg = load_model(path, device)
        if config is not None:
            cfg = load_config(config)
        self.device = device
        if tokenizer_path is None:
            tokenizer_path = cfg.data.tokenizer if cfg is not None else path
        self.tokenizer = load_tokenizer(tokenizer_path)
        if self.tokenizer.img_context_id != self.model.config.img_context_token_id:
            raise ValueError(f"tokenizer {tokenizer_path} has <IMG_CONTEXT> id {self.tokenizer.img_context_id}, the model "
                             f"at {path} expects {self.model.config.img_context_token_id}")
        d = cfg.data if cfg is not None else None
        self.processor = ImageProcessor(self.model.config.vision.image_size, d.min_dynamic_patch if d else 1,
                                        d.max_dynamic_patch if d else 12, d.use_thumbnail if d else True, 0.0)
        self.delta = d.v2pe_delta if d else self.model.config.v2pe_delta
        self.system_prompt = d.system_prompt if d else None

    def pixels(self, images: list[str]) -> tuple[Optional[torch.Tensor], list[int]]:
        from PIL import Image

        if not images:
            return None, []
        tiles = []
        for p in images:
            with Image.open(p) as im:
                tiles.append(self.processor(im.convert("RGB")))
        return torch.cat(tiles), [t.shape[0] for t in tiles]

    def prompt(self, question: str, image_tiles: list[int]) -> list[int]:
        """Tokens up to and including ``<|im_start|>assistant\\n``."""
        from engine.data.conversation import tokenize_conversation

        conv = [{"from": "human", "value": question}, {"from": "gpt", "value": "x"}]
        ids, labels = tokenize_conversation(conv, self.tokenizer, image_tiles, self.model.config.num_image_token,
                                            self.system_prompt)
        first = next(k for k, t in enumerate(labels) if t != -100)
        return ids[:first]


def best_of_n(policy: Scorer, prm: Scorer, records: list[dict], n: int, max_new_tokens: int, temperature: float,
              seed: int, plus: str = "+", minus: str = "-") -> dict[str, Any]:
    from engine.posttrain.generate import generate
    from engine.posttrain.prm import score_steps, solution_score, split_steps

    g = torch.Generator().manual_seed(seed)
    tok = policy.tokenizer
    stops = [tok.im_end_id, tok.eos_id]
    rows = []
    for rec in records:
        px, tiles = policy.pixels(rec["images"])
        emb = None
        with torch.no_grad():
            if px is not None:
                emb = policy.model.extract_feature(px.to(policy.device)).repeat(n, 1, 1)
        prompt = policy.prompt(rec["question"], tiles)
        outs = generate(policy.model, [prompt] * n, emb, max_new_tokens, temperature, stops, g, tok.pad_id, policy.delta)
        texts = [tok.decode([t for t in o if t not in stops]) for o in outs]
        steps = [split_steps(t) for t in texts]
        question = rec["question"]
        prm_px, prm_tiles = prm.pixels(rec["images"])
        step_scores = score_steps(prm.model, prm.tokenizer, question, steps, prm_px, prm_tiles, plus, minus,
                                  prm.system_prompt, prm.delta)
        scores = [solution_score(s) for s in step_scores]
        best = max(range(n), key=lambda j: scores[j])
        want = normalize(rec["answer"])
        correct = [normalize(t) == want for t in texts]
        rows.append({"source": rec["source"], "answer": rec["answer"], "candidates": texts, "step_scores": step_scores,
                     "scores": scores, "best": best, "correct": correct})
    k = max(len(rows), 1)
    return {"questions": len(rows), "n": n, "temperature": temperature,
            "best_of_n_accuracy": sum(r["correct"][r["best"]] for r in rows) / k,
            "best_of_1_accuracy": sum(r["correct"][0] for r in rows) / k,
            "mean_candidate_accuracy": sum(sum(r["correct"]) / n for r in rows) / k,
            "oracle_accuracy": sum(any(r["correct"]) for r in rows) / k,
            "details": rows}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", required=True, help="engine run/checkpoint dir or transformers dir")
    p.add_argument("--prm", required=True, help="engine run/checkpoint dir or transformers dir")
    p.add_argument("--data", required=True, help="questions JSONL (or meta JSON)")
    p.add_argument("--n", type=int, default=8, help="samples per question")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="first K questions (0 = all)")
    p.add_argument("--tokenizer", default=None, help="default: the policy run's data.tokenizer")
    p.add_argument("--prm-tokenizer", default=None, help="default: the PRM run's data.tokenizer")
    p.add_argument("--policy-config", default=None,
                   help="engine config YAML whose data section (tokenizer, tiling, system prompt, V2PE delta) "
                        "applies to the policy; default: its run's config.yaml (InternVL defaults for transformers)")
    p.add_argument("--prm-config", default=None, help="the same for the PRM")
    p.add_argument("--image-root", default=None)
    p.add_argument("--plus", default="+")
    p.add_argument("--minus", default="-")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write the full report (with every candidate) here")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n={args.n} must be >= 1")
    if args.temperature <= 0 and args.n > 1:
        p.error(f"--temperature={args.temperature}: N > 1 samples need a positive temperature")
    t0 = time.time()
    device = torch.device(args.device)
    policy = Scorer(args.policy, args.tokenizer, device, args.policy_config)
    prm = Scorer(args.prm, args.prm_tokenizer, device, args.prm_config)
    records = read_questions(args.data, args.image_root)
    if args.limit:
        records = records[: args.limit]
    report = best_of_n(policy, prm, records, args.n, args.max_new_tokens, args.temperature, args.seed, args.plus,
                       args.minus)
    report["seconds"] = round(time.time() - t0, 2)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "details"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
