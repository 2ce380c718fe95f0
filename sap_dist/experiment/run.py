"""`sap-dist experiment`: does SAP keep a fine-tuned model as safe as it was, while it learns the
task as well as plain fine-tuning? Side by side, several seeds, judged the same way.

    sap-dist experiment --preset quick|full|tiny --out DIR [--seeds 0,1,2] [--model M] [--task SRC]
                        [--safety SRC] [--methods sft,sap_paper,...] [--threads N] [--jobs N]
                        [--set name=value ...]
                        [section.key=value ...]

1. Start point: `sap-dist align` makes the model refuse (cached under `--align-dir`, default
   `$SAP_DIST_CACHE/aligned/<settings hash>`, and reused across seeds and runs), or with
   `--no-align` the model itself (an already aligned chat model).
2. Data: the task data minus a held-out tail (`task_eval_size` rows) for exact-match accuracy;
   the *poisoned* setting mixes a fraction `poison` of harmful prompts answered with compliant
   openers into it (the Vaccine/Lisa/Booster setting, p=0.1), the *clean* setting does not.
3. Methods, each fine-tuned from the start point on the same data with the trainer
   (`sap_dist.train.train_model`), over `seeds` (or `method_seeds[method]`): `sft` (plain),
   `sap_paper` (SAP, Algorithm 1, at the trainer's defaults: the safety direction recomputed every
   4th step, the probe on half the batch), `sap_every_step` (the same with a fresh safety direction
   on every step), `sap_fast` (the defaults with the probe on a quarter of the batch),
   `sap_reference` (SAP, the reference code's
   variant), `lisa` (the Lisa baseline), `mix` (plain fine-tuning with a fraction `mix_fraction`
   of refusal examples mixed into the data, as SafeInstr does), any other method registered
   in METHODS, and `variants` (a method with overrides of its own under a new name, so settings
   of one method run side by side against one sft curve).
4. Each run is judged (`sap_dist.evaluation.evaluate.evaluate`) on held-out harmful prompts (harmful score),
   benign prompts (over-refusal), the held-out task (accuracy), and an independent harmful set
   written by others (`independent_eval`, DoNotAnswer's test half by default:
   `harmful_score_independent`, per risk area too; `sap_dist.evaluation.prompt_sets`). The start point
   and the base model are judged the same way (in `sap-dist align`).
5. The sft curve: plain fine-tuning on the poisoned data is also judged after `curve_steps`
   (inside the same run, `train_model`'s `on_step_end`), and at `curve_learning_rates`; with the
   start point as step 0 these points give harmful score against task accuracy for plain
   fine-tuning stopped early. Each method's `harmful_below_sft_curve` is its mean harmful score
   minus the curve's at its mean task accuracy (negative: safer at equal accuracy).
6. DIR/results.json (per method: both harmful scores, task_accuracy, over_refusal, train time,
   model_dir, per seed and mean/sd/min/max, `harmful_below_sft_curve`; `sft_curve`), DIR/table.md,
   DIR/harmful_vs_accuracy.png (one panel per harmful set, with the sft curve) and
   DIR/training_curves.png. Finished runs (DIR/runs/.../eval.json with the same settings) are
   reused, so adding seeds or methods only runs what is new. Every run keeps its answers, so
   another judge (`--judge careful`) judges them again without training or generating: in
   seconds for `careful` or `keyword`, a minute or two per run for `careful-lm`.

Trainer overrides (`section.key=value`, e.g. `sap.rho=0.05`) apply to every fine-tuning run; they
and `--set` make sweeps: `--methods sap_paper --set tag=rho05 sap.rho=0.05`. Sweeps that choose
settings judge on DoNotAnswer's validation half (`--set independent_eval=builtin:donotanswer_val`),
so the test half reports the chosen settings once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import torch

from sap_dist.experiment.data import prepare_data
from sap_dist.experiment.parallel import run_at_a_time, threads_per_job
from sap_dist.experiment.report import aggregate, compare_with_curve, make_plots, markdown_table, sft_curve
from sap_dist.experiment.runs import eval_sets, run_one
from sap_dist.experiment.settings import METHODS, PRESETS, ExperimentSettings, method_labels, method_of, settings_from

def run_plan(s: ExperimentSettings) -> list[tuple[int, str, str, float | None]]:
    """(seed, setting, method, learning rate or None) of every fine-tuning run, seed by seed (so an
    interrupted experiment has whole seeds): each method in the poisoned setting over its seeds,
    the clean setting's methods over `clean_seeds`, sft at each `curve_learning_rates`, and the
    persistent attack's methods over `seeds`."""
    runs = []
    curve_setting = "poisoned" if s.poison else "clean"
    for seed in sorted(set(s.seeds) | {k for ks in s.method_seeds.values() for k in ks}):
        for method in s.methods:
            if seed in s.method_seeds.get(method, s.seeds):
                runs.append((seed, curve_setting, method, None))
        if s.poison and seed in (s.clean_seeds if s.clean_seeds is not None else s.seeds):
            runs += [(seed, "clean", method, None) for method in s.clean_methods]
        if seed in s.method_seeds.get("sft", s.seeds):
            runs += [(seed, curve_setting, "sft", lr) for lr in s.curve_learning_rates]
        if seed in s.seeds:
            runs += [(seed, "persistent", method, None) for method in s.persistent_methods]
    return runs


# ------------------------------------------------------------------------------------------
# The experiment


def _print_run(planned: tuple[int, str, str, float | None], row: dict) -> None:
    seed, setting, method, lr = planned
    print(f"[{setting} {method}{'' if lr is None else f' lr {lr:g}'} seed {seed}] harmful {row['harmful_score']}% "
          f"({row.get('harmful_score_independent')}% on {row.get('n_independent')} independent)  "
          f"task {row['task_accuracy']}%  over-refusal {row['over_refusal']}%  train {row['train_time_s']} s"
          + ("  (judged again)" if row.get("judged_again") else "  (reused)" if row.get("reused") else ""),
          flush=True)


def _align_root() -> str:
    from sap_dist.embedded import cache_root

    return os.path.join(os.path.dirname(cache_root()), "aligned")


def run_experiment(s: ExperimentSettings, out_dir: str, align_dir: str | None = None, preset: str = "",
                   command: str = "") -> dict:
    from sap_dist.align import AlignSettings, align, evaluate_model
    from sap_dist.config import ModelConfig
    from sap_dist.evaluation.judges import make_judge
    from sap_dist.hardware import resolve_dtype
    from sap_dist.models import load_base, load_tokenizer
    from sap_dist.run_control.stop import Preempted

    started = time.time()
    load_start = os.getloadavg()
    dtype, why = resolve_dtype(s.dtype)
    if s.dtype == "auto":
        print(f"dtype: {dtype} ({why})")
    s = dataclasses.replace(s, dtype=dtype)  # the caches are keyed by what runs, not by `auto`
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
                            independent_eval=s.independent_eval, n_independent_eval=s.n_independent_eval,
                            max_new_tokens=s.max_new_tokens, task_max_new_tokens=s.task_max_new_tokens,
                            eval_batch_size=s.eval_batch_size, eval_attn_implementation=s.eval_attn_implementation,
                            threads=s.align_threads, method=s.align_method,
                            trainer_overrides=list(s.align_trainer_overrides), judge=s.judge,
                            judge_model=s.judge_model)
    judge = make_judge(s.judge, s.judge_model)
    if s.align:
        align_dir = align_dir or os.path.join(_align_root(), align_s.key())
        t0 = time.time()
        report = align(align_s, align_dir, judge=judge)
        align_time = time.time() - t0
        start_model = report["model_dir"]
        reference = {"base": report.get("base"), "aligned": report["aligned"]}
        print(f"start point: {start_model} ({'reused' if report.get('reused') else f'aligned in {align_time:.0f} s'})")
    else:
        report, align_time, start_model = None, 0.0, s.model
        mcfg = ModelConfig(name_or_path=s.model, dtype=s.dtype,
                           attn_implementation=s.eval_attn_implementation or s.attn_implementation)
        model = load_base(mcfg).eval()
        reference = {"base": None, "aligned": {k: v for k, v in evaluate_model(model, load_tokenizer(mcfg), align_s, judge).items()
                                               if not isinstance(v, list)}}
        del model
    sets = eval_sets(s)
    rows, curve_rows = [], []
    curve_setting = "poisoned" if s.poison else "clean"
    plan = run_plan(s)
    calls = []
    for seed, setting, method, lr in plan:
        kind = "mix" if method_of(s, method)[0] == "mix" else "plain"
        on_curve = method == "sft" and setting == curve_setting
        curve_steps = [k for k in s.curve_steps if s.steps is None or k < s.steps] if on_curve else None
        calls.append(dict(s=s, start_model=start_model, setting=setting, method=method, seed=seed,
                          data_path=data["train"][setting][kind], sets=sets, task_eval=task_eval, out_dir=out_dir,
                          learning_rate=lr, curve_steps=curve_steps, safety=data["safety"]))
    jobs = min(s.jobs, len(calls))
    if jobs > 1 and torch.cuda.is_available():
        print(f"jobs: 1, not {s.jobs} (the runs share the GPU one at a time)")
        jobs = 1
    threads = threads_per_job(jobs, s.threads) if jobs > 1 else torch.get_num_threads()
    finished: dict[int, dict] = {}
    if jobs > 1:
        print(f"runs: {jobs} at a time, {threads} torch thread(s) each")
        try:
            # each worker makes its own judge from `s`, once (a model judge loads its model in each)
            for index, row in run_at_a_time(run_one, calls, jobs, threads):
                finished[index] = row
                _print_run(plan[index], row)
        except KeyboardInterrupt:
            raise Preempted("stopped by Ctrl-C", None) from None
    else:
        for index, call in enumerate(calls):
            finished[index] = run_one(**call, judge=judge)
            _print_run(plan[index], finished[index])
    for index, (_, _, _, lr) in enumerate(plan):  # plan order, whatever order the runs finished in
        (rows if lr is None else curve_rows).append(finished[index])
    summary = aggregate(rows, method_labels(s))
    curve = sft_curve(rows + curve_rows, reference.get("aligned"), curve_setting)
    compare_with_curve(summary, curve)
    table = markdown_table(summary, reference, s, curve, judge.describe())
    plots = make_plots(summary, reference, out_dir, s, curve)
    results = {
        "preset": preset, "command": command, "tag": s.tag, "settings": dataclasses.asdict(s),
        "start_model": start_model, "align": report, "align_time_s": round(align_time, 1),
        "data": data["counts"], "reference": reference, "methods": summary, "sft_curve": curve,
        "sft_curve_runs": curve_rows, "table_markdown": table,
        "plots": plots, "wall_time_s": round(time.time() - started, 1),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "jobs": jobs,
                    "threads_per_job": threads,
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
    p.add_argument("--methods", help=f"comma-separated, from {', '.join(METHODS)} and the names of `variants`")
    p.add_argument("--poison", type=float, help="poisoned fraction p (0: clean setting only)")
    p.add_argument("--no-align", action="store_true", help="fine-tune --model as it is (already aligned)")
    p.add_argument("--align-dir", help="where the aligned model is cached (default $SAP_DIST_CACHE/aligned/<hash>)")
    p.add_argument("--threads", type=int, help="torch CPU threads (of each run, with --jobs)")
    p.add_argument("--jobs", type=int, help="fine-tuning runs at a time on the CPU, each in its own process "
                                            "(default: the preset's)")
    p.add_argument("--judge", help=f"the judge of harmful answers (default {ExperimentSettings.judge}; finished runs "
                                   "are judged again from their saved answers)")
    p.add_argument("--judge-model", help="checkpoint of a model judge (llama-guard, beaver-dam): hub id or directory")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="any experiment setting (see ExperimentSettings in sap_dist/experiment/settings.py), repeatable")
    return p


def main(argv: list[str] | None = None) -> int:
    from sap_dist.config import ConfigError
    from sap_dist.data import DataError
    from sap_dist.embedded import EmbeddedModelError
    from sap_dist.models import ModelLoadError
    from sap_dist.run_control.stop import EXIT_REQUEUE, Preempted
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
        "threads": args.threads, "jobs": args.jobs, "align": False if args.no_align else None, "judge": args.judge,
        "judge_model": args.judge_model,
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
    except Preempted:
        # Ctrl-C or SIGTERM: the run in progress stopped at a step boundary; finished runs are kept
        print("sap-dist experiment: stopped; run the same command again to continue (finished runs are reused)",
              file=sys.stderr)
        return EXIT_REQUEUE
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
