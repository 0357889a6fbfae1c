"""Generative evaluation: greedy answers scored by normalised exact match or VQA accuracy."""

from __future__ import annotations

import re
import string
from typing import Any

import torch
from torch.utils.data import Dataset

from adapterdb.trainers.runtime import Runtime, on_device

MAX_NEW_TOKENS = 16
BATCH = 16
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """VQA-style answer normalisation: lower case, no punctuation or articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def score(prediction: str, answer: str | list[str]) -> float:
    """Exact match for one answer; VQA accuracy min(#annotators agreeing / 3, 1) for a list."""
    pred = normalize(prediction)
    if isinstance(answer, list):
        return min(sum(normalize(a) == pred for a in answer) / 3.0, 1.0)
    return float(pred == normalize(answer))


def prompts(rt: Runtime, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Question-only inputs, left-padded so generation continues every row at the same place."""
    pre = rt.loaded.preprocessor
    tokenizer = getattr(pre, "tokenizer", pre)
    tokenizer.padding_side = "left"
    questions = [item["question"] for item in items]
    if rt.loaded.kind == "vision-to-text":
        images = [item["image"] for item in items] if "image" in items[0] else None
        return dict(pre(text=questions, images=images, padding=True, return_tensors="pt"))
    return dict(tokenizer(questions, padding=True, return_tensors="pt"))


def answers(rt: Runtime, items: list[dict[str, Any]]) -> list[str]:
    pre = rt.loaded.preprocessor
    tokenizer = getattr(pre, "tokenizer", pre)
    inputs = on_device(prompts(rt, items), rt.loaded.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = rt.peft.generate(
        **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=pad
    )
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def exact_match(rt: Runtime, dataset: Dataset) -> float:
    """Mean score of greedy answers over a split with `question` and `answer` columns."""
    rt.peft.eval()
    total, n = 0.0, len(dataset)  # type: ignore[arg-type]
    with torch.no_grad():
        for start in range(0, n, BATCH):
            items = [dataset[i] for i in range(start, min(start + BATCH, n))]
            for pred, item in zip(answers(rt, items), items, strict=True):
                total += score(pred, item["answer"])
    return total / n if n else 0.0
