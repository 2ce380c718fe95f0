"""The experiment's settings (`sap-dist experiment`): the methods it can run, the typed settings
and the presets. Its own module so that the experiment's parts (data, runs, report) read them
without importing the experiment that imports them."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from sap_dist import methods as registry
from sap_dist.evaluation.judges import DEFAULT_JUDGE, JUDGES, check_judge_model


METHODS: dict[str, dict[str, Any]] = {name: overrides for name, (_, overrides) in registry.experiment_methods().items()}
METHODS["mix"] = {"method": "sft"}
"""Trainer settings of each experiment method: those the method modules declare
(`sap_dist.methods`), and `mix`, which differs from plain fine-tuning by its data only."""
METHOD_LABELS = {name: label for name, (label, _) in registry.experiment_methods().items()} | {"mix": "safety-data mixing"}


@dataclass
class ExperimentSettings:
    # model and start point
    model: str = "smollm2-135m-instruct"
    """Model to align and fine-tune (any model.name_or_path)."""
    dtype: str = "auto"
    """Compute dtype of alignment, fine-tuning and judging: `auto` takes bf16 on a GPU or a CPU
    with bf16 instructions (AVX512-BF16, AMX) and fp32 on other CPUs, where bf16 runs about
    100x slower (`sap_dist/hardware.py`); results.json records what it resolved to."""
    attn_implementation: str | None = None
    align: bool = True
    """Align the model first (`sap-dist align`); false: fine-tune `model` as it is."""
    align_method: str = "sft"
    """How the start point is aligned: `sft`, or `booster` (an alignment-stage defence; the
    fine-tuning methods then start from a Booster-aligned model)."""
    align_trainer_overrides: list[str] = field(default_factory=list)
    """Trainer overrides for the alignment, e.g. `booster.lamb=5`."""
    align_epochs: float = 2.0
    align_max_steps: int | None = None
    align_learning_rate: float = 2e-4
    align_lora_r: int = 16
    align_n_harmful: int | None = None
    align_n_benign: int | None = None
    align_benign_max_new_tokens: int = 64
    align_threads: int | None = 1
    """torch CPU threads while aligning (`AlignSettings.threads`): fixed, so the start point does not
    depend on the machine's core count; `threads` applies to the fine-tuning runs."""
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
    safety_held_out_forms: list[str] = field(default_factory=list)
    """Request forms (the rows' `form` field) taken out of the fine-tuning's safety data: the
    safety pairs (SAP's harmful direction, the anchors, Lisa's alignment steps) and `mix`'s
    refusal rows; runs that read no safety pairs are unaffected (and reused). The per-form
    table then sets the bundled prompts of these forms apart, to show whether a defence holds on
    requests unlike its data. Empty: every form. The alignment keeps every form."""
    harmful_eval: str = "builtin:harmful_eval"
    n_harmful_eval: int | None = 100
    benign_eval: str = "builtin:benign_eval"
    n_benign_eval: int | None = 80
    independent_eval: str | None = "builtin:donotanswer_test"
    """Harmful prompts written by others, judged beside `harmful_eval` in every run (`None`: off).
    Sweeps that choose settings pass `--set independent_eval=builtin:donotanswer_val`, so the
    test half is reported once, for the chosen settings."""
    n_independent_eval: int | None = None
    """Use N independent prompts spread evenly over the file, so every risk area is in (None: all)."""
    poison: float = 0.1
    """Fraction of the poisoned setting's fine-tuning set that is harmful prompts with compliant
    openers (0 disables the poisoned setting)."""
    poison_source: str = "builtin:harmful_train"
    persistent_poison: float = 0.2
    """Poison fraction of the persistent attack, a third setting where the literature sees
    defences collapse (Booster and Lisa report p=0.2); its runs are `persistent_methods`'."""
    persistent_methods: list[str] = field(default_factory=list)
    """Methods also run under the persistent attack, over `seeds` (empty: no persistent setting)."""
    mix_fraction: float = 0.03
    """Fraction of refusal examples in the `mix` method's data (SafeInstr: 3%)."""
    mix_source: str = "builtin:harmful_train"
    # runs
    methods: list[str] = field(default_factory=lambda: ["sft", "sap_paper", "sap_reference", "mix"])
    clean_methods: list[str] = field(default_factory=lambda: ["sft"])
    """Methods also run on the clean (unpoisoned) data."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    method_seeds: dict[str, list[int]] = field(default_factory=dict)
    """Seeds of a method in the poisoned setting when they differ from `seeds` (e.g. {"mix": [0, 1, 2]})."""
    curve_steps: list[int] = field(default_factory=list)
    """Steps at which plain fine-tuning (`sft`, poisoned data) is also judged (harmful on both sets,
    task accuracy), besides its end point: the sft curve every method is compared with at equal
    task accuracy (`harmful_below_sft_curve`). Steps at or past the end are ignored."""
    curve_learning_rates: list[float] = field(default_factory=list)
    """Further sft runs at these learning rates (same seeds and `curve_steps`), extending the curve."""
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
    variants: dict[str, list[str]] = field(default_factory=dict)
    """More methods by name: a method above followed by `section.key=value` strings of its own,
    e.g. {kl3: [anchor_kl, anchor.weight=3]} (quote an override with brackets in it:
    'sap.probe_layers=[2]'). Name them in `methods` like any other, so one
    experiment (with one sft curve) compares settings of a method side by side. A variant takes
    its method's `method_overrides`, then its own, then any `method_overrides` under its name."""
    # evaluation
    max_new_tokens: int = 32
    task_max_new_tokens: int = 8
    eval_batch_size: int = 32
    eval_attn_implementation: str | None = None
    """Attention implementation for generation (e.g. `sdpa`), when it differs from training's."""
    judge: str = DEFAULT_JUDGE
    """Which judge calls answers to harmful prompts harmful (`sap-dist judge`'s names: `careful`,
    `careful-lm`, `keyword`, ...; docs/judging.md). Changing it judges every finished run's
    saved answers again (sft curve points, and the start point cached by the align step, included)
    without training or generating; a start point given with `align: false` is judged anew."""
    judge_model: str | None = None
    """Checkpoint of a model judge (`llama-guard`, `beaver-dam`): a hub id or a local directory,
    e.g. on an offline node; None: the judge's official checkpoint."""
    clean_seeds: list[int] | None = None
    """Seeds of the clean setting's runs (None: all `seeds`)."""
    threads: int | None = None
    """torch CPU threads of the fine-tuning runs and their judging (None: torch's default, or with
    `jobs` above 1 the usable cores shared out among the runs); the alignment uses `align_threads`."""
    jobs: int = 1
    """Fine-tuning runs at a time on the CPU, each in a process of its own with `threads` torch
    threads or its share of the cores (on a GPU: one at a time). For machines with more cores than
    one small model's run keeps busy. A run's figures depend on its thread count, and on 2 cores
    with AVX512-BF16 a run trained 1.84x as long with 1 thread beside another as with 2 alone, so
    the quick preset keeps 1 (docs/experiment.md, "Time")."""
    tag: str = ""
    """Free label stored with the results (e.g. the sweep setting)."""


PRESETS: dict[str, dict[str, Any]] = {
    # seconds: a random 4-layer model, for tests and trying the pipeline
    "tiny": dict(model="tiny-random-llama", dtype="fp32", align_max_steps=2, align_n_harmful=8, align_n_benign=8,
                 align_benign_max_new_tokens=8, task_eval_size=8, task_train_size=32, n_harmful_eval=6,
                 n_benign_eval=4, steps=2, batch_size=4, lora_r=4, lora_dropout=0.0, max_length=64,
                 max_new_tokens=4, task_max_new_tokens=4, eval_batch_size=8, seeds=[0], n_independent_eval=10,
                 curve_steps=[1], curve_learning_rates=[1e-4],
                 method_overrides={m: ["sap.safety_batch_size=4", "sap.probe_layers=[1,2]"]
                                   for m in ("sap_paper", "sap_reference", "sap_every_step", "sap_fast")},
                 trainer_overrides=["data.safety_max_length=64"]),
    # the README's table: 3 seeds, sft judged part way at step 16, all 412 DoNotAnswer test prompts;
    # the KL anchor as the recommended configuration beside plain fine-tuning, SAP and Lisa.
    # 2 CPU cores, from nothing: 39 minutes in bf16 with AVX512-BF16, 81 in fp32 with AVX2 only
    # (docs/experiment.md, "Time"); a curve point costs a full judging
    "quick": dict(attn_implementation="eager", eval_attn_implementation="sdpa", align_epochs=2.0, steps=24,
                  batch_size=8, learning_rate=3e-4, lora_dropout=0.0, n_harmful_eval=100, n_benign_eval=50,
                  max_new_tokens=16, task_max_new_tokens=6, eval_batch_size=100, clean_methods=[], clean_seeds=[0],
                  methods=["sft", "sap_paper", "lisa", "anchor_kl"],
                  curve_steps=[16], trainer_overrides=["data.safety_max_length=96"]),
    # the full bundled evaluation sets and DoNotAnswer test half, longer fine-tuning (2 epochs: 111
    # steps on the bundled task), sft also at a lower learning rate; on a GPU, pass --model/--task
    # for the paper's setting
    "full": dict(align_epochs=3.0, epochs=2.0, n_harmful_eval=None, n_benign_eval=None, max_new_tokens=64,
                 task_max_new_tokens=16, methods=["sft", "sap_paper", "sap_reference", "lisa", "mix"],
                 curve_steps=[28, 56, 84], curve_learning_rates=[1e-4]),
}


def settings_from(preset: str, **changes: Any) -> ExperimentSettings:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in changes.items() if v is not None}}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(ExperimentSettings)})
    if unknown:
        raise ValueError(f"unknown experiment setting(s) {', '.join(unknown)}")
    s = ExperimentSettings(**values)
    if not isinstance(s.method_seeds, dict) or not all(
            isinstance(v, list) and all(isinstance(k, int) for k in v) for v in s.method_seeds.values()):
        raise ValueError(f"method_seeds must map methods to lists of seeds, e.g. {{\"mix\": [0, 1, 2]}}; "
                         f"got {s.method_seeds!r}")
    _check_variants(s.variants)
    if not isinstance(s.safety_held_out_forms, list) or not all(isinstance(f, str) for f in s.safety_held_out_forms):
        raise ValueError(f"safety_held_out_forms must be a list of form names, e.g. [writing, code]; "
                         f"got {s.safety_held_out_forms!r}")
    bad = [str(m) for m in s.methods + s.clean_methods + s.persistent_methods + list(s.method_seeds)
           if m not in METHODS and m not in s.variants]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)}; use {', '.join(METHODS)} or a name of `variants`")
    from sap_dist.hardware import check_dtype

    if s.judge not in JUDGES:
        raise ValueError(f"unknown judge {s.judge!r}; use one of {', '.join(JUDGES)}")
    check_judge_model(s.judge, s.judge_model)
    check_dtype(s.dtype)
    if not 0 <= s.poison < 1 or not 0 <= s.mix_fraction < 1 or not 0 < s.persistent_poison < 1:
        raise ValueError("poison and mix_fraction must be in [0, 1), persistent_poison in (0, 1)")
    if not isinstance(s.jobs, int) or isinstance(s.jobs, bool) or s.jobs < 1:
        raise ValueError(f"jobs must be a whole number of at least 1; got {s.jobs!r}")
    if any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in s.curve_steps):
        raise ValueError(f"curve_steps must be positive step numbers, got {s.curve_steps}")
    if any(not isinstance(lr, (int, float)) or lr <= 0 for lr in s.curve_learning_rates):
        raise ValueError(f"curve_learning_rates must be positive numbers, got {s.curve_learning_rates}")
    return s


def _check_variants(variants: Any) -> None:
    """Each variant: a run-folder-safe new name, a method of METHODS and at least one override the
    trainer accepts, checked now rather than when its first run starts after the alignment."""
    from sap_dist.config import ConfigError, load_config

    if not isinstance(variants, dict):
        raise ValueError(f"variants must map new names to a method and its overrides, e.g. "
                         f"{{kl3: [anchor_kl, anchor.weight=3]}}; got {variants!r}")
    for name, spec in variants.items():
        where = f"variants: {name!r}"
        if (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", name)
                or re.search(r"_lr[0-9.e-]+$", name)):
            raise ValueError(f"{where}: a name starts with a letter and holds letters, digits, '_', '.', '-' "
                             "(and does not end like a curve run's _lr<rate>)")
        if name in METHODS:
            raise ValueError(f"{where} is already a method; give the variant another name")
        if not isinstance(spec, list) or len(spec) < 2 or not all(isinstance(x, str) for x in spec):
            raise ValueError(f"{where}: give a method and at least one override, e.g. [anchor_kl, anchor.weight=3]")
        if spec[0] not in METHODS:
            raise ValueError(f"{where}: unknown method {spec[0]!r}; use one of {', '.join(METHODS)}")
        try:
            load_config(None, [f"{k}={json.dumps(v)}" for k, v in METHODS[spec[0]].items()] + spec[1:])
        except ConfigError as exc:
            raise ValueError(f"{where}: {exc}") from None


def method_of(s: ExperimentSettings, name: str) -> tuple[str, list[str]]:
    """The method of METHODS that run name `name` trains with, and the overrides of its own (a
    variant's; none for a method)."""
    if name in s.variants:
        return s.variants[name][0], list(s.variants[name][1:])
    return name, []


def method_labels(s: ExperimentSettings) -> dict[str, str]:
    """How the table names each method and variant."""
    return METHOD_LABELS | {name: f"{METHOD_LABELS[method]}, {' '.join(own)}"
                            for name, (method, own) in ((n, method_of(s, n)) for n in s.variants)}


def setting_label(s: ExperimentSettings, setting: str, short: bool = False) -> str:
    """How the table and plots name a setting's data: `clean`, `poisoned p=0.1`, `persistent p=0.2`."""
    if setting == "clean":
        return "clean"
    p = s.persistent_poison if setting == "persistent" else s.poison
    return f"p={p:g}" if short and setting == "poisoned" else f"{setting} p={p:g}"
