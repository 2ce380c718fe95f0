"""The experiment's runs (`sap-dist experiment`, steps 3-4): fine-tune one (setting, method, seed)
from the start point with the trainer, judge it on the bundled harmful prompts, the independent
set, the benign prompts and the held-out task, and cache the result in its run directory. Plain
fine-tuning's runs are also judged part way (`curve_steps`): the sft curve other methods are
compared with at equal task accuracy."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sap_dist.experiment.settings import ExperimentSettings

RUN_METRICS = ("harmful_score", "refusal_rate", "over_refusal", "task_accuracy", "task_accuracy_by_subtask",
               "harmful_score_by_form", "harmful_score_keyword", "degenerate_share", "n_prompts", "n_benign", "n_task",
               "eval_time_s")
CURVE_METRICS = ("harmful_score", "harmful_score_independent", "task_accuracy")
"""What each point of the sft curve holds (besides step and evaluation time)."""


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def trainer_config(s: ExperimentSettings, start_model: str, method: str, data_path: str, seed: int, out: str,
                   learning_rate: float | None = None, safety: str | None = None):
    """The trainer's config of one run; `safety`: the pairs left by `safety_held_out_forms` (a
    file of prepare_data's), read by the methods that read safety pairs at all."""
    from sap_dist import methods as registry
    from sap_dist.config import load_config
    from sap_dist.experiment.settings import METHODS, method_of
    from sap_dist.hardware import resolve_dtype

    name, own = method_of(s, method)

    base = {
        "model.name_or_path": start_model, "model.dtype": resolve_dtype(s.dtype)[0], "model.attn_implementation": s.attn_implementation,
        "weights.method": "lora", "weights.lora_r": s.lora_r, "weights.lora_alpha": 2 * s.lora_r,
        "weights.lora_dropout": s.lora_dropout, "weights.target_modules": s.target_modules,
        "data.task": data_path, "data.safety": s.safety, "data.max_length": s.max_length,
        "train.output_dir": out, "train.overwrite": True, "train.seed": seed, "train.max_steps": s.steps,
        "train.epochs": s.epochs, "train.batch_size": s.batch_size,
        "train.learning_rate": learning_rate if learning_rate is not None else s.learning_rate,
        "train.tensorboard": False, "checkpoint.every_steps": 0,
        **METHODS[name],
    }
    overrides = [f"{k}={json.dumps(v)}" for k, v in base.items()]
    overrides += list(s.trainer_overrides) + list(s.method_overrides.get(name, []))
    if method != name:  # a variant: its own overrides, then any method_overrides given under its name
        overrides += own + list(s.method_overrides.get(method, []))
    cfg = load_config(None, overrides)
    if safety and registry.select(cfg.method).reads_safety_data:
        cfg = load_config(None, overrides + [f"data.safety={json.dumps(safety)}"])
    return cfg


def eval_sets(s: ExperimentSettings) -> dict[str, list[dict]]:
    """The prompt sets every run is judged on: harmful (bundled), benign, independent (may be empty)."""
    from sap_dist.evaluation.evaluate import load_prompts
    from sap_dist.evaluation.prompt_sets import load_independent

    return {"harmful": load_prompts(s.harmful_eval, limit=s.n_harmful_eval),
            "benign": load_prompts(s.benign_eval, limit=s.n_benign_eval),
            "independent": load_independent(s.independent_eval, s.n_independent_eval) if s.independent_eval else []}


def set_attn_implementation(model, name: str | None) -> None:
    """Switch a (peft-wrapped) model's attention implementation for generation; None: keep it."""
    if name:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.set_attn_implementation(name)


@contextlib.contextmanager
def generation_attention(model, name: str | None):
    """Generate with attention `name` inside the block, then switch back to what training uses."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = getattr(inner.config, "_attn_implementation", None)
    set_attn_implementation(model, name)
    try:
        yield
    finally:
        if name and before and before != name:
            inner.set_attn_implementation(before)


def judge_harmful(model, tokenizer, s: ExperimentSettings, sets: dict, benign: bool, task_eval: list[dict],
                  judge=None) -> dict:
    """Bundled harmful prompts (and benign ones when `benign`), the task, and the independent set,
    judged by `judge` (default: the judge `s.judge` names)."""
    from sap_dist.evaluation.evaluate import evaluate
    from sap_dist.evaluation.judges import make_judge
    from sap_dist.evaluation.prompt_sets import evaluate_independent

    judge = judge or make_judge(s.judge, s.judge_model)
    results = evaluate(model, tokenizer, sets["harmful"], sets["benign"] if benign else None, task_eval, judge,
                       s.max_new_tokens, s.task_max_new_tokens, s.eval_batch_size)
    results.update(evaluate_independent(model, tokenizer, sets["independent"], s.max_new_tokens, s.eval_batch_size,
                                        judge=judge))
    return results


CURVE_JUDGED = ("harmful_score", "harmful_score_independent")
"""The curve point's metrics that rest on the judge's verdicts."""


def judged_again(saved: dict, judge) -> dict | None:
    """A finished run's eval.json content (`saved`) with every stored answer to a harmful prompt
    judged by `judge`, at the end and at each curve point, and the row's scores recomputed; None
    when a curve point's answers were not stored (the run is then made again)."""
    from sap_dist.evaluation.prompt_sets import INDEPENDENT_KEYS
    from sap_dist.evaluation.rejudge import rejudge_results

    row, results = dict(saved["row"]), rejudge_results(saved["results"], judge)
    row.update({k: results.get(k) for k in RUN_METRICS + INDEPENDENT_KEYS if k != "eval_time_s"})
    curve_answers = {p["step"]: p for p in saved.get("curve_answers", [])}
    if "curve" in row:
        points = []
        for point in row["curve"]:
            if point.get("end"):
                judged = results
            elif point["step"] in curve_answers:
                judged = rejudge_results(curve_answers[point["step"]], judge)
                curve_answers[point["step"]] = {"step": point["step"], "harmful": judged["harmful"],
                                                "independent": judged.get("independent", [])}
            else:
                return None
            points.append(point | {k: judged.get(k) for k in CURVE_JUDGED})
        row["curve"] = points
    return {**saved, "row": row, "results": results, "curve_answers": list(curve_answers.values())}


def _safety_identity(s: ExperimentSettings, cfg) -> dict | None:
    """What makes the safety pairs a run reads: the forms held out (the file they leave keeps its
    path) and a local file's bytes. None for a run that reads no pairs, which is then reused
    whatever the pairs are."""
    from sap_dist import methods as registry

    if not registry.select(cfg.method).reads_safety_data:
        return None
    sha = None
    if os.path.isfile(cfg.data.safety):
        with open(cfg.data.safety, "rb") as fh:
            sha = hashlib.sha256(fh.read()).hexdigest()
    return {"held_out_forms": sorted(s.safety_held_out_forms), "file_sha256": sha}


def run_dir_name(method: str, learning_rate: float | None) -> str:
    return method if learning_rate is None else f"{method}_lr{learning_rate:g}"


def run_one(s: ExperimentSettings, start_model: str, setting: str, method: str, seed: int, data_path: str,
            sets: dict, task_eval: list[dict], out_dir: str, learning_rate: float | None = None,
            curve_steps: list[int] | None = None, judge=None, safety: str | None = None) -> dict:
    """Fine-tune one (setting, method, seed), evaluate it with `judge` (default: `s.judge`'s),
    write its eval.json; reuse a finished run with the same configuration (judging its saved
    answers again when another judge made its verdicts). `curve_steps`: also judge the model
    after these steps (harmful on both sets and task accuracy, as `curve` in the row, with the end
    point last; their answers are kept in eval.json's `curve_answers`). `safety`: as in
    `trainer_config`."""
    from sap_dist.config import to_dict
    from sap_dist.evaluation.judges import make_judge
    from sap_dist.evaluation.prompt_sets import INDEPENDENT_KEYS
    from sap_dist.evaluation.rejudge import write_json_atomic
    from sap_dist.fingerprint import code_fingerprint
    from sap_dist.train import train_model

    judge = judge or make_judge(s.judge, s.judge_model)

    run_dir = os.path.join(out_dir, "runs", setting, run_dir_name(method, learning_rate), f"seed{seed}")
    cfg = trainer_config(s, start_model, method, data_path, seed, run_dir, learning_rate, safety)
    with open(data_path, "rb") as fh:
        data_sha = hashlib.sha256(fh.read()).hexdigest()
    eval_conf = {k: getattr(s, k) for k in ("harmful_eval", "n_harmful_eval", "benign_eval", "n_benign_eval",
                                            "independent_eval", "n_independent_eval", "max_new_tokens",
                                            "task_max_new_tokens", "eval_attn_implementation")}
    code = code_fingerprint()  # a finished run is reused only by the code that made it
    key = _hash({"cfg": to_dict(cfg), "data": data_sha, "safety": _safety_identity(s, cfg), "eval": eval_conf,
                 "task_eval": task_eval,
                 "curve_steps": sorted(set(curve_steps or [])), "code": code})
    eval_path = os.path.join(run_dir, "eval.json")
    if os.path.exists(eval_path):
        with open(eval_path) as fh:
            previous = json.load(fh)
        if previous.get("run_key") == key:
            if previous["results"].get("judge") == judge.describe():
                return previous["row"] | {"reused": True}
            again = judged_again(previous, judge)
            if again is not None:
                write_json_atomic(eval_path, again)
                return again["row"] | {"reused": True, "judged_again": True}
        os.remove(eval_path)  # stale: the run is redone (and overwrite refuses files a run does not write)

    curve: list[dict] = []
    curve_answers: list[dict] = []
    wanted = set(curve_steps or [])

    def judge_part_way(step: int, model, tokenizer) -> None:
        if step in wanted:
            with generation_attention(model, s.eval_attn_implementation):
                results = judge_harmful(model, tokenizer, s, sets, False, task_eval, judge)
            curve.append({"step": step, **{k: results.get(k) for k in CURVE_METRICS},
                          "eval_time_s": results["eval_time_s"] + (results["eval_time_independent_s"] or 0)})
            curve_answers.append({"step": step, "harmful": results["harmful"], "independent": results["independent"]})

    started = time.time()
    result = train_model(cfg, judge_part_way if wanted else None)
    train_time = time.time() - started - sum(p["eval_time_s"] for p in curve)
    set_attn_implementation(result.model, s.eval_attn_implementation)
    results = judge_harmful(result.model, result.tokenizer, s, sets, True, task_eval, judge)
    summary = result.summary
    if curve_steps is not None:
        curve = [p for p in curve if p["step"] < summary["steps"]]
        curve_answers = [p for p in curve_answers if p["step"] < summary["steps"]]
        curve.append({"step": summary["steps"], **{k: results.get(k) for k in CURVE_METRICS}, "end": True})
    row = {"setting": setting, "method": method, "seed": seed, "learning_rate": cfg.train.learning_rate,
           **{k: results.get(k) for k in RUN_METRICS + INDEPENDENT_KEYS},
           "train_time_s": round(train_time, 1), "mean_step_time_s": summary.get("mean_step_time_s"),
           "steps": summary.get("steps"), "task_examples": summary.get("task_examples"),
           "model_dir": summary.get("output_dir"), "metrics": summary.get("metrics"), "code": code, "reused": False}
    if curve_steps is not None:
        row["curve"] = curve
    write_json_atomic(eval_path, {"run_key": key, "row": row, "results": results, "curve_answers": curve_answers})
    del result
    return row
