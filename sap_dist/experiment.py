"""`sap-dist experiment`: does SAP keep a fine-tuned model as safe as it was, while it learns the
task as well as plain fine-tuning? Side by side, several seeds, judged the same way.

    sap-dist experiment --preset quick|full|tiny --out DIR [--seeds 0,1,2] [--model M] [--task SRC]
                        [--safety SRC] [--methods sft,sap_paper,...] [--set name=value ...]
                        [section.key=value ...]

1. Start point: `sap-dist align` makes the model refuse (cached under `--align-dir`, default
   `$SAP_DIST_CACHE/aligned/<settings hash>`, and reused across seeds and runs), or with
   `--no-align` the model itself (an already aligned chat model).
2. Data: the task data minus a held-out tail (`task_eval_size` rows) for exact-match accuracy;
   the *poisoned* setting mixes a fraction `poison` of harmful prompts answered with compliant
   openers into it (the Vaccine/Lisa/Booster setting, p=0.1), the *clean* setting does not.
3. Methods, each fine-tuned from the start point on the same data with the trainer
   (`sap_dist.train.train_model`): `sft` (plain), `sap_paper` (SAP, Algorithm 1), `sap_reference`
   (SAP, the reference code's variant), `mix` (plain fine-tuning with a fraction `mix_fraction` of
   refusal examples mixed into the data, as SafeInstr does).
4. Each run is judged (`sap_dist.eval.evaluate`) on held-out harmful prompts (harmful score),
   benign prompts (over-refusal) and the held-out task (accuracy).
5. DIR/results.json (per method: harmful_score, task_accuracy, over_refusal, train time, model_dir,
   per seed and mean/sd/min/max), DIR/table.md, DIR/harmful_vs_accuracy.png and
   DIR/training_curves.png. Finished runs (DIR/runs/.../eval.json with the same settings) are
   reused, so adding seeds or methods only runs what is new.

Trainer overrides (`section.key=value`, e.g. `sap.rho=0.05`) apply to every fine-tuning run; they
and `--set` make sweeps: `--methods sap_paper --set tag=rho05 sap.rho=0.05`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

METHODS: dict[str, dict[str, Any]] = {
    "sft": {"sap.method": "sft"},
    "sap_paper": {"sap.method": "sap", "sap.variant": "paper"},
    "sap_reference": {"sap.method": "sap", "sap.variant": "reference"},
    "mix": {"sap.method": "sft"},
    "lisa": {"sap.method": "lisa"},
}
"""Trainer settings of each method (`mix` differs by its data, not by the trainer)."""
METHOD_LABELS = {"sft": "plain fine-tuning", "sap_paper": "SAP (paper)", "sap_reference": "SAP (reference)",
                 "mix": "safety-data mixing", "lisa": "Lisa"}


@dataclass
class ExperimentSettings:
    # model and start point
    model: str = "smollm2-135m-instruct"
    """Model to align and fine-tune (any model.name_or_path)."""
    dtype: str = "bf16"
    attn_implementation: str | None = None
    align: bool = True
    """Align the model first (`sap-dist align`); false: fine-tune `model` as it is."""
    align_epochs: float = 2.0
    align_max_steps: int | None = None
    align_learning_rate: float = 2e-4
    align_lora_r: int = 16
    align_n_harmful: int | None = None
    align_n_benign: int | None = None
    align_benign_max_new_tokens: int = 64
    # data
    task: str = "builtin:task"
    """Fine-tuning task (any data.task source)."""
    task_eval: str | None = None
    """Held-out task data; None: the last `task_eval_size` rows of `task`."""
    task_eval_size: int = 100
    task_train_size: int | None = None
    """Use only the first N training rows of the task (None: all)."""
    safety: str = "builtin:safety"
    """SAP's contrastive pairs (any data.safety source)."""
    harmful_eval: str = "builtin:harmful_eval"
    n_harmful_eval: int | None = 100
    benign_eval: str = "builtin:benign_eval"
    n_benign_eval: int | None = 80
    poison: float = 0.1
    """Fraction of the poisoned setting's fine-tuning set that is harmful prompts with compliant
    openers (0 disables the poisoned setting)."""
    poison_source: str = "builtin:harmful_train"
    mix_fraction: float = 0.03
    """Fraction of refusal examples in the `mix` method's data (SafeInstr: 3%)."""
    mix_source: str = "builtin:harmful_train"
    # runs
    methods: list[str] = field(default_factory=lambda: ["sft", "sap_paper", "sap_reference", "mix"])
    clean_methods: list[str] = field(default_factory=lambda: ["sft"])
    """Methods also run on the clean (unpoisoned) data."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # fine-tuning (the trainer's keys; overrides on the command line come on top)
    steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 8
    learning_rate: float = 2e-4
    lora_r: int = 8
    lora_dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    max_length: int = 128
    trainer_overrides: list[str] = field(default_factory=list)
    """`section.key=value` strings applied to every fine-tuning run."""
    method_overrides: dict[str, list[str]] = field(default_factory=dict)
    """Per-method `section.key=value` strings (applied after `trainer_overrides`)."""
    # evaluation
    max_new_tokens: int = 32
    task_max_new_tokens: int = 8
    eval_batch_size: int = 32
    eval_attn_implementation: str | None = None
    """Attention implementation for generation (e.g. `sdpa`), when it differs from training's."""
    clean_seeds: list[int] | None = None
    """Seeds of the clean setting's runs (None: all `seeds`)."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    tag: str = ""
    """Free label stored with the results (e.g. the sweep setting)."""


PRESETS: dict[str, dict[str, Any]] = {
    # seconds: a random 4-layer model, for tests and trying the pipeline
    "tiny": dict(model="tiny-random-llama", dtype="fp32", align_max_steps=2, align_n_harmful=8, align_n_benign=8,
                 align_benign_max_new_tokens=8, task_eval_size=8, task_train_size=32, n_harmful_eval=6,
                 n_benign_eval=4, steps=2, batch_size=4, lora_r=4, lora_dropout=0.0, max_length=64,
                 max_new_tokens=4, task_max_new_tokens=4, eval_batch_size=8, seeds=[0],
                 method_overrides={"sap_paper": ["sap.safety_batch_size=4", "sap.probe_layers=[1,2]"],
                                   "sap_reference": ["sap.safety_batch_size=4", "sap.probe_layers=[1,2]"]},
                 trainer_overrides=["data.safety_max_length=64"]),
    # 2 CPU cores, under 25 minutes with the aligned model cached (sized in docs/experiment.md)
    "quick": dict(attn_implementation="eager", eval_attn_implementation="sdpa", align_epochs=2.0, steps=24,
                  batch_size=8, learning_rate=3e-4, lora_dropout=0.0, n_harmful_eval=100, n_benign_eval=50,
                  max_new_tokens=16, task_max_new_tokens=6, eval_batch_size=100, clean_seeds=[0],
                  trainer_overrides=["data.safety_max_length=96"]),
    # the full bundled evaluation sets, longer fine-tuning; on a GPU, pass --model/--task for the paper's setting
    "full": dict(align_epochs=3.0, epochs=2.0, n_harmful_eval=None, n_benign_eval=None, max_new_tokens=64,
                 task_max_new_tokens=16),
}


def settings_from(preset: str, **changes: Any) -> ExperimentSettings:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in changes.items() if v is not None}}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(ExperimentSettings)})
    if unknown:
        raise ValueError(f"unknown experiment setting(s) {', '.join(unknown)}")
    s = ExperimentSettings(**values)
    bad = [m for m in s.methods + s.clean_methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)}; use {', '.join(METHODS)}")
    if not 0 <= s.poison < 1 or not 0 <= s.mix_fraction < 1:
        raise ValueError("poison and mix_fraction must be in [0, 1)")
    return s


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------
# Data


def _write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _as_messages(messages: list[dict], response: str, **extra: Any) -> dict:
    return {"messages": list(messages) + [{"role": "assistant", "content": response}], **extra}


def prepare_data(s: ExperimentSettings, out_dir: str) -> dict[str, Any]:
    """Write the fine-tuning sets and the held-out task split into out_dir/data; returns
    {"train": {setting: {method_kind: path}}, "task_eval": rows, "counts": {...}}."""
    from sap_dist.align import harmful_refusal_rows
    from sap_dist.data import load_rows, load_task_examples
    from sap_dist.eval import load_prompts, load_task_rows

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
    poison_pool = load_prompts(s.poison_source)
    if any("pool" in r for r in poison_pool):
        poison_pool = [r for r in poison_pool if r.get("pool") == "poison"]
    if n_poison and not all(r.get("compliance") for r in poison_pool):
        raise ValueError(f"{s.poison_source}: poisoning needs a `compliance` field (a compliant opener) in every row")
    poison_rows = [_as_messages([{"role": "user", "content": r["prompt"]}], r["compliance"], kind="poison")
                   for r in (poison_pool[i % len(poison_pool)] for i in range(n_poison))]
    refusal_pool = harmful_refusal_rows(s.mix_source, None, seed=1)
    rng = random.Random(1234)
    train: dict[str, dict[str, str]] = {}
    counts: dict[str, Any] = {"task_train": n_task, "task_eval": len(eval_rows), "poison": n_poison,
                              "task_eval_duplicates_dropped": n_before - len(eval_rows)}
    settings = [("poisoned", poison_rows)] if s.poison else []
    settings.append(("clean", []))
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
    return {"train": train, "task_eval": eval_rows, "counts": counts}


# ------------------------------------------------------------------------------------------
# Runs


def _trainer_config(s: ExperimentSettings, start_model: str, method: str, data_path: str, seed: int, out: str):
    from sap_dist.config import load_config

    base = {
        "model.name_or_path": start_model, "model.dtype": s.dtype, "model.attn_implementation": s.attn_implementation,
        "weights.method": "lora", "weights.lora_r": s.lora_r, "weights.lora_alpha": 2 * s.lora_r,
        "weights.lora_dropout": s.lora_dropout, "weights.target_modules": s.target_modules,
        "data.task": data_path, "data.safety": s.safety, "data.max_length": s.max_length,
        "train.output_dir": out, "train.overwrite": True, "train.seed": seed, "train.max_steps": s.steps,
        "train.epochs": s.epochs, "train.batch_size": s.batch_size, "train.learning_rate": s.learning_rate,
        "train.tensorboard": False, "checkpoint.every_steps": 0,
        **METHODS[method],
    }
    overrides = [f"{k}={json.dumps(v)}" for k, v in base.items()]
    overrides += list(s.trainer_overrides) + list(s.method_overrides.get(method, []))
    return load_config(None, overrides)


def _eval_sets(s: ExperimentSettings) -> tuple[list[dict], list[dict]]:
    from sap_dist.eval import load_prompts

    return load_prompts(s.harmful_eval, limit=s.n_harmful_eval), load_prompts(s.benign_eval, limit=s.n_benign_eval)


def _metrics_of(results: dict) -> dict:
    return {k: results.get(k) for k in ("harmful_score", "refusal_rate", "over_refusal", "task_accuracy",
                                         "task_accuracy_by_subtask", "n_prompts", "n_benign", "n_task", "eval_time_s")}


def set_attn_implementation(model, name: str | None) -> None:
    """Switch a (peft-wrapped) model's attention implementation for generation; None: keep it."""
    if name:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.set_attn_implementation(name)


def run_one(s: ExperimentSettings, start_model: str, setting: str, method: str, seed: int, data_path: str,
            eval_sets: tuple, task_eval: list[dict], out_dir: str) -> dict:
    """Fine-tune one (setting, method, seed), evaluate it, write its eval.json; reuse a finished
    run with the same configuration."""
    from sap_dist.config import to_dict
    from sap_dist.eval import evaluate
    from sap_dist.train import train_model

    run_dir = os.path.join(out_dir, "runs", setting, method, f"seed{seed}")
    cfg = _trainer_config(s, start_model, method, data_path, seed, run_dir)
    with open(data_path, "rb") as fh:
        data_sha = hashlib.sha256(fh.read()).hexdigest()
    eval_conf = {k: getattr(s, k) for k in ("harmful_eval", "n_harmful_eval", "benign_eval", "n_benign_eval",
                                            "max_new_tokens", "task_max_new_tokens", "eval_attn_implementation")}
    key = _hash({"cfg": to_dict(cfg), "data": data_sha, "eval": eval_conf, "task_eval": task_eval})
    eval_path = os.path.join(run_dir, "eval.json")
    if os.path.exists(eval_path):
        with open(eval_path) as fh:
            previous = json.load(fh)
        if previous.get("run_key") == key:
            return previous["row"] | {"reused": True}
    started = time.time()
    result = train_model(cfg)
    train_time = time.time() - started
    harmful, benign = eval_sets
    set_attn_implementation(result.model, s.eval_attn_implementation)
    results = evaluate(result.model, result.tokenizer, harmful, benign, task_eval, None, s.max_new_tokens,
                       s.task_max_new_tokens, s.eval_batch_size)
    summary = result.summary
    row = {"setting": setting, "method": method, "seed": seed, **_metrics_of(results),
           "train_time_s": round(train_time, 1), "mean_step_time_s": summary.get("mean_step_time_s"),
           "steps": summary.get("steps"), "task_examples": summary.get("task_examples"),
           "model_dir": summary.get("output_dir"), "metrics": summary.get("metrics"), "reused": False}
    with open(eval_path, "w") as fh:
        json.dump({"run_key": key, "row": row, "results": results}, fh, indent=2)
    del result
    return row


# ------------------------------------------------------------------------------------------
# Aggregation, table, plots


def _stats(values: list[float | None]) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": round(mean, 2), "sd": round(sd, 2), "min": min(vals), "max": max(vals), "n": len(vals),
            "values": vals}


METRICS = ("harmful_score", "task_accuracy", "over_refusal", "refusal_rate", "train_time_s", "mean_step_time_s")


def aggregate(rows: list[dict]) -> dict[str, dict]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(f"{row['setting']}/{row['method']}", []).append(row)
    out = {}
    for name, runs in groups.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        out[name] = {"setting": runs[0]["setting"], "method": runs[0]["method"],
                     "label": METHOD_LABELS.get(runs[0]["method"], runs[0]["method"]),
                     **{m: _stats([r.get(m) for r in runs]) for m in METRICS},
                     "model_dir": [r["model_dir"] for r in runs], "runs": runs}
    return out


def _fmt(stat: dict | None, digits: int = 1) -> str:
    if stat is None:
        return "–"
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def _one(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def markdown_table(summary: dict[str, dict], reference: dict[str, dict | None], s: ExperimentSettings) -> str:
    head = ("| model | data | harmful score ↓ | task accuracy ↑ | over-refusal ↓ | train time (s) | seeds |\n"
            "|---|---|---|---|---|---|---|\n")
    lines = []
    for name, label in (("base", "base model (before alignment)"), ("aligned", "start point (aligned), no fine-tuning")):
        m = reference.get(name)
        if m:
            lines.append(f"| {label} | – | {_one(m['harmful_score'])} | {_one(m.get('task_accuracy'))} | "
                         f"{_one(m.get('over_refusal'))} | – | – |")
    order = {m: i for i, m in enumerate(["sft", "mix", "sap_paper", "sap_reference"])}
    for key in sorted(summary, key=lambda k: (summary[k]["setting"] != "clean", order.get(summary[k]["method"], 9))):
        g = summary[key]
        data = "clean" if g["setting"] == "clean" else f"poisoned p={s.poison:g}"
        lines.append(f"| {g['label']} (`{g['method']}`) | {data} | {_fmt(g['harmful_score'])} | "
                     f"{_fmt(g['task_accuracy'])} | {_fmt(g['over_refusal'])} | {_fmt(g['train_time_s'], 0)} | "
                     f"{g['harmful_score']['n'] if g['harmful_score'] else 0} |")
    return head + "\n".join(lines) + "\n"


def _moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def make_plots(summary: dict[str, dict], reference: dict[str, dict | None], out_dir: str, s: ExperimentSettings) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sap_dist.metrics import read_metrics

    colors = {"sft": "tab:red", "mix": "tab:orange", "sap_paper": "tab:blue", "sap_reference": "tab:green"}
    paths = []
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for key, g in summary.items():
        if not g["harmful_score"] or not g["task_accuracy"]:
            continue
        c = colors.get(g["method"], "gray")
        marker = "o" if g["setting"] == "poisoned" else "s"
        runs = g["runs"]
        ax.scatter([r["task_accuracy"] for r in runs], [r["harmful_score"] for r in runs], color=c, alpha=0.3,
                   marker=marker, s=18)
        data = "clean" if g["setting"] == "clean" else f"p={s.poison:g}"
        ax.errorbar(g["task_accuracy"]["mean"], g["harmful_score"]["mean"], xerr=g["task_accuracy"]["sd"],
                    yerr=g["harmful_score"]["sd"], color=c, marker=marker, markersize=8, capsize=3,
                    label=f"{g['label']} ({data})", linestyle="none")
    for name, marker, label in (("aligned", "*", "aligned start point"), ("base", "X", "base model")):
        m = reference.get(name)
        if m and m.get("task_accuracy") is not None:
            ax.scatter([m["task_accuracy"]], [m["harmful_score"]], color="black", marker=marker, s=120, label=label)
    ax.set_xlabel("task accuracy (%, exact match, held-out)")
    ax.set_ylabel("harmful score (%, held-out harmful prompts)")
    ax.set_title("Harmfulness vs utility (mean ± sd over seeds; faint: single seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = os.path.join(out_dir, "harmful_vs_accuracy.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    # training curves: task loss (all methods) and SAP's safety loss, mean over seeds
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, g in sorted(summary.items()):
        curves_task, curves_safe = [], []
        for r in g["runs"]:
            try:
                rows = read_metrics(os.path.dirname(r["metrics"]))
            except (OSError, TypeError):
                continue
            curves_task.append([(row["step"], row["task_loss"]) for row in rows if isinstance(row.get("task_loss"), float)])
            curves_safe.append([(row["step"], row["safety_loss"]) for row in rows if isinstance(row.get("safety_loss"), float)])
        style = "-" if g["setting"] == "poisoned" else ":"
        data = "clean" if g["setting"] == "clean" else f"p={s.poison:g}"
        for ax, curves in ((axes[0], curves_task), (axes[1], curves_safe)):
            curves = [c for c in curves if c]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            steps = [c[0] for c in curves[0][:n]]
            mean = [sum(c[i][1] for c in curves) / len(curves) for i in range(n)]
            ax.plot(steps, _moving_average(mean, 5), style, color=colors.get(g["method"], "gray"),
                    label=f"{g['label']} ({data})")
    axes[0].set_title("task loss (response tokens), mean over seeds, moving average 5", fontsize=9)
    axes[1].set_title("SAP safety loss NLL(refusal) - NLL(compliance) on the safety batch", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "training_curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------
# The experiment


def _align_root() -> str:
    from sap_dist.embedded import cache_root

    return os.path.join(os.path.dirname(cache_root()), "aligned")


def run_experiment(s: ExperimentSettings, out_dir: str, align_dir: str | None = None, preset: str = "",
                   command: str = "") -> dict:
    from sap_dist.align import AlignSettings, align, evaluate_model
    from sap_dist.config import ModelConfig
    from sap_dist.models import load_base, load_tokenizer

    started = time.time()
    load_start = os.getloadavg()
    if s.threads:
        torch.set_num_threads(s.threads)
    os.makedirs(out_dir, exist_ok=True)
    data = prepare_data(s, out_dir)
    task_eval = data["task_eval"]
    align_s = AlignSettings(model=s.model, dtype=s.dtype, attn_implementation=s.attn_implementation,
                            n_harmful=s.align_n_harmful, n_benign=s.align_n_benign,
                            benign_max_new_tokens=s.align_benign_max_new_tokens, lora_r=s.align_lora_r,
                            lora_alpha=2 * s.align_lora_r, epochs=s.align_epochs, max_steps=s.align_max_steps,
                            learning_rate=s.align_learning_rate, harmful_eval=s.harmful_eval, benign_eval=s.benign_eval,
                            n_harmful_eval=s.n_harmful_eval, n_benign_eval=s.n_benign_eval, task_eval=task_eval,
                            max_new_tokens=s.max_new_tokens, task_max_new_tokens=s.task_max_new_tokens,
                            eval_batch_size=s.eval_batch_size, eval_attn_implementation=s.eval_attn_implementation)
    if s.align:
        align_dir = align_dir or os.path.join(_align_root(), align_s.key())
        t0 = time.time()
        report = align(align_s, align_dir)
        align_time = time.time() - t0
        start_model = report["model_dir"]
        reference = {"base": report.get("base"), "aligned": report["aligned"]}
        print(f"start point: {start_model} ({'reused' if report.get('reused') else f'aligned in {align_time:.0f} s'})")
    else:
        report, align_time, start_model = None, 0.0, s.model
        mcfg = ModelConfig(name_or_path=s.model, dtype=s.dtype,
                           attn_implementation=s.eval_attn_implementation or s.attn_implementation)
        model = load_base(mcfg).eval()
        reference = {"base": None, "aligned": {k: v for k, v in evaluate_model(model, load_tokenizer(mcfg), align_s).items()
                                               if not isinstance(v, list)}}
        del model
    eval_sets = _eval_sets(s)
    rows = []
    plan = [("poisoned", m) for m in s.methods] if s.poison else []
    plan += [("clean", m) for m in (s.clean_methods if s.poison else s.methods)]
    for seed in s.seeds:
        for setting, method in plan:
            if setting == "clean" and s.poison and s.clean_seeds is not None and seed not in s.clean_seeds:
                continue
            kind = "mix" if method == "mix" else "plain"
            row = run_one(s, start_model, setting, method, seed, data["train"][setting][kind], eval_sets, task_eval, out_dir)
            rows.append(row)
            print(f"[{setting} {method} seed {seed}] harmful {row['harmful_score']}%  task {row['task_accuracy']}%  "
                  f"over-refusal {row['over_refusal']}%  train {row['train_time_s']} s"
                  + ("  (reused)" if row.get("reused") else ""), flush=True)
    summary = aggregate(rows)
    table = markdown_table(summary, reference, s)
    plots = make_plots(summary, reference, out_dir, s)
    results = {
        "preset": preset, "command": command, "tag": s.tag, "settings": dataclasses.asdict(s),
        "start_model": start_model, "align": report, "align_time_s": round(align_time, 1),
        "data": data["counts"], "reference": reference, "methods": summary, "table_markdown": table,
        "plots": plots, "wall_time_s": round(time.time() - started, 1),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_start": [round(x, 2) for x in load_start],
                    "load_average_end": [round(x, 2) for x in os.getloadavg()],
                    "device": "cuda" if torch.cuda.is_available() else "cpu"},
    }
    with open(os.path.join(out_dir, "results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    with open(os.path.join(out_dir, "table.md"), "w") as fh:
        fh.write(table)
    return results


# ------------------------------------------------------------------------------------------
# CLI


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text) if text.strip() else text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sap-dist experiment", description=__doc__.split("\n\n")[0],
                                epilog="Extra arguments `section.key=value` are trainer overrides for every run.")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seeds", help="comma-separated seeds (default: the preset's)")
    p.add_argument("--model", help="model to align and fine-tune (any model.name_or_path)")
    p.add_argument("--task", help="task data (any data.task source)")
    p.add_argument("--task-eval", help="held-out task data (default: the tail of --task)")
    p.add_argument("--safety", help="SAP's safety pairs (any data.safety source)")
    p.add_argument("--harmful-prompts", help="held-out harmful prompt file")
    p.add_argument("--benign-prompts", help="benign prompt file (over-refusal)")
    p.add_argument("--methods", help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--poison", type=float, help="poisoned fraction p (0: clean setting only)")
    p.add_argument("--no-align", action="store_true", help="fine-tune --model as it is (already aligned)")
    p.add_argument("--align-dir", help="where the aligned model is cached (default $SAP_DIST_CACHE/aligned/<hash>)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="any experiment setting (see sap_dist/experiment.py ExperimentSettings), repeatable")
    return p


def main(argv: list[str] | None = None) -> int:
    from sap_dist.config import ConfigError
    from sap_dist.data import DataError
    from sap_dist.embedded import EmbeddedModelError
    from sap_dist.models import ModelLoadError
    from sap_dist.train import TrainingStopped

    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = build_parser().parse_known_args(argv)
    bad = [a for a in rest if "=" not in a or a.startswith("-")]
    if bad:
        print(f"sap-dist experiment: error: unrecognized arguments {' '.join(bad)} "
              f"(trainer overrides look like section.key=value)", file=sys.stderr)
        return 2
    changes: dict[str, Any] = {
        "seeds": [int(x) for x in args.seeds.split(",")] if args.seeds else None,
        "model": args.model, "task": args.task, "task_eval": args.task_eval, "safety": args.safety,
        "harmful_eval": args.harmful_prompts, "benign_eval": args.benign_prompts,
        "methods": args.methods.split(",") if args.methods else None, "poison": args.poison,
        "threads": args.threads, "align": False if args.no_align else None,
    }
    for item in args.set:
        if "=" not in item:
            print(f"sap-dist experiment: error: --set {item!r} must be NAME=VALUE", file=sys.stderr)
            return 2
        name, value = item.split("=", 1)
        changes[name.strip()] = _parse_value(value)
    try:
        s = settings_from(args.preset, **changes)
        if rest:
            s.trainer_overrides = list(s.trainer_overrides) + rest
        results = run_experiment(s, args.out, args.align_dir, args.preset, "sap-dist experiment " + " ".join(argv))
    except (ValueError, ConfigError, DataError, ModelLoadError, EmbeddedModelError, TrainingStopped) as exc:
        print(f"sap-dist experiment: error: {exc}", file=sys.stderr)
        return 2
    print()
    print(results["table_markdown"])
    print(f"results: {os.path.abspath(os.path.join(args.out, 'results.json'))}")
    print(f"table:   {os.path.abspath(os.path.join(args.out, 'table.md'))}")
    for path in results["plots"]:
        print(f"plot:    {os.path.abspath(path)}")
    print(f"wall time: {results['wall_time_s']:.0f} s (aligning: {results['align_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
