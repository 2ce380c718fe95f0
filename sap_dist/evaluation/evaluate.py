"""`sap-dist eval`: generate greedy answers and measure harmfulness, over-refusal and task accuracy.

    sap-dist eval --model M [--adapter DIR] --harmful-prompts FILE [--benign-prompts FILE]
                  [--task-data FILE] [--judge careful|careful-lm|keyword|llama-guard|beaver-dam] [--max-new-tokens N]
                  [--limit N] --out results.json

Prompt files: `.txt` (one prompt per line), `.jsonl` / `.json` (objects with a `prompt` field, or
the field named by `--prompt-field`; a `.json` file may also be a list of strings), `.csv` (a
header row with that column). The bundled sets are `builtin:harmful_eval`, `builtin:harmful_train`,
`builtin:benign_eval` and `builtin:benign_train` (sap_dist/bundled/SOURCES.md).

Every prompt is rendered with the model's chat template (`sap_dist.data.render_prompt`, the same as
training), batched with left padding, and answered greedily. `results.json` holds:
- `harmful_score`: percent of harmful prompts whose answer the judge calls harmful (default judge
  `careful-lm`, docs/judging.md),
- `degenerate_share`: percent whose answer is degenerate (empty, gibberish, unrelated): neither
  harm nor protection,
- `harmful_score_keyword`: the keyword judge's harmful score beside it (the literature's keyword ASR),
- `harmful_score_by_form`: the harmful score per request form (joke, steps, fiction, ...), when the
  prompts carry a `form` (the bundled ones do),
- `refusal_rate`: percent of harmful prompts refused (the judge's refusal flag),
- `over_refusal`: percent of benign prompts refused (keyword markers), when benign prompts are given,
- `task_accuracy`: percent exact match (`exact_match`) on task data, when given (per subtask too),
- `judge`, `n_prompts`, `n_benign`, `n_task`, the generation settings, and every prompt with its
  answer and verdict.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import string
import sys
import time
from typing import Any

import torch
from tqdm import tqdm

from sap_dist.data import BUILTIN_DIR, DataError
from sap_dist.errors import ConfigError

BUILTIN_PROMPTS = {
    "builtin:harmful_eval": "harmful_eval.jsonl",
    "builtin:harmful_train": "harmful_train.jsonl",
    "builtin:benign_eval": "benign_eval.jsonl",
    "builtin:benign_train": "benign_train.jsonl",
    # written by others (DoNotAnswer), evaluation only: validation half for choosing settings,
    # test half for reported numbers (scripts/make_independent_data.py, SOURCES.md)
    "builtin:donotanswer_val": "donotanswer_val.jsonl",
    "builtin:donotanswer_test": "donotanswer_test.jsonl",
}
PROMPT_EXTENSIONS = (".txt", ".jsonl", ".json", ".csv")


# ------------------------------------------------------------------------------------------
# Prompt files


def load_prompts(source: str, prompt_field: str = "prompt", limit: int | None = None) -> list[dict]:
    """Rows `{"prompt": text, ...other fields}` from a prompt file (see the module docstring) or
    a bundled set. Blank `.txt`/`.jsonl` lines are skipped; a row without the prompt field, or
    with an empty one, is an error naming the file and line/row. `limit` keeps the first N."""
    path = os.path.join(BUILTIN_DIR, BUILTIN_PROMPTS[source]) if source in BUILTIN_PROMPTS else source
    if source.startswith("builtin:") and source not in BUILTIN_PROMPTS:
        raise DataError(f"unknown bundled prompt set {source!r}; available: {', '.join(BUILTIN_PROMPTS)}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in PROMPT_EXTENSIONS:
        raise DataError(f"{source}: unsupported prompt file type {ext or '(no extension)'!r}; "
                        f"use one of {', '.join(PROMPT_EXTENSIONS)}")
    if not os.path.isfile(path):
        raise DataError(f"prompt file not found: {source}")
    rows: list[dict] = []
    if ext == ".txt":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                text = line.rstrip("\n").rstrip("\r")
                if text.strip():
                    rows.append({"prompt": text.strip()})
    elif ext == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{source} line {lineno}: not valid JSON ({e.msg})") from None
                rows.append(_prompt_row(item, prompt_field, f"{source} line {lineno}"))
    elif ext == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{source} line {e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{source}: expected a JSON list (of strings or objects) or {{\"data\": [...]}}")
        rows = [_prompt_row(item, prompt_field, f"{source} item {i}") for i, item in enumerate(data)]
    else:  # .csv
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or prompt_field not in reader.fieldnames:
                raise DataError(f"{source}: no column {prompt_field!r} (columns: {', '.join(reader.fieldnames or [])}); "
                                f"name the prompt column with --prompt-field")
            for rowno, item in enumerate(reader, start=1):
                rows.append(_prompt_row(item, prompt_field, f"{source} row {rowno}"))
    if not rows:
        raise DataError(f"{source}: no prompts found")
    return rows[:limit] if limit else rows


def _prompt_row(item: Any, field: str, where: str) -> dict:
    if isinstance(item, str):
        item = {field: item}
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object or a string, got {type(item).__name__}")
    if field not in item:
        raise DataError(f"{where}: no field {field!r} (fields: {', '.join(map(str, item)) or 'none'}); "
                        f"name the prompt field with --prompt-field")
    text = item[field]
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: field {field!r} is empty or not text")
    row = {k: v for k, v in item.items() if k != field}
    return {"prompt": text.strip(), **row}


# ------------------------------------------------------------------------------------------
# The metric


_PUNCT = string.punctuation + "\u201c\u201d\u2018\u2019"


def normalise_answer(text: str) -> str:
    """What exact match compares: the first non-empty line, lower-cased, whitespace collapsed,
    surrounding quotes/punctuation stripped ("Positive." == "positive")."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return re.sub(r"\s+", " ", first).strip().strip(_PUNCT).strip().lower()


def exact_match(prediction: str, reference: str) -> bool:
    """Exact match after `normalise_answer` on both sides (an empty reference never matches)."""
    ref = normalise_answer(reference)
    return bool(ref) and normalise_answer(prediction) == ref


# ------------------------------------------------------------------------------------------
# Generation


def _contiguous_input(module, args):
    return tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)


@torch.no_grad()
def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64, batch_size: int = 32,
             desc: str = "generate", progress: bool = True) -> list[str]:
    """Greedy answers to chat `conversations` (lists of messages), in their order.

    Prompts are rendered with `render_prompt` (as in training), sorted by length to keep padding
    small, left-padded, and decoded without special tokens. The model is put in eval mode with the
    KV cache on and restored afterwards."""
    from sap_dist.data import prompt_ids

    if not conversations:
        return []
    ids = [prompt_ids(tokenizer, messages) for messages in conversations]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    config = getattr(model, "config", None)
    old_cache = getattr(config, "use_cache", None)
    model.eval()
    if config is not None:
        config.use_cache = True
    answers: list[str] = [""] * len(ids)
    # While generating, transformers hands the output layer the last position's hidden states as a
    # non-contiguous [B, 1, H] slice. torch.matmul folds that into one matrix product only when the
    # weight requires grad; for a frozen output layer (every LoRA run) it expands the whole
    # vocabulary weight per row instead (a 5.7 GB copy at 100 prompts, 87% of judging time).
    # A contiguous input takes the single matrix product.
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    contiguous_hook = (output_layer.register_forward_pre_hook(_contiguous_input)
                       if output_layer is not None else None)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch"):
            chunk = order[start:start + batch_size]
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):  # left padding: the answers start at the same column
                input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
                mask[row, width - len(ids[i]):] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                 temperature=None, top_p=None, top_k=None)
            for row, i in enumerate(chunk):
                answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    finally:
        if contiguous_hook is not None:
            contiguous_hook.remove()
        if config is not None and old_cache is not None:
            config.use_cache = old_cache
        model.train(was_training)
    return answers


# ------------------------------------------------------------------------------------------
# Evaluation


def _pct(k: float, n: int) -> float | None:
    return round(100.0 * k / n, 2) if n else None


def evaluate(model, tokenizer, harmful: list[dict], benign: list[dict] | None = None,
             task: list[dict] | None = None, judge=None, max_new_tokens: int = 64, task_max_new_tokens: int = 16,
             batch_size: int = 32, progress: bool = True) -> dict:
    """Generate and judge. `harmful`/`benign` are prompt rows (`load_prompts`), `task` rows
    `{"messages", "reference", ...}` (`load_task_rows`). Returns the results dict (module doc)."""
    from sap_dist.evaluation.judges import is_refusal, make_judge

    judge = judge or make_judge()
    started = time.time()
    results: dict[str, Any] = {"judge": judge.describe()}
    conv = lambda rows: [[{"role": "user", "content": r["prompt"]}] for r in rows]  # noqa: E731

    answers = generate(model, tokenizer, conv(harmful), max_new_tokens, batch_size, "harmful prompts", progress)
    summary, rows = harmful_summary(harmful, answers, judge)
    results.update(summary)
    per_prompt = {"harmful": rows}

    if benign:
        answers = generate(model, tokenizer, conv(benign), max_new_tokens, batch_size, "benign prompts", progress)
        refusals = [is_refusal(a) for a in answers]
        results.update({"over_refusal": _pct(sum(refusals), len(benign)), "n_benign": len(benign)})
        per_prompt["benign"] = [{**r, "answer": a, "refusal": f} for r, a, f in zip(benign, answers, refusals)]
    else:
        results.update({"over_refusal": None, "n_benign": 0})

    if task:
        answers = generate(model, tokenizer, [r["messages"] for r in task], task_max_new_tokens, batch_size,
                           "task", progress)
        correct = [exact_match(a, r["reference"]) for a, r in zip(answers, task)]
        results.update({"task_accuracy": _pct(sum(correct), len(task)), "n_task": len(task)})
        groups: dict[str, list[bool]] = {}
        for r, c in zip(task, correct):
            if r.get("subtask"):
                groups.setdefault(r["subtask"], []).append(c)
        if groups:
            results["task_accuracy_by_subtask"] = {k: _pct(sum(v), len(v)) for k, v in sorted(groups.items())}
        per_prompt["task"] = [{"prompt": r["messages"][-1]["content"], "reference": r["reference"], "answer": a,
                               "correct": c, **({"subtask": r["subtask"]} if r.get("subtask") else {})}
                              for r, a, c in zip(task, answers, correct)]
    else:
        results.update({"task_accuracy": None, "n_task": 0})

    results["generation"] = {"decoding": "greedy", "max_new_tokens": max_new_tokens,
                             "task_max_new_tokens": task_max_new_tokens, "batch_size": batch_size}
    results["eval_time_s"] = round(time.time() - started, 1)
    results.update(per_prompt)
    return results


def scores_by(rows: list[dict], field: str) -> dict[str, float]:
    """Percent of judged prompt rows (`{field: ..., "verdict": {"harmful": ...}}`) that are
    harmful, per value of `field` (rows without it are left out)."""
    groups: dict[str, list[bool]] = {}
    for row in rows:
        if isinstance(row.get(field), str):
            groups.setdefault(row[field], []).append(bool(row["verdict"]["harmful"]))
    return {k: round(100.0 * sum(v) / len(v), 2) for k, v in sorted(groups.items())}


def harmful_summary(rows: list[dict], answers: list[str], judge) -> tuple[dict[str, Any], list[dict]]:
    """`judge_answers`' scores of `answers` to the harmful prompt rows `rows`, with the score per
    request form when the rows carry one (the bundled prompts do), and the judged rows."""
    judged = judge_answers(rows, answers, judge)
    summary = {k: v for k, v in judged.items() if k != "rows"}
    by_form = scores_by(judged["rows"], "form")
    if by_form:
        summary["harmful_score_by_form"] = by_form
    return summary, judged["rows"]


JUDGED_FIELDS = ("answer", "verdict", "keyword_harmful")
"""What judging adds to a prompt row; the rest of a stored row is the prompt row itself."""


def stored_prompts(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """The prompt rows and answers of judged rows as `evaluate` stores them (to judge them again)."""
    return [{k: v for k, v in r.items() if k not in JUDGED_FIELDS} for r in rows], [r["answer"] for r in rows]


def judge_answers(rows: list[dict], answers: list[str], judge) -> dict[str, Any]:
    """Judge `answers` to the prompt rows `rows`: the harmful score, refusal rate and degenerate
    share under `judge`, the keyword judge's harmful score beside it (the literature's keyword
    ASR, unless `judge` is the keyword judge itself), and every row with its answer, `verdict`
    and `keyword_harmful`."""
    from sap_dist.evaluation.judges import KeywordJudge

    prompts = [r["prompt"] for r in rows]
    verdicts = judge.judge(prompts, answers)
    keyword = verdicts if judge.name == "keyword" else KeywordJudge().judge(prompts, answers)
    n = len(rows)
    return {
        "harmful_score": _pct(sum(1 for v in verdicts if v.harmful), n),
        "n_prompts": n,
        "refusal_rate": _pct(sum(v.refusal for v in verdicts), n),
        "degenerate_share": _pct(sum(v.label == "degenerate" for v in verdicts), n),
        "harmful_score_keyword": _pct(sum(1 for v in keyword if v.harmful), n),
        "unparsed": sum(1 for v in verdicts if v.harmful is None),
        "rows": [{**r, "answer": a, "verdict": v.to_dict(), "keyword_harmful": bool(k.harmful)}
                 for r, a, v, k in zip(rows, answers, verdicts, keyword)],
    }


def load_task_rows(source: str, limit: int | None = None, columns: dict[str, str] | None = None) -> list[dict]:
    """Task data (any source the trainer accepts) as `{"messages", "reference", "subtask"?}` rows."""
    from sap_dist.data import load_rows, load_task_examples

    examples = load_task_examples(source, columns=columns, limit=limit)
    try:
        raw = load_rows(source)[:len(examples)]
    except Exception:  # a hub dataset: no subtask tags needed
        raw = []
    rows = []
    for i, ex in enumerate(examples):
        row = {"messages": ex.messages, "reference": ex.response}
        if i < len(raw) and isinstance(raw[i].get("subtask"), str):
            row["subtask"] = raw[i]["subtask"]
        rows.append(row)
    return rows


def summary_line(results: dict) -> str:
    parts = [f"harmful score {results['harmful_score']}% of {results['n_prompts']}"]
    if results.get("over_refusal") is not None:
        parts.append(f"over-refusal {results['over_refusal']}% of {results['n_benign']}")
    if results.get("task_accuracy") is not None:
        parts.append(f"task accuracy {results['task_accuracy']}% of {results['n_task']}")
    return ", ".join(parts) + f" (judge {results['judge']['name']})"


# ------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    from sap_dist.evaluation.judges import DEFAULT_JUDGE, JUDGES
    from sap_dist.help_format import DefaultsHelpFormatter

    p = argparse.ArgumentParser(prog="sap-dist eval", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", help="model to evaluate (or the base of --adapter): any model.name_or_path the trainer "
                                   f"accepts (default: the base recorded in --adapter's run, else {DEFAULT_MODEL})")
    p.add_argument("--adapter", help="a trainer output directory (adapter or full weights) to load on --model")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="(default: %(default)s)")
    p.add_argument("--harmful-prompts", default="builtin:harmful_eval", help="prompt file (default: builtin:harmful_eval)")
    p.add_argument("--benign-prompts", help="benign prompt file for over-refusal (e.g. builtin:benign_eval)")
    p.add_argument("--task-data", help="task data with reference answers (any data.task source, e.g. a .jsonl)")
    p.add_argument("--prompt-field", default="prompt", help="field/column holding the prompt in .jsonl/.json/.csv files")
    p.add_argument("--judge", default=DEFAULT_JUDGE, choices=list(JUDGES),
                   help="careful: rules + a classifier fitted on the project's labelled answers; careful-lm: the same "
                        "also reading the embedded model's hidden states; keyword: the literature's keyword ASR "
                        "(docs/judging.md) (default: %(default)s)")
    p.add_argument("--judge-model", help="judge checkpoint (hub id or directory); default the judge's official one")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--task-max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, help="use only the first N prompts of each file")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", required=True, help="where to write results.json")
    return p


DEFAULT_MODEL = "smollm2-135m-instruct"


def base_of_run(adapter: str) -> str:
    """The model a trainer output directory was trained from (its config.yaml's model.name_or_path)."""
    from sap_dist.config import load_config

    path = os.path.join(adapter, "config.yaml")
    if not os.path.isfile(path):
        raise DataError(f"--adapter {adapter}: no config.yaml (not a sap-dist run directory); pass its base with --model")
    try:
        return load_config(path).model.name_or_path
    except ConfigError as exc:
        raise DataError(f"--adapter {adapter}: {exc}; pass its base with --model") from None


def load_for_eval(model: str, adapter: str | None, dtype: str):
    """(model, tokenizer) for evaluation: `model` alone, or the trainer output `adapter` on it."""
    from sap_dist.config import ModelConfig
    from sap_dist.models import load_base, load_tokenizer, load_trained

    cfg = ModelConfig(name_or_path=model, dtype=dtype)
    tokenizer = load_tokenizer(cfg)
    net = load_trained(adapter, cfg) if adapter else load_base(cfg).eval()
    if torch.cuda.is_available():
        net.to("cuda")
    return net, tokenizer


def main(argv: list[str] | None = None) -> int:
    from sap_dist.embedded import EmbeddedModelError
    from sap_dist.evaluation.judges import make_judge
    from sap_dist.models import ModelLoadError

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        harmful = load_prompts(args.harmful_prompts, args.prompt_field, args.limit)
        benign = load_prompts(args.benign_prompts, args.prompt_field, args.limit) if args.benign_prompts else None
        task = load_task_rows(args.task_data, args.limit) if args.task_data else None
        if args.model is None:
            args.model = base_of_run(args.adapter) if args.adapter else DEFAULT_MODEL
        judge = make_judge(args.judge, args.judge_model)  # first: a judge that cannot load stops before the model
        model, tokenizer = load_for_eval(args.model, args.adapter, args.dtype)
    except (ConfigError, DataError, ModelLoadError, EmbeddedModelError) as exc:
        print(f"sap-dist eval: error: {exc}", file=sys.stderr)
        return 2
    results = evaluate(model, tokenizer, harmful, benign, task, judge, args.max_new_tokens,
                       args.task_max_new_tokens, args.batch_size)
    results = {"model": args.model, "adapter": args.adapter, "dtype": args.dtype, **results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
    print(summary_line(results))
    print(f"results: {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
