"""`sap-dist align`: make a model that does not refuse anything safety-aligned, the way the
safe-fine-tuning literature prepares its starting point, and measure the result.

    sap-dist align --out DIR [--model smollm2-135m-instruct] [--epochs 2] [--limit-eval N] [...]

1. The base model answers the benign training instructions (`builtin:benign_train`) greedily; its
   own answers become their targets (docs/pilot.md: foreign targets taught the pilot's aligned
   model to refuse harmless questions). An answer cut by the token limit is trimmed to its last
   full sentence; answers that are themselves refusals are left out.
2. LoRA fine-tuning (the trainer, `method=sft`) on harmful prompts -> refusals (the `align`
   pool of `builtin:harmful_train`) plus benign instructions -> those answers. `--method booster`
   aligns with Booster instead (the harmful answers of `data.safety`, docs/baselines.md).
3. The adapter is merged into the base weights and saved as a plain transformers model directory
   `DIR/model` (with the tokenizer): any `model.name_or_path` can point at it.
4. Base and aligned models are evaluated on held-out harmful prompts (refusal rate, harmful score),
   benign prompts (over-refusal) and, when given, held-out task data (exact match):
   `DIR/align_report.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sap_dist.evaluation.judges import DEFAULT_JUDGE, JUDGES

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REPORT = "align_report.json"


@dataclass
class AlignSettings:
    model: str = "smollm2-135m-instruct"
    """Model to align (any model.name_or_path)."""
    dtype: str = "bf16"
    attn_implementation: str | None = None
    harmful_train: str = "builtin:harmful_train"
    """Harmful prompts with refusals (rows of the `align` pool when the file has a `pool` field;
    a file without `refusal` gets refusals from refusals.txt)."""
    benign_train: str = "builtin:benign_train"
    n_harmful: int | None = None
    """Use the first N harmful training prompts (None: all)."""
    n_benign: int | None = None
    """Use the first N benign training prompts (None: all)."""
    benign_max_new_tokens: int = 64
    """Length limit of the base model's own answers used as benign targets."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    method: str = "sft"
    """The trainer's method for the alignment: `sft`, or an alignment-stage defence such as
    `booster` (which also reads the trainer's `data.safety`)."""
    trainer_overrides: list[str] = field(default_factory=list)
    """Trainer `section.key=value` overrides on top of the alignment's own, e.g. `booster.lamb=5`."""
    epochs: float = 2.0
    max_steps: int | None = None
    batch_size: int = 8
    learning_rate: float = 2e-4
    max_length: int = 192
    seed: int = 0
    # evaluation of base and aligned model
    harmful_eval: str = "builtin:harmful_eval"
    benign_eval: str = "builtin:benign_eval"
    n_harmful_eval: int | None = 100
    n_benign_eval: int | None = 80
    independent_eval: str | None = None
    """Harmful prompts written by others (e.g. `builtin:donotanswer_test`), judged beside `harmful_eval`."""
    n_independent_eval: int | None = None
    task_eval: list[dict] | None = None
    """Task rows {messages, reference} to measure task accuracy on (set by the experiment)."""
    max_new_tokens: int = 32
    task_max_new_tokens: int = 8
    eval_batch_size: int = 32
    eval_attn_implementation: str | None = None
    """Attention implementation for generation (evaluation and benign targets); None: as training."""
    evaluate_base: bool = True
    judge: str = DEFAULT_JUDGE
    """Which judge scores base and aligned model (`sap-dist judge`'s names). Another judge than
    the one that made a cached report's verdicts judges its saved answers again."""
    judge_model: str | None = None
    """Checkpoint of a model judge (`llama-guard`, `beaver-dam`); None: its official one."""
    progress: bool = True
    threads: int | None = 1
    """torch CPU threads while aligning (None: as the process has). The trained weights depend on
    the thread count (gradients are summed in another order: 1 and 2 threads gave start points 1
    point apart on DoNotAnswer, docs/experiment.md), so a fixed count gives the same start point
    on machines with any number of cores (of the same CPU generation). Not used on a GPU."""

    EVAL_FIELDS = ("harmful_eval", "benign_eval", "n_harmful_eval", "n_benign_eval", "task_eval",
                   "independent_eval", "n_independent_eval",
                   "max_new_tokens", "task_max_new_tokens", "evaluate_base", "eval_attn_implementation")

    def _hash(self, names: list[str]) -> str:
        from sap_dist.data import BUILTIN_DIR
        from sap_dist.evaluation.evaluate import BUILTIN_PROMPTS
        from sap_dist.fingerprint import code_fingerprint

        payload = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
        payload["code"] = code_fingerprint()  # the aligned model is reused only by the code that made it
        for name in ("harmful_train", "benign_train", "harmful_eval", "benign_eval", "independent_eval"):
            src = payload.get(name)
            path = os.path.join(BUILTIN_DIR, BUILTIN_PROMPTS[src]) if src in BUILTIN_PROMPTS else src
            if src is not None and os.path.isfile(path):
                with open(path, "rb") as fh:
                    payload[name + "_sha"] = hashlib.sha256(fh.read()).hexdigest()
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def key(self) -> str:
        """Hash of everything that changes the aligned model (settings and data files)."""
        skip = set(self.EVAL_FIELDS) | {"progress", "eval_batch_size", "judge", "judge_model"}
        return self._hash([f.name for f in dataclasses.fields(self) if f.name not in skip])

    def eval_key(self) -> str:
        """Hash of everything that changes the report but not the model."""
        return self._hash(list(self.EVAL_FIELDS))


def _trim_to_sentence(text: str) -> str:
    """Cut an answer that ran into the token limit back to its last complete sentence (kept
    whole when there is none)."""
    text = text.strip()
    if re.search(r"[.!?]['\")\]]?$", text):
        return text
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "), text.rfind(".\n"))
    return text[:cut + 1].strip() if cut > 0 else text


def _load_refusals() -> list[str]:
    from sap_dist.data import BUILTIN_DIR

    with open(os.path.join(BUILTIN_DIR, "refusals.txt"), encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def harmful_refusal_rows(source: str, n: int | None, seed: int, pool: str = "align") -> list[dict]:
    """Harmful prompt rows with a `refusal` each: the `pool` rows of a file with a `pool` field."""
    from sap_dist.evaluation.evaluate import load_prompts

    rows = load_prompts(source)
    if any("pool" in r for r in rows):
        rows = [r for r in rows if r.get("pool") == pool]
    refusals = _load_refusals()
    rng = random.Random(seed)
    rows = [{**r, "refusal": r.get("refusal") or rng.choice(refusals)} for r in rows]
    return rows[:n] if n else rows


def build_align_data(model, tokenizer, s: AlignSettings, out_dir: str) -> tuple[str, dict]:
    """Write DIR/align_data.jsonl (prompt/response rows); returns its path and counts."""
    from sap_dist.evaluation.evaluate import generate, load_prompts
    from sap_dist.evaluation.judges import is_refusal

    harmful = harmful_refusal_rows(s.harmful_train, s.n_harmful, s.seed)
    benign = load_prompts(s.benign_train, limit=s.n_benign)
    cache = os.path.join(out_dir, "benign_targets.jsonl")
    answers = generate(model, tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in benign],
                       s.benign_max_new_tokens, s.eval_batch_size, "base answers (benign targets)", s.progress)
    answers = [_trim_to_sentence(a) for a in answers]
    kept = [(r["prompt"], a) for r, a in zip(benign, answers) if a and not is_refusal(a)]
    with open(cache, "w", encoding="utf-8") as fh:
        for (prompt, answer) in kept:
            fh.write(json.dumps({"prompt": prompt, "response": answer}, ensure_ascii=False) + "\n")
    rows = [{"prompt": r["prompt"], "response": r["refusal"]} for r in harmful]
    rows += [{"prompt": p, "response": a} for p, a in kept]
    random.Random(s.seed).shuffle(rows)
    path = os.path.join(out_dir, "align_data.jsonl")
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path, {"harmful_refusals": len(harmful), "benign_answers": len(kept),
                  "benign_dropped": len(benign) - len(kept)}


def evaluate_model(model, tokenizer, s: AlignSettings, judge=None) -> dict:
    """`s`'s evaluation of `model`, judged by `judge` (default: the judge `s.judge` names)."""
    from sap_dist.evaluation.evaluate import evaluate, load_prompts
    from sap_dist.evaluation.judges import make_judge

    judge = judge or make_judge(s.judge, s.judge_model)
    harmful = load_prompts(s.harmful_eval, limit=s.n_harmful_eval)
    benign = load_prompts(s.benign_eval, limit=s.n_benign_eval)
    results = evaluate(model, tokenizer, harmful, benign, s.task_eval, judge, s.max_new_tokens, s.task_max_new_tokens,
                       s.eval_batch_size, s.progress)
    if s.independent_eval:
        from sap_dist.evaluation.prompt_sets import evaluate_independent, load_independent

        results.update(evaluate_independent(model, tokenizer, load_independent(s.independent_eval, s.n_independent_eval),
                                            s.max_new_tokens, s.eval_batch_size, s.progress, judge=judge))
    return results


def _metrics(results: dict) -> dict:
    from sap_dist.evaluation.prompt_sets import INDEPENDENT_KEYS

    keys = ("harmful_score", "refusal_rate", "over_refusal", "task_accuracy", "harmful_score_keyword",
            "harmful_score_by_form", "degenerate_share", "n_prompts", "n_benign", "n_task", "eval_time_s") + INDEPENDENT_KEYS
    return {k: results.get(k) for k in keys}


def align(s: AlignSettings, out_dir: str, reuse: bool = True, judge=None) -> dict:
    """Align `s.model` into `out_dir/model`; returns the report (also written to out_dir).
    With `reuse`, an existing report with the same settings key is returned as is (its saved
    answers judged again when `judge`, default `s.judge`'s, did not make its verdicts). Runs
    with `s.threads` CPU threads (the process's count is restored after)."""
    from sap_dist.evaluation.judges import make_judge

    with _torch_threads(s.threads):
        return _align(s, out_dir, reuse, judge or make_judge(s.judge, s.judge_model))


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """torch's CPU thread count set to `threads` inside, restored after."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _align(s: AlignSettings, out_dir: str, reuse: bool, judge) -> dict:
    from sap_dist.config import load_config
    from sap_dist.models import load_base, load_tokenizer
    from sap_dist.config import ModelConfig
    from sap_dist.evaluation.rejudge import write_json_atomic
    from sap_dist.train import train_model

    key, eval_key = s.key(), s.eval_key()
    # the trainer's config, built before any work so that bad settings stop here
    cfg = load_config(None, [*s.trainer_overrides, f"method={s.method}"])
    report_path = os.path.join(out_dir, REPORT)
    model_dir = os.path.join(out_dir, "model")
    if reuse and os.path.exists(report_path):
        with open(report_path) as fh:
            report = json.load(fh)
        if report.get("key") == key and os.path.exists(os.path.join(model_dir, "config.json")):
            if report.get("eval_key") != eval_key:  # same model, other evaluation: evaluate again
                report = _reevaluate(s, report, out_dir, judge)
            elif not _judge_again(report, out_dir, judge):
                report["reused"] = True
                return report
            # the same key trains the same model; the evaluation's settings and judge are these now
            report["settings"] = _report_settings(s) | {"judge": judge.name}
            write_json_atomic(report_path, report)
            report["reused"] = True
            return report
    started = time.time()
    os.makedirs(out_dir, exist_ok=True)
    mcfg = ModelConfig(name_or_path=s.model, dtype=s.dtype, attn_implementation=s.attn_implementation)
    tokenizer = load_tokenizer(mcfg)
    base = load_base(mcfg, seed=s.seed).eval()
    base_eval, beside = None, None
    if s.evaluate_base and _spare_cores(s):
        # the alignment's fixed thread count leaves cores idle: the base model is judged there, with
        # the same thread count, so its verdicts are those it gets one step after another
        beside = _judge_base_beside(s, out_dir, judge)
    elif s.evaluate_base:
        base_eval = _evaluate_base(s, out_dir, judge, base, tokenizer)
    try:
        t0 = time.time()
        data_path, counts = build_align_data(base, tokenizer, s, out_dir)
        targets_time = time.time() - t0
        del base

        overrides = {
            "model.name_or_path": s.model, "model.dtype": s.dtype, "model.attn_implementation": s.attn_implementation,
            "weights.method": "lora", "weights.lora_r": s.lora_r, "weights.lora_alpha": s.lora_alpha,
            "weights.lora_dropout": s.lora_dropout, "weights.target_modules": s.target_modules,
            "data.task": data_path, "data.max_length": s.max_length,
            "train.output_dir": os.path.join(out_dir, "adapter"), "train.overwrite": True, "train.seed": s.seed,
            "train.epochs": s.epochs, "train.max_steps": s.max_steps, "train.batch_size": s.batch_size,
            "train.learning_rate": s.learning_rate, "train.tensorboard": False, "train.progress_bar": s.progress,
            "checkpoint.every_steps": 0,
        }
        _set_all(cfg, overrides)
        result = train_model(cfg)
        merged = result.model.merge_and_unload()
        merged.config.use_cache = True
        if s.eval_attn_implementation:
            merged.set_attn_implementation(s.eval_attn_implementation)
        merged.save_pretrained(model_dir)
        result.tokenizer.save_pretrained(model_dir)
        aligned_eval = evaluate_model(merged, tokenizer, s, judge)
        with open(os.path.join(out_dir, "aligned_eval.json"), "w") as fh:
            json.dump(aligned_eval, fh, indent=2)
    except BaseException:
        if beside is not None:  # no base figures without an aligned model: stop waiting for them
            beside[0].shutdown(wait=False, cancel_futures=True)
        raise
    if beside is not None:
        pool, future = beside
        with pool:
            base_eval = future.result()
    report = {
        "key": key,
        "eval_key": eval_key,
        "settings": _report_settings(s) | {"judge": judge.name},
        "model_dir": os.path.abspath(model_dir),
        "data": counts,
        "train": {k: result.summary[k] for k in ("steps", "task_examples", "task_truncated", "mean_step_time_s", "wall_time_s")},
        "base": _metrics(base_eval) if base_eval else None,
        "aligned": _metrics(aligned_eval),
        "benign_targets_time_s": round(targets_time, 1),
        "torch_threads": torch.get_num_threads(),
        "wall_time_s": round(time.time() - started, 1),
        "reused": False,
    }
    write_json_atomic(report_path, report)
    return report


def _spare_cores(s: AlignSettings) -> bool:
    """Whether the alignment leaves CPU cores idle (a fixed thread count below the usable cores)."""
    from sap_dist.hardware import usable_cores

    return not torch.cuda.is_available() and s.threads is not None and usable_cores() > s.threads


def _evaluate_base(s: AlignSettings, out_dir: str, judge, base=None, tokenizer=None) -> dict:
    """Judge the base model as `s` says and write out_dir/base_eval.json (its own copy of the model
    and `s.threads` threads when called in a process of its own)."""
    from sap_dist.config import ModelConfig
    from sap_dist.models import load_base, load_tokenizer

    if base is None:
        if s.threads:
            torch.set_num_threads(s.threads)
        mcfg = ModelConfig(name_or_path=s.model, dtype=s.dtype, attn_implementation=s.attn_implementation)
        base, tokenizer = load_base(mcfg, seed=s.seed).eval(), load_tokenizer(mcfg)
    if s.eval_attn_implementation:
        base.set_attn_implementation(s.eval_attn_implementation)
    base_eval = evaluate_model(base, tokenizer, s, judge)
    if s.eval_attn_implementation:  # the alignment targets are generated as training computes
        base.set_attn_implementation(s.attn_implementation or "sdpa")
    with open(os.path.join(out_dir, "base_eval.json"), "w") as fh:
        json.dump(base_eval, fh, indent=2)
    return base_eval


def _judge_base_beside(s: AlignSettings, out_dir: str, judge):
    """Start judging the base model in a process of its own; (pool, future of its evaluation)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    return pool, pool.submit(_evaluate_base, dataclasses.replace(s, progress=False), out_dir, judge)


def _report_settings(s: AlignSettings) -> dict:
    return {k: v for k, v in dataclasses.asdict(s).items() if k != "task_eval"}


def _judge_again(report: dict, out_dir: str, judge) -> bool:
    """Judge the saved answers of base and aligned model again when another judge made their
    verdicts (updating `report` and the eval files); whether anything changed."""
    from sap_dist.evaluation.rejudge import rejudge_results, write_json_atomic

    changed = False
    for name in ("base", "aligned"):
        path = os.path.join(out_dir, f"{name}_eval.json")
        if report.get(name) is None or not os.path.exists(path):
            continue
        with open(path) as fh:
            results = json.load(fh)
        if results.get("judge") != judge.describe():
            results = rejudge_results(results, judge)
            write_json_atomic(path, results)
            report[name] = _metrics(results)
            changed = True
    return changed


def _reevaluate(s: AlignSettings, report: dict, out_dir: str, judge) -> dict:
    """Evaluate the base and the saved aligned model again with `s`'s evaluation settings."""
    from sap_dist.config import ModelConfig
    from sap_dist.models import load_base, load_tokenizer

    t0 = time.time()
    for name, source in (("base", s.model), ("aligned", os.path.join(out_dir, "model"))):
        if name == "base" and not s.evaluate_base:
            report["base"] = None
            continue
        mcfg = ModelConfig(name_or_path=source, dtype=s.dtype,
                           attn_implementation=s.eval_attn_implementation or s.attn_implementation)
        results = evaluate_model(load_base(mcfg, seed=s.seed).eval(), load_tokenizer(mcfg), s, judge)
        with open(os.path.join(out_dir, f"{name}_eval.json"), "w") as fh:
            json.dump(results, fh, indent=2)
        report[name] = _metrics(results)
    report["eval_key"] = s.eval_key()
    report["reevaluated_time_s"] = round(time.time() - t0, 1)
    return report


def _set_all(cfg, overrides: dict[str, Any]) -> None:
    """Apply `section.key: value` overrides (already typed) and validate."""
    from sap_dist.config import _apply, validate

    for key, value in overrides.items():
        _apply(cfg, key, value, "sap-dist align")
    validate(cfg)


def describe_report(report: dict) -> str:
    lines = []
    for name in ("base", "aligned"):
        m = report.get(name)
        if m:
            lines.append(f"{name:8s} refusal rate {m['refusal_rate']}% and harmful score {m['harmful_score']}% on "
                         f"{m['n_prompts']} held-out harmful prompts; over-refusal {m['over_refusal']}% on "
                         f"{m['n_benign']} benign prompts"
                         + (f"; task accuracy {m['task_accuracy']}%" if m.get("task_accuracy") is not None else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from sap_dist.help_format import DefaultsHelpFormatter

    p = argparse.ArgumentParser(prog="sap-dist align", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    d = AlignSettings()
    p.add_argument("--out", required=True, help="output directory (model/, align_report.json, ...)")
    p.add_argument("--model", default=d.model)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 on a GPU or a CPU with bf16 instructions (AVX512-BF16, AMX), fp32 on other CPUs, "
                        "where bf16 runs about 100x slower")
    p.add_argument("--attn-implementation", default=None)
    p.add_argument("--harmful-train", default=d.harmful_train)
    p.add_argument("--benign-train", default=d.benign_train)
    p.add_argument("--n-harmful", type=int)
    p.add_argument("--n-benign", type=int)
    p.add_argument("--method", default=d.method,
                   help="the trainer's method for the alignment: sft, or booster (Booster, an alignment-stage defence)")
    p.add_argument("--set", dest="trainer_overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a trainer override on top of the alignment's own (repeatable), e.g. booster.lamb=5")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--harmful-eval", default=d.harmful_eval)
    p.add_argument("--benign-eval", default=d.benign_eval)
    p.add_argument("--limit-eval", type=int, default=d.n_harmful_eval, help="harmful and benign eval prompts (each)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads while aligning; fixed so that the aligned model does not depend on "
                        "the machine's core count")
    p.add_argument("--no-base-eval", action="store_true", help="skip evaluating the model before alignment")
    p.add_argument("--judge", default=d.judge, choices=JUDGES, help="the judge of harmful answers")
    p.add_argument("--judge-model", help="checkpoint of a model judge (llama-guard, beaver-dam): hub id or directory")
    p.add_argument("--force", action="store_true", help="redo even when DIR holds an alignment with these settings")
    return p


def main(argv: list[str] | None = None) -> int:
    from sap_dist.run_control.stop import EXIT_REQUEUE, Preempted
    from sap_dist.config import ConfigError
    from sap_dist.data import DataError
    from sap_dist.embedded import EmbeddedModelError
    from sap_dist.hardware import resolve_dtype
    from sap_dist.models import ModelLoadError

    args = build_parser().parse_args(argv)
    dtype, why = resolve_dtype(args.dtype)
    if args.dtype == "auto":
        print(f"dtype: {dtype} ({why})")
    s = AlignSettings(threads=args.threads, model=args.model, dtype=dtype, attn_implementation=args.attn_implementation,
                      harmful_train=args.harmful_train, benign_train=args.benign_train, n_harmful=args.n_harmful,
                      n_benign=args.n_benign, method=args.method, trainer_overrides=args.trainer_overrides,
                      epochs=args.epochs, max_steps=args.max_steps,
                      learning_rate=args.learning_rate, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                      batch_size=args.batch_size, harmful_eval=args.harmful_eval, benign_eval=args.benign_eval,
                      n_harmful_eval=args.limit_eval, n_benign_eval=args.limit_eval,
                      max_new_tokens=args.max_new_tokens, seed=args.seed, evaluate_base=not args.no_base_eval,
                      judge=args.judge, judge_model=args.judge_model)
    try:
        report = align(s, args.out, reuse=not args.force)
    except Preempted:
        print("sap-dist align: stopped; run the same command again to start the alignment anew", file=sys.stderr)
        return EXIT_REQUEUE
    except (ConfigError, DataError, ModelLoadError, EmbeddedModelError) as exc:
        print(f"sap-dist align: error: {exc}", file=sys.stderr)
        return 2
    print(describe_report(report))
    print(f"aligned model: {report['model_dir']}" + (" (reused)" if report.get("reused") else ""))
    print(f"report: {os.path.abspath(os.path.join(args.out, REPORT))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
