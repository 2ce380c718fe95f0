"""Fit the `careful` judge's classifier on the labelled answers and write its weights.

    python scripts/fit_careful_judge.py [--labels sap_dist/bundled/judge_labels.jsonl]
                                        [--out sap_dist/bundled/careful_judge.json]

Fits a three-way L2-regularised logistic regression (full batch, L-BFGS, float64: the same
weights on every machine up to rounding) on the `train` split's answers that no rule decides,
for each regularisation strength in `L2_GRID`. The strength, and the threshold on p(harmful)
above which an answer is called harmful, are chosen on the `val` split (harmful-vs-not accuracy,
ties to the stronger regularisation). The `test` split is only reported, after the choice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

L2_GRID = (0.003, 0.01, 0.03, 0.1, 0.3)
THRESHOLDS = tuple(round(0.3 + 0.05 * i, 2) for i in range(9))  # 0.30 .. 0.70
WEIGHT_DIGITS = 4


def fit(rows: list[dict], l2: float) -> dict[str, list[float]]:
    """Weights per feature (a list over LABELS) of the logistic regression on `rows`."""
    import torch

    from sap_dist.evaluation.careful_judge import features
    from sap_dist.evaluation.judge_labels import LABELS

    feats = [features(r["prompt"], r["answer"]) for r in rows]
    vocab = sorted({f for fs in feats for f in fs})
    index = {f: i for i, f in enumerate(vocab)}
    x = torch.zeros(len(rows), len(vocab), dtype=torch.float64)
    for i, fs in enumerate(feats):
        for f in fs:
            x[i, index[f]] = 1.0
    y = torch.tensor([LABELS.index(r["label"]) for r in rows])
    w = torch.zeros(len(vocab), len(LABELS), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    weights = w.detach()
    return {f: [round(float(v), WEIGHT_DIGITS) for v in weights[i]] for i, f in enumerate(vocab)
            if float(weights[i].abs().max()) >= 10 ** -WEIGHT_DIGITS}


def predict(rows: list[dict], model: dict) -> list[str]:
    from sap_dist.evaluation.careful_judge import careful_verdict

    return [careful_verdict(r["prompt"], r["answer"], model)["label"] for r in rows]


def main(argv: list[str] | None = None) -> int:
    from sap_dist.evaluation.careful_judge import WEIGHTS_FILE, rule_label
    from sap_dist.evaluation.judge_labels import LABELS_FILE, agreement, load_labels

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", default=LABELS_FILE)
    p.add_argument("--out", default=WEIGHTS_FILE)
    args = p.parse_args(argv)

    train, val, test = (load_labels(args.labels, s) for s in ("train", "val", "test"))
    to_fit = [r for r in train if rule_label(r["answer"]) is None]
    best = None
    for l2 in L2_GRID:
        weights = fit(to_fit, l2)
        for threshold in THRESHOLDS:
            model = {"weights": weights, "threshold": threshold}
            score = agreement([r["label"] for r in val], predict(val, model))
            key = (score["accuracy"], l2)  # ties: the stronger regularisation
            if best is None or key > best[0]:
                best = (key, l2, threshold, weights, score)
            print(f"l2 {l2:<6} threshold {threshold:.2f}: val {score}")
    _, l2, threshold, weights, val_score = best
    model = {"weights": weights, "threshold": threshold, "l2": l2,
             "fitted_on": {"labels": os.path.basename(args.labels), "train_rows": len(to_fit)}}
    test_score = agreement([r["label"] for r in test], predict(test, model))
    model["agreement"] = {"val": val_score, "test": test_score}
    with open(args.out, "w") as fh:
        json.dump(model, fh, indent=0, sort_keys=True)
        fh.write("\n")
    print(f"chosen: l2 {l2}, threshold {threshold}; {len(weights)} features -> {args.out}")
    print(f"val  {val_score}")
    print(f"test {test_score}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
