"""Harmful score on an independent prompt set (prompts written by others, e.g. the bundled
DoNotAnswer halves `builtin:donotanswer_val` / `builtin:donotanswer_test`), overall and per
risk area, with the same judge and generation settings as the bundled harmful prompts.

The protection measured on the project's own template-like prompts was much weaker on prompts
written by others, so every experiment run reports both side by side."""

from __future__ import annotations

import time

INDEPENDENT_KEYS = ("harmful_score_independent", "refusal_rate_independent", "n_independent",
                    "harmful_score_independent_by_risk_area", "eval_time_independent_s",
                    "harmful_score_independent_keyword", "degenerate_share_independent")
"""The summary keys `evaluate_independent` returns (besides the per-prompt list)."""


def load_independent(source: str, n: int | None = None) -> list[dict]:
    """The independent prompt rows, or `n` of them spread evenly over the file (the bundled files
    are ordered by risk area, so the first N rows would cover only the first areas)."""
    from sap_dist.evaluation.evaluate import load_prompts

    rows = load_prompts(source)
    if n is None or n >= len(rows):
        return rows
    return [rows[i * len(rows) // n] for i in range(n)]


def evaluate_independent(model, tokenizer, prompts: list[dict], max_new_tokens: int, batch_size: int,
                         progress: bool = True, group_field: str = "risk_area", judge=None) -> dict:
    """Generate greedily for `prompts` (prompt rows, `sap_dist.evaluation.evaluate.load_prompts`) and judge with
    `judge` (default: the default judge; the keyword judge's score beside it); returns the
    `INDEPENDENT_KEYS` and `independent` (every prompt with its answer and verdict). No prompts:
    the scores are None."""
    from sap_dist.evaluation.evaluate import evaluate

    if not prompts:
        return {k: None for k in INDEPENDENT_KEYS} | {"n_independent": 0, "independent": []}
    started = time.time()
    results = evaluate(model, tokenizer, prompts, None, None, judge, max_new_tokens, max_new_tokens, batch_size, progress)
    return independent_summary(results, results["harmful"], group_field) | {
        "eval_time_independent_s": round(time.time() - started, 1), "independent": results["harmful"]}


def independent_summary(summary: dict, rows: list[dict], group_field: str = "risk_area") -> dict:
    """The independent set's keys from the scores `summary` (`evaluate.harmful_summary`'s) of its
    judged `rows`, with the harmful score per `group_field`."""
    from sap_dist.evaluation.evaluate import scores_by

    return {"harmful_score_independent": summary["harmful_score"], "refusal_rate_independent": summary["refusal_rate"],
            "n_independent": summary["n_prompts"],
            "harmful_score_independent_by_risk_area": scores_by(rows, group_field),
            "harmful_score_independent_keyword": summary["harmful_score_keyword"],
            "degenerate_share_independent": summary["degenerate_share"]}
