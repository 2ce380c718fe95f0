"""Every check the trainer makes on a config before it starts, at a given world size, without
GPUs or a process group: the batch sizes over the ranks (`sap_dist.batching`), the backend and
its options, the refresh intervals. The trainer runs it first thing on every rank; `sap-dist
config --config FILE --world-size N [overrides]` runs it as a dry run for N ranks.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field

from sap_dist.batching import EffectiveBatches, effective_batches
from sap_dist.config import Config, ConfigError

DEEPSPEED_BACKENDS = ("deepspeed", "zero2", "zero3", "zero3_offload")
"""Backends that run DeepSpeed (and read `dist.deepspeed_config`)."""


@dataclass
class Preflight:
    """What a run at a world size will use, once every check passed."""

    backend: str
    """The backend the run builds (`auto` resolved from the launcher's environment)."""
    batches: EffectiveBatches
    """Its global batches after rounding to the ranks."""
    warnings: list[str] = field(default_factory=list)
    """Settings the run changes or ignores with a warning (e.g. in a DeepSpeed config file)."""


def check(cfg: Config, world_size: int, env: dict | None = None, installed: bool = True) -> Preflight:
    """The checks a run of `cfg` at `world_size` ranks makes before it loads anything;
    ConfigError with one line naming the key otherwise. `env` is the launcher's environment
    (default: this process's). `installed=False` skips the check that the backend's packages
    are importable here (a login node planning for a GPU node)."""
    from sap_dist.backends import check_backend_installed, check_launcher_env

    env = dict(os.environ if env is None else env)
    check_launcher_env(cfg.dist.backend, cfg.model.dtype, env)
    backend = resolve(cfg, world_size, env)
    if installed:
        check_backend_installed(backend)
    batches = effective_batches(cfg, world_size)
    if cfg.train.max_steps is not None:
        check_run_length(cfg, cfg.train.max_steps)
    found = deepspeed_warnings(cfg, backend, world_size, env) if backend in DEEPSPEED_BACKENDS else []
    return Preflight(backend, batches, found)


def resolve(cfg: Config, world_size: int, env: dict) -> str:
    """The backend `dist.backend` names at `world_size` ranks (`auto`: from the launcher's
    environment as the trainer reads it); ConfigError for a name or rank count it cannot run."""
    from sap_dist.backends import resolve_backend

    launched = {**env, "WORLD_SIZE": str(world_size), "RANK": "0"}
    try:
        backend = resolve_backend(cfg.dist.backend, env=launched)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if backend == "single" and world_size > 1:
        raise ConfigError(f"dist.backend=single cannot run in {world_size} processes; use ddp, zero2, zero3 or fsdp2")
    if cfg.dist.zero_stage is not None and cfg.dist.zero_stage not in (2, 3):
        raise ConfigError(f"dist.zero_stage={cfg.dist.zero_stage}: ZeRO stage 2 or 3 (or null)")
    return backend


def deepspeed_warnings(cfg: Config, backend: str, world_size: int, env: dict) -> list[str]:
    """Build the run's DeepSpeed config as the backend will (the user's file included) and return
    its warnings; ConfigError naming the file when it cannot be read or is refused (a key that
    contradicts the run: the ZeRO stage, clipping, batch sizes)."""
    import torch

    from sap_dist.backends.common import OptimizerSpec
    from sap_dist.backends.deepspeed import build_ds_config

    stage, offload = {"zero2": (2, False), "zero3": (3, False), "zero3_offload": (3, True)}.get(backend, (None, False))
    path = cfg.dist.deepspeed_config or env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            build_ds_config(stage, offload, cfg.dist, OptimizerSpec(max_grad_norm=cfg.train.max_grad_norm), world_size,
                            torch.float32, env, batch_size=cfg.train.batch_size)
        except OSError as exc:
            raise ConfigError(f"dist.deepspeed_config {path}: cannot read it ({exc.strerror or exc})") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"dist.deepspeed_config {path}: not valid JSON ({exc})") from None
        except (ValueError, TypeError, AttributeError) as exc:
            where = f"dist.deepspeed_config {path}" if path else "the DeepSpeed settings"
            raise ConfigError(f"{where}: {exc}") from None
    return [str(w.message) for w in caught]


def comment_lines(result: Preflight) -> list[str]:
    """The dry run's report as YAML comments (the printed config stays loadable with --config)."""
    lines = [f"# {result.batches.describe()}; backend {result.backend}"]
    lines += [f"# rounded: {note}" for note in result.batches.rounded()]
    return lines


def check_run_length(cfg: Config, total_steps: int) -> None:
    """The method's own checks of its settings against the run's length (SAP: refresh intervals)."""
    from sap_dist import methods

    selection = methods.select(cfg.method)
    selection.method.check_run(selection.section(cfg), total_steps)
