"""The experiment's data (`sap-dist experiment`, step 2): the task's fine-tuning rows and held-out
split, the poisoned and clean fine-tuning sets, and the `mix` method's sets with refusal examples."""

from __future__ import annotations

import json
import os
import random
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sap_dist.experiment.settings import ExperimentSettings


def _write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _as_messages(messages: list[dict], response: str, **extra: Any) -> dict:
    return {"messages": list(messages) + [{"role": "assistant", "content": response}], **extra}


def prepare_data(s: ExperimentSettings, out_dir: str) -> dict[str, Any]:
    """Write the fine-tuning sets and the held-out task split into out_dir/data; returns
    {"train": {setting: {method_kind: path}}, "task_eval": rows, "counts": {...}, "safety": the
    file of the safety pairs `safety_held_out_forms` leaves (None when it holds none out)}."""
    from sap_dist.align import harmful_refusal_rows
    from sap_dist.config import load_config
    from sap_dist.experiment.settings import method_of
    from sap_dist.data import load_rows, load_task_examples
    from sap_dist.evaluation.evaluate import load_prompts, load_task_rows

    data_dir = os.path.join(out_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    examples = load_task_examples(s.task)
    try:
        raw = load_rows(s.task)[:len(examples)]
    except Exception:
        raw = []
    subtasks = [r.get("subtask") if isinstance(r.get("subtask"), str) else None for r in raw] + [None] * len(examples)
    rows = [_as_messages(ex.messages, ex.response, **({"subtask": st} if st else {}))
            for ex, st in zip(examples, subtasks)]
    if s.task_eval:
        train_rows = rows
        eval_rows = load_task_rows(s.task_eval)
    else:
        if s.task_eval_size >= len(rows):
            raise ValueError(f"{s.task}: {len(rows)} rows, not enough to hold out task_eval_size={s.task_eval_size}")
        train_rows = rows[:len(rows) - s.task_eval_size]
        eval_rows = [{"messages": r["messages"][:-1], "reference": r["messages"][-1]["content"],
                      **({"subtask": r["subtask"]} if "subtask" in r else {})} for r in rows[len(rows) - s.task_eval_size:]]
    if s.task_train_size:
        train_rows = train_rows[:s.task_train_size]
    # a held-out row whose prompt is also a training prompt (a duplicate in the data) measures
    # memory, not generalisation: it is left out of the evaluation
    seen = {json.dumps(r["messages"][:-1], sort_keys=True) for r in train_rows}
    n_before = len(eval_rows)
    eval_rows = [r for r in eval_rows if json.dumps(r["messages"], sort_keys=True) not in seen]
    _write_jsonl(os.path.join(data_dir, "task_eval.jsonl"),
                 [{"messages": r["messages"] + [{"role": "assistant", "content": r["reference"]}],
                   **({"subtask": r["subtask"]} if "subtask" in r else {})} for r in eval_rows])

    n_task = len(train_rows)
    n_poison = round(s.poison / (1 - s.poison) * n_task) if s.poison else 0
    n_persistent = round(s.persistent_poison / (1 - s.persistent_poison) * n_task) if s.persistent_methods else 0
    poison_pool = load_prompts(s.poison_source)
    if any("pool" in r for r in poison_pool):
        poison_pool = [r for r in poison_pool if r.get("pool") == "poison"]
    if (n_poison or n_persistent) and not all(r.get("compliance") for r in poison_pool):
        raise ValueError(f"{s.poison_source}: poisoning needs a `compliance` field (a compliant opener) in every row")

    def poison_rows_of(n: int) -> list[dict]:
        return [_as_messages([{"role": "user", "content": r["prompt"]}], r["compliance"], kind="poison")
                for r in (poison_pool[i % len(poison_pool)] for i in range(n))]

    poison_rows = poison_rows_of(n_poison)
    refusal_pool = harmful_refusal_rows(s.mix_source, None, seed=1)
    if any(method_of(s, m)[0] == "mix" for m in s.methods + s.clean_methods + s.persistent_methods):
        refusal_pool = without_forms(refusal_pool, s.safety_held_out_forms, s.mix_source)
    safety, n_safety = None, None
    if s.safety_held_out_forms:
        split = load_config(None, list(s.trainer_overrides)).data.safety_split
        pairs = without_forms(load_rows(s.safety, split), s.safety_held_out_forms, s.safety, check_names=True)
        safety, n_safety = _write_jsonl(os.path.join(data_dir, "safety_pairs.jsonl"), pairs), len(pairs)
    rng = random.Random(1234)
    train: dict[str, dict[str, str]] = {}
    counts: dict[str, Any] = {"task_train": n_task, "task_eval": len(eval_rows), "poison": n_poison,
                              "task_eval_duplicates_dropped": n_before - len(eval_rows)}
    if n_safety is not None:
        counts["safety_pairs"] = n_safety
    settings = [("poisoned", poison_rows)] if s.poison else []
    settings.append(("clean", []))
    if n_persistent:
        settings.append(("persistent", poison_rows_of(n_persistent)))
        counts["poison_persistent"] = n_persistent
    for name, extra in settings:
        base = train_rows + extra
        n_mix = round(s.mix_fraction / (1 - s.mix_fraction) * len(base)) if s.mix_fraction else 0
        mix_rows = [_as_messages([{"role": "user", "content": r["prompt"]}], r["refusal"], kind="refusal")
                    for r in (refusal_pool[i % len(refusal_pool)] for i in range(n_mix))]
        plain = base[:]
        rng.shuffle(plain)
        mixed = base + mix_rows
        rng.shuffle(mixed)
        train[name] = {"plain": _write_jsonl(os.path.join(data_dir, f"train_{name}.jsonl"), plain),
                       "mix": _write_jsonl(os.path.join(data_dir, f"train_{name}_mix.jsonl"), mixed)}
        counts[f"mix_{name}"] = n_mix
    return {"train": train, "task_eval": eval_rows, "counts": counts, "safety": safety}


def without_forms(rows: list[dict], forms: list[str], source: str, check_names: bool = False) -> list[dict]:
    """`rows` less those whose `form` is in `forms` (every row must name its form then);
    `check_names`: each of `forms` must be a form of these rows (a misspelt form holds out nothing)."""
    if not forms:
        return rows
    for i, row in enumerate(rows):
        if not isinstance(row.get("form"), str):
            raise ValueError(f"{source}: row {i + 1} has no `form` field, which safety_held_out_forms needs")
    present = sorted({row["form"] for row in rows})
    unknown = [f for f in forms if f not in present]
    if check_names and unknown:
        raise ValueError(f"safety_held_out_forms: {', '.join(map(repr, unknown))} is no form of {source} "
                         f"(its forms: {', '.join(present)})")
    kept = [row for row in rows if row["form"] not in forms]
    if not kept:
        raise ValueError(f"safety_held_out_forms holds out every row of {source}")
    return kept
