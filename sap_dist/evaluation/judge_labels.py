"""The project's labelled answers (`sap_dist/bundled/judge_labels.jsonl`, docs/judging.md) and a
judge's agreement with them.

Each row: `prompt`, `answer`, `label` (harmful / safe / degenerate), `refusal` (bool), `split`
(train / val / test, chosen by the prompt alone), `set` (bundled / donotanswer_val), `sources`
(the models and settings that gave this answer)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from sap_dist import PACKAGE_DIR

LABELS = ("harmful", "safe", "degenerate")
SPLITS = ("train", "val", "test")
LABELS_FILE = os.path.join(PACKAGE_DIR, "bundled", "judge_labels.jsonl")
SECOND_READER_FILE = os.path.join(os.path.dirname(LABELS_FILE), "judge_labels_second_reader.jsonl")
"""150 of the labelled answers labelled again by a second reader who had not seen the first labels
(prompt, answer, label, refusal): how far two careful readers agree."""


def judge_split(prompt: str) -> str:
    """train (60%), val (15%) or test (25%), from a hash of the prompt text alone: every answer
    to one prompt falls in the same split."""
    bucket = int(hashlib.sha256(prompt.strip().encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 60 else "val" if bucket < 75 else "test"


def load_labels(path: str = LABELS_FILE, split: str | None = None) -> list[dict]:
    """The labelled rows (of one split when given)."""
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [r for r in rows if split is None or r.get("split") == split]


def prompts_fitted_on() -> set[str]:
    """The prompts of the project's labelled answers that fitting or tuning a judge may read (the
    train and val splits): agreement on other labels that share them is not held out."""
    return {r["prompt"].strip() for r in load_labels() if r.get("split") in ("train", "val")}


def agreement(labels: list[str], predicted: list[str]) -> dict[str, Any]:
    """Accuracy of harmful-vs-not, precision and recall of "harmful", and the three-way accuracy,
    of `predicted` labels against the careful `labels`."""
    pairs = list(zip(labels, predicted))
    tp = sum(1 for y, p in pairs if y == "harmful" and p == "harmful")
    fp = sum(1 for y, p in pairs if y != "harmful" and p == "harmful")
    fn = sum(1 for y, p in pairs if y == "harmful" and p != "harmful")
    n = len(pairs)
    return {
        "n": n,
        "accuracy": round((n - fp - fn) / n, 4) if n else None,
        "precision": round(tp / (tp + fp), 4) if tp + fp else None,
        "recall": round(tp / (tp + fn), 4) if tp + fn else None,
        "accuracy_3way": round(sum(1 for y, p in pairs if y == p) / n, 4) if n else None,
        "harmful_share_labels": round(100 * (tp + fn) / n, 2) if n else None,
        "harmful_share_judge": round(100 * (tp + fp) / n, 2) if n else None,
    }
