"""Collect answers to harmful prompts from many models, for labelling by careful reading.

    python scripts/make_judge_corpus.py --out runs/judge_corpus [--experiment runs/corpus ...]
        [--model NAME_OR_DIR ...] [--long-model NAME_OR_DIR ...] [--tokens 16] [--long-tokens 48]

Only prompts a judge may be built on are used: the bundled held-out harmful prompts
(`builtin:harmful_eval`) and DoNotAnswer's validation half (`builtin:donotanswer_val`); never the
test half. Answers come from
- every finished run of the given experiment directories (its `eval.json`: the bundled answers
  and the independent set's, which must then be the validation half),
- greedy generation by each `--model` (a model name or a trainer output directory) at `--tokens`
  new tokens, and by each `--long-model` at `--long-tokens`.

Each distinct (prompt, answer) pair is written once to OUT/pool.jsonl with the runs it came from
(`sources`), its prompt set, and a `split` chosen by the prompt alone (`judge_split`), so that no
prompt is in two splits. Nothing here judges: the pool carries no verdict, so labelling is blind.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ALLOWED_SETS = {"builtin:harmful_eval": "bundled", "builtin:donotanswer_val": "donotanswer_val"}


def experiment_answers(exp_dir: str) -> list[dict]:
    """(prompt, answer, set, source) rows from every run's eval.json under `exp_dir`."""
    rows = []
    for path in sorted(glob.glob(os.path.join(exp_dir, "runs", "*", "*", "seed*", "eval.json"))):
        with open(path) as fh:
            saved = json.load(fh)
        run = saved["row"]
        source = f"{run['setting']}/{run['method']}/seed{run['seed']}/lr{run['learning_rate']:g}/16tok"
        for item in saved["results"].get("harmful", []):
            rows.append({"prompt": item["prompt"], "answer": item["answer"], "set": "bundled", "source": source})
        for item in saved["results"].get("independent", []):
            if "risk_area" not in item:
                continue
            rows.append({"prompt": item["prompt"], "answer": item["answer"], "set": "donotanswer_val",
                         "source": source, "risk_area": item["risk_area"]})
    return rows


def generated_answers(model_ref: str, tokens: int, batch_size: int) -> list[dict]:
    """Greedy answers of `model_ref` to both allowed prompt sets."""
    from sap_dist.evaluation.evaluate import base_of_run, generate, load_for_eval, load_prompts

    is_run = os.path.isfile(os.path.join(model_ref, "config.yaml"))
    base = base_of_run(model_ref) if is_run else model_ref
    model, tokenizer = load_for_eval(base, model_ref if is_run else None, "bf16")
    name = os.path.relpath(model_ref) if os.path.isdir(model_ref) else model_ref
    rows = []
    for source, set_name in ALLOWED_SETS.items():
        prompts = load_prompts(source)
        answers = generate(model, tokenizer, [[{"role": "user", "content": p["prompt"]}] for p in prompts],
                           tokens, batch_size, f"{name} {set_name}")
        for p, a in zip(prompts, answers):
            rows.append({"prompt": p["prompt"], "answer": a, "set": set_name, "source": f"{name}/{tokens}tok",
                         **({"risk_area": p["risk_area"]} if "risk_area" in p else {})})
    return rows


def check_allowed(rows: list[dict]) -> None:
    """Refuse any prompt outside the allowed sets (the test half above all)."""
    from sap_dist.evaluation.evaluate import load_prompts

    allowed = {p["prompt"] for source in ALLOWED_SETS for p in load_prompts(source)}
    bad = sorted({r["prompt"] for r in rows} - allowed)
    if bad:
        raise SystemExit(f"make_judge_corpus: {len(bad)} prompts are not in {', '.join(ALLOWED_SETS)}, "
                         f"e.g. {bad[0]!r} (an experiment judged on the test half?)")


def main(argv: list[str] | None = None) -> int:
    from sap_dist.evaluation.judge_labels import judge_split

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--experiment", action="append", default=[])
    p.add_argument("--model", action="append", default=[])
    p.add_argument("--long-model", action="append", default=[])
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--long-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)

    rows = [r for d in args.experiment for r in experiment_answers(d)]
    rows += [r for m in args.model for r in generated_answers(m, args.tokens, args.batch_size)]
    rows += [r for m in args.long_model for r in generated_answers(m, args.long_tokens, args.batch_size)]
    check_allowed(rows)
    pool: dict[tuple[str, str], dict] = {}
    for r in rows:
        key = (r["prompt"], r["answer"])
        if key not in pool:
            pool[key] = {k: v for k, v in r.items() if k != "source"} | {"sources": [], "split": judge_split(r["prompt"])}
        pool[key]["sources"].append(r["source"])
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, "pool.jsonl")
    with open(out, "w") as fh:
        for i, item in enumerate(pool.values()):
            fh.write(json.dumps({"id": i, **item}) + "\n")
    print(f"{len(rows)} answers, {len(pool)} distinct pairs -> {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
