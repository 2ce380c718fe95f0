"""Training backends behind one interface (`base.Backend`). Only this package names them.

This module also owns the two things every distributed backend needs before it can wrap a
model: which backend the launcher asked for (`resolve_backend`, for `dist.backend: auto`) and
the process group (`init_distributed`), read from the environment that torchrun,
`accelerate launch` or Slurm's `srun` leave behind. Both come before the model is loaded
(`prepare_loading`), so that ZeRO-3 and FSDP2 get the model built sharded (`Loading`) and no
rank ever holds all of its parameters.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import warnings
from dataclasses import dataclass

import torch

from sap_dist.backends.base import Backend
from sap_dist.backends.common import OptimizerSpec

BACKENDS = ("auto", "single", "ddp", "deepspeed", "zero2", "zero3", "zero3_offload", "fsdp2")
"""Backend names accepted by `prepare_loading` / `create_backend` (and by the `dist.backend` config key).
`deepspeed` takes the ZeRO stage from `dist.zero_stage`, the DeepSpeed config file or
accelerate's environment; `zero2`/`zero3` fix it; `zero3_offload` is ZeRO-3 with optimizer
state and parameters offloaded to CPU memory."""

_TRUE = ("1", "true", "yes", "on")


@dataclass
class Launch:
    """Where this process sits, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int


def launch_from_env(env: dict | None = None) -> Launch:
    """Rank, world size and local rank from torchrun / `accelerate launch` (RANK, WORLD_SIZE,
    LOCAL_RANK) or from Slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) when a job step runs
    one task per GPU with `srun python -m sap_dist.train ...`. Neither: one process."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return Launch(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return Launch(0, 1, 0)


def resolve_backend(name: str, env: dict | None = None) -> str:
    """The backend to build for `name`, resolving `auto` from the launcher's environment:
    `accelerate launch` with a DeepSpeed config -> `deepspeed`, with an FSDP config -> `fsdp2`
    (the only FSDP implemented; FSDP_VERSION 1 configs are run as FSDP2), several processes ->
    `ddp`, one -> `single`."""
    env = os.environ if env is None else env
    if name not in BACKENDS:
        import difflib

        close = difflib.get_close_matches(name, BACKENDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown backend {name!r} (dist.backend); choose one of {', '.join(BACKENDS)}{hint}")
    if name != "auto":
        return name
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _TRUE:
        return "deepspeed"
    if env.get("ACCELERATE_USE_FSDP", "").lower() in _TRUE:
        if env.get("FSDP_VERSION", "2") != "2":
            warnings.warn("accelerate config asks for FSDP version 1; sap-dist runs FSDP2 (fully_shard)")
        return "fsdp2"
    return "ddp" if launch_from_env(env).world_size > 1 else "single"


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list like `gpu[003-005,9],cpu1` (what `scontrol show
    hostnames` would print first), without calling scontrol."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def init_distributed(timeout_minutes: float = 30.0, env: dict | None = None) -> Launch:
    """Join the default process group if the launcher started several processes (or a
    distributed backend runs on one): nccl when CUDA is available, gloo on CPU. Idempotent.
    Slurm without torchrun gives no MASTER_ADDR/PORT: the first node of the job and port
    29500 (or $MASTER_PORT) are used."""
    import torch.distributed as dist

    env = os.environ if env is None else env
    launch = launch_from_env(env)
    if dist.is_available() and dist.is_initialized():
        return Launch(dist.get_rank(), dist.get_world_size(), launch.local_rank)
    if "MASTER_ADDR" not in env:
        # srun, or a one-process run of a distributed backend (GPU check): rendezvous locally
        os.environ["MASTER_ADDR"] = _first_slurm_host(env["SLURM_JOB_NODELIST"]) if "SLURM_JOB_NODELIST" in env else "127.0.0.1"
    if "MASTER_PORT" not in env:
        os.environ["MASTER_PORT"] = "29500"
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank)
    dist.init_process_group(
        backend="nccl" if torch.cuda.is_available() else "gloo",
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return launch


def device_for(launch: Launch) -> torch.device:
    """The device this rank computes on: its local GPU, else the CPU."""
    return torch.device("cuda", launch.local_rank) if torch.cuda.is_available() else torch.device("cpu")


class Loading:
    """How the model must be built for the backend that will wrap it, and the wrap itself.

    Made by `prepare_loading` *before* the model is loaded, so that no rank has to build the
    whole model in memory when the backend shards it anyway. The loader (`sap_dist.models`)
    reads three things, none of which names a backend:

    - `partitioned`: build the base inside `init_context(dtype)`; its parameters are
      partitioned over the ranks as each module is constructed (also under `from_pretrained`,
      which then copies the checkpoint in one gathered module at a time). Write a partitioned parameter only inside
      `writable([param])`, which gathers it and says whether this rank's write is kept.
    - `meta`: build the base without storage (`init_context` puts parameters on the meta
      device, buffers stay real) and hand the real values to `set_weight_source`; `wrap` shards
      the model first and then fills each rank's shards one parameter at a time, the values
      read on rank 0 only (`provides_weights`).
    - neither: build the whole model, as one process would (`single`, `ddp`, `zero2`).
    """

    partitioned = False
    meta = False

    def __init__(self, name: str, dist_cfg, launch: Launch):
        self.name = name
        self.dist_cfg = dist_cfg
        self.launch = launch
        self.provides_weights = launch.rank == 0
        self.weight_source = None

    # --- used by the loader ---------------------------------------------------------------
    def init_context(self, dtype: torch.dtype):
        """Context to construct (or `from_pretrained`) the base model in, in `dtype`."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def writable(self, params):
        """Context in which `params` hold their full values; yields whether this rank's
        writes to them are kept."""
        yield True

    def set_weight_source(self, source) -> None:
        """`source(name) -> tensor`: the full value of the parameter called `name` in the
        model handed to `wrap` (meta loading; needed on the rank that `provides_weights`)."""
        self.weight_source = source

    # --- the wrap -----------------------------------------------------------------------
    def wrap(self, model, optim: OptimizerSpec) -> Backend:
        """The backend around `model` (trained weights already marked with requires_grad)."""
        name = self.name
        device = device_for(self.launch)
        if name == "single":
            from sap_dist.backends.single import SingleBackend

            return SingleBackend(model, optim, device)
        if name == "ddp":
            from sap_dist.backends.ddp import DDPBackend

            return DDPBackend(model, optim, device)
        if name == "fsdp2":
            from sap_dist.backends.fsdp2 import FSDP2Backend

            return FSDP2Backend(model, optim, device, self.dist_cfg, weight_source=self.weight_source)
        from sap_dist.backends.deepspeed import DeepSpeedBackend

        stage, offload = _DS_NAMES.get(name, (None, False))
        return DeepSpeedBackend(model, optim, device, self.dist_cfg, stage=stage, offload=offload)


_DS_NAMES = {"zero2": (2, False), "zero3": (3, False), "zero3_offload": (3, True)}


class _MetaLoading(Loading):
    """FSDP2: parameters on the meta device until `fully_shard` has sharded them."""

    meta = True

    def init_context(self, dtype: torch.dtype):
        from accelerate import init_empty_weights

        return init_empty_weights(include_buffers=False)


class _PartitionedLoading(Loading):
    """ZeRO-3: parameters partitioned while constructed (`deepspeed.zero.Init`)."""

    partitioned = True

    @contextlib.contextmanager
    def init_context(self, dtype: torch.dtype):
        # transformers' documented route: while an HfDeepSpeedConfig is alive, building a
        # model (from_pretrained, _from_config) runs under deepspeed.zero.Init with this
        # config, and from_pretrained fills it one gathered module at a time. bf16 here only sets the
        # dtype zero.Init builds in (it would otherwise make a bf16 base fp32); the engine's
        # own precision still follows the trained weights (build_ds_config in the backend).
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        from sap_dist.backends.deepspeed import build_ds_config

        stage, offload = _DS_NAMES.get(self.name, (None, False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the backend warns about the user's file when it builds
            config = build_ds_config(stage, offload, self.dist_cfg, OptimizerSpec(), self.launch.world_size, dtype)
        keep = HfDeepSpeedConfig(config)  # noqa: F841 (alive for the block: transformers holds a weakref)
        try:
            yield
        finally:
            unset_hf_deepspeed_config()
            del keep

    @contextlib.contextmanager
    def writable(self, params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=0):
            yield self.launch.rank == 0


def check_launcher_env(backend: str, dtype: str, env: dict | None = None) -> None:
    """Refuse what `accelerate launch` asked for and sap-dist would silently not do: an explicit
    `dist.backend` of another kind than accelerate's config (DeepSpeed or FSDP), and a
    `--mixed_precision` other than the config's `model.dtype` (sap-dist's only precision
    setting; accelerate's default "no" says nothing and is accepted)."""
    from sap_dist.config import ConfigError

    env = os.environ if env is None else env
    kind = ("DeepSpeed" if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _TRUE
            else "FSDP" if env.get("ACCELERATE_USE_FSDP", "").lower() in _TRUE else None)
    deepspeed_backend = backend == "deepspeed" or backend in _DS_NAMES
    if backend != "auto" and kind and deepspeed_backend != (kind == "DeepSpeed"):
        raise ConfigError(f"dist.backend={backend} contradicts the accelerate config, which asks for {kind}: "
                          "set dist.backend=auto (accelerate's choice) or launch with a matching accelerate config")
    precision = env.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if precision not in ("", "no") and precision != dtype:
        raise ConfigError(f"accelerate --mixed_precision {precision} is not how sap-dist sets precision: it trains in "
                          f"model.dtype (fp32 or bf16; this config: {dtype}); set model.dtype"
                          + ("=bf16 and drop --mixed_precision" if precision == "bf16" else " and drop --mixed_precision"))


def _require_deepspeed(name: str) -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError as exc:
        from sap_dist.config import ConfigError

        raise ConfigError(f"dist.backend={name} needs DeepSpeed, which is not installed ({exc}); set the node up with "
                          "`bash scripts/setup_env.sh` (on a GPU node it installs the `cluster` extra) or "
                          "`pip install -e '.[cluster]'`") from None


def check_backend_installed(name: str) -> None:
    """The packages backend `name` (`auto`: from the launcher's environment) needs are
    importable; ConfigError naming the setup command otherwise. Run first thing in a run, before
    any data is read or output written."""
    resolved = resolve_backend(name)
    if resolved == "deepspeed" or resolved in _DS_NAMES:
        _require_deepspeed(resolved)


def prepare_loading(name: str, dist_cfg=None) -> Loading:
    """First half of `create_backend`, run before the model is loaded: resolve backend
    `name` (`auto` from the environment), join the process group, and say how the model must
    be built (`Loading`). `loading.wrap(model, optim)` is the second half."""
    if dist_cfg is None:
        from sap_dist.config import DistributedConfig

        dist_cfg = DistributedConfig()
    name = resolve_backend(name)
    if name == "deepspeed" or name in _DS_NAMES:
        _require_deepspeed(name)  # before the process group and the model: no GPU time spent
    if name == "single":
        launch = launch_from_env()
        if launch.world_size > 1:
            raise ValueError(
                f"backend 'single' cannot run in {launch.world_size} processes; use ddp, zero2, zero3 or fsdp2"
            )
        return Loading(name, dist_cfg, launch)
    launch = init_distributed(dist_cfg.timeout_minutes)
    if name == "fsdp2":
        return _MetaLoading(name, dist_cfg, launch)
    if name in ("ddp", "zero2"):
        return Loading(name, dist_cfg, launch)
    import deepspeed
    import torch.distributed as dist

    from sap_dist.backends.deepspeed import build_ds_config

    # deepspeed.comm wraps the torch process group init_distributed just made.
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    stage, offload = _DS_NAMES.get(name, (None, False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the backend warns about the user's file when it builds
        resolved = build_ds_config(stage, offload, dist_cfg, OptimizerSpec(), launch.world_size, torch.float32)
    if resolved["zero_optimization"]["stage"] == 3:
        return _PartitionedLoading(name, dist_cfg, launch)
    return Loading(name, dist_cfg, launch)


def create_backend(name: str, model, optim: OptimizerSpec, dist_cfg=None) -> Backend:
    """Wrap an already built `model` (trained weights already marked with requires_grad) for
    backend `name` (`auto` is resolved from the environment). `dist_cfg` is the run's
    `DistributedConfig` (DeepSpeed config file, ZeRO stage, offload, timeout); None takes its
    defaults. The trainer instead calls `prepare_loading` before loading the model, so that a
    sharding backend never needs the whole model on one rank, then `Loading.wrap`."""
    return prepare_loading(name, dist_cfg).wrap(model, optim)
