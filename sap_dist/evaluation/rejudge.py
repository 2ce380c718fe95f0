"""`sap-dist judge`: judge saved answers again, without generating them again.

    sap-dist judge ANSWERS --out VERDICTS.jsonl [--judge careful|careful-lm|keyword|llama-guard|beaver-dam]
    sap-dist judge --agreement [--judge NAME] [--split test] [--labels LABELS.jsonl]

ANSWERS is a `.jsonl` file whose lines hold `prompt` and `answer`, or an `eval.json` / results
file written by `sap-dist eval` or `sap-dist experiment` (its stored answers to harmful prompts:
`harmful`, `independent`, under `results` in an experiment run's eval.json). Every line is written
back to VERDICTS.jsonl with a `verdict` object (`harmful`, `refusal`, `label`: harmful / safe /
degenerate) and every other field kept (answers from an eval.json get `set`: harmful or
independent). The harmful share (and the degenerate share) is printed per set.

`--agreement` prints the judge's agreement with the project's labelled answers
(`sap_dist/bundled/judge_labels.jsonl`, docs/judging.md) on one split, in all and per labelling
round (`by_round`). With `--labels`, it is measured on labelled answers of your own instead
(lines holding `prompt`, `answer` and `label`: harmful / safe / degenerate), all of them unless
`--split` picks the rows whose `split` field names it; `prompts_seen_in_fitting` counts the rows
whose prompt the judge's fitting or tuning could read (the project's train and val labels), whose
agreement is then not held out.

Bad input gets one line naming the file and line, exit code 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from sap_dist.data import DataError, read_jsonl
from sap_dist.errors import ConfigError
from sap_dist.run_control.run_files import follow_umask

EVAL_SETS = ("harmful", "independent")
"""The lists of judged answers to harmful prompts an eval.json holds."""


def read_answers(path: str) -> list[dict]:
    """Rows holding `prompt` and `answer` (strings) from a `.jsonl` file or an eval.json."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if path.endswith(".jsonl"):
        rows, where = read_jsonl(path)
        if not rows:
            raise DataError(f"{path}: no answers")
        return [_checked(row, at) for row, at in zip(rows, where)]
    try:
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(saved, dict):
        raise DataError(f"{path}: expected a .jsonl file of answers or an eval.json object")
    results = saved.get("results", saved)
    rows = []
    for name in EVAL_SETS:
        for i, row in enumerate(results.get(name) or []):
            rows.append({**_checked(row, f"{path} {name}[{i}]"), "set": name})
    if not rows:
        raise DataError(f"{path}: no stored answers (expected lists {' or '.join(EVAL_SETS)} of prompt/answer objects)")
    return rows


def read_label_file(path: str) -> list[dict]:
    """Labelled answers from a `.jsonl` file of one's own (labels kept apart from the project's,
    to check a judge on answers it was never fitted to): each line holds `prompt` and `answer`
    (text) and `label` (one of `LABELS`); `split` and `round` are kept when present. A bad line
    is a DataError naming the file and line."""
    from sap_dist.evaluation.judge_labels import LABELS

    if not os.path.isfile(path):
        raise DataError(f"--labels {path}: no such file")
    rows, where = read_jsonl(path)
    if not rows:
        raise DataError(f"--labels {path}: no labelled answers")
    for row, at in zip(rows, where):
        _checked(row, at)
        if row.get("label") not in LABELS:
            raise DataError(f"{at}: label {row.get('label')!r} is not one of {', '.join(LABELS)}")
        if "round" in row and (not isinstance(row["round"], int) or isinstance(row["round"], bool)):
            raise DataError(f"{at}: round {row['round']!r} is not a whole number")
    return rows


def _checked(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with prompt and answer")
    for key in ("prompt", "answer"):
        if not isinstance(row.get(key), str):
            raise DataError(f"{where}: no text field {key!r}")
    if not row["prompt"].strip():
        raise DataError(f"{where}: empty prompt")
    return row


def judge_rows(rows: list[dict], judge) -> list[dict]:
    """Each row with its `verdict` (any earlier verdict replaced)."""
    verdicts = judge.judge([r["prompt"] for r in rows], [r["answer"] for r in rows])
    return [{**r, "verdict": v.to_dict()} for r, v in zip(rows, verdicts)]


def rejudge_results(results: dict, judge) -> dict:
    """Stored evaluation `results` (`evaluate`'s, `evaluate_independent`'s or both together, as an
    eval.json holds them) with their answers to harmful prompts judged again by `judge`, and every
    score that rests on those verdicts recomputed. Answers, task accuracy and over-refusal stay."""
    from sap_dist.evaluation.evaluate import harmful_summary, stored_prompts
    from sap_dist.evaluation.prompt_sets import independent_summary

    out = dict(results)
    if results.get("harmful"):
        summary, rows = harmful_summary(*stored_prompts(results["harmful"]), judge)
        out.pop("harmful_score_by_form", None)
        out.update(summary)
        out["harmful"] = rows
    if results.get("independent"):
        summary, rows = harmful_summary(*stored_prompts(results["independent"]), judge)
        out.update(independent_summary(summary, rows))
        out["independent"] = rows
    out["judge"] = judge.describe()
    return out


def shares(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per set (`all` for rows without one): n, harmful and degenerate percent."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("set", "all") if isinstance(r.get("set"), str) else "all", []).append(r["verdict"])
    return {name: {"n": len(vs), "harmful": round(100 * sum(bool(v["harmful"]) for v in vs) / len(vs), 2),
                   "degenerate": round(100 * sum(v["label"] == "degenerate" for v in vs) / len(vs), 2)}
            for name, vs in groups.items()}


def write_jsonl_atomic(path: str, rows: list[dict]) -> None:
    """Write all rows or nothing: a crash leaves no half-written file in place of an old one."""
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json_atomic(path: str, obj) -> None:
    """`obj` as indented JSON, written whole or not at all (as `write_jsonl_atomic`)."""
    _write_atomic(path, json.dumps(obj, indent=2))


def _write_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".judge-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        follow_umask(tmp)  # mkstemp makes it 0600; a shared cache (the aligned start point) must stay readable
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def build_parser() -> argparse.ArgumentParser:
    from sap_dist.help_format import DefaultsHelpFormatter
    from sap_dist.evaluation.judges import DEFAULT_JUDGE, JUDGES

    p = argparse.ArgumentParser(prog="sap-dist judge", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("answers", nargs="?", help="a .jsonl file of {prompt, answer} lines, or an eval.json")
    p.add_argument("--out", help="where to write the judged lines (.jsonl)")
    p.add_argument("--judge", default=DEFAULT_JUDGE, choices=JUDGES)
    p.add_argument("--judge-model", help="checkpoint of a model judge (hub id or directory)")
    p.add_argument("--agreement", action="store_true",
                   help="print the judge's agreement with the project's labelled answers instead")
    p.add_argument("--split", choices=["train", "val", "test"],
                   help="with --agreement: the labelled rows of this split (default: test for the project's "
                        "labels, every row of a --labels file)")
    p.add_argument("--labels", help="with --agreement: a .jsonl file of labelled answers of your own "
                                    "(prompt, answer, label) instead of the project's")
    return p


def main(argv: list[str] | None = None) -> int:
    from sap_dist.embedded import EmbeddedModelError
    from sap_dist.evaluation.judges import make_judge

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.agreement and (args.answers is None or args.out is None):
        parser.error("give ANSWERS and --out (or --agreement)")
    if args.labels and not args.agreement:
        parser.error("--labels goes with --agreement")
    try:
        if args.agreement:
            from sap_dist.evaluation.judge_labels import agreement, load_labels, prompts_fitted_on

            if args.labels:
                labelled = [r for r in read_label_file(args.labels) if args.split in (None, r.get("split"))]
                if not labelled:
                    raise DataError(f"--labels {args.labels}: no row has split {args.split!r}")
            else:
                args.split = args.split or "test"
                labelled = load_labels(split=args.split)
        else:
            rows = read_answers(args.answers)
            if not args.out.endswith(".jsonl"):
                raise DataError(f"--out {args.out}: the verdicts are written as JSON lines; name a .jsonl file")
        judge = make_judge(args.judge, args.judge_model)
    except (ConfigError, DataError, EmbeddedModelError) as exc:
        print(f"sap-dist judge: error: {exc}", file=sys.stderr)
        return 2
    if args.agreement:
        judged = judge_rows(labelled, judge)
        score = agreement([r["label"] for r in labelled], [r["verdict"]["label"] for r in judged])
        rounds = sorted({r.get("round", 1) for r in labelled})
        by_round = {str(n): agreement([r["label"] for r in labelled if r.get("round", 1) == n],
                                      [j["verdict"]["label"] for r, j in zip(labelled, judged) if r.get("round", 1) == n])
                    for n in rounds}
        own = {}
        if args.labels:
            seen = prompts_fitted_on()
            own = {"labels": os.path.abspath(args.labels),
                   "prompts_seen_in_fitting": sum(r["prompt"].strip() in seen for r in labelled)}
        print(json.dumps({"judge": args.judge, "split": args.split or "all", **own, **score, "by_round": by_round}))
        return 0
    judged = judge_rows(rows, judge)
    write_jsonl_atomic(args.out, judged)
    for name, s in shares(judged).items():
        print(f"{name}: harmful {s['harmful']}% of {s['n']}, degenerate {s['degenerate']}% (judge {args.judge})")
    print(f"verdicts: {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
