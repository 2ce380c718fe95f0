"""Training backends behind one interface (`base.Backend`). Only this package names them.

This module also owns the two things every distributed backend needs before it can wrap a
model: which backend the launcher asked for (`resolve_backend`, for `dist.backend: auto`) and
the process group (`init_distributed`), read from the environment that torchrun,
`accelerate launch` or Slurm's `srun` leave behind.
"""

from __future__ import annotations

import datetime
import os
import re
import warnings
from dataclasses import dataclass

import torch

from sap_dist.backends.base import Backend
from sap_dist.backends.common import OptimizerSpec

BACKENDS = ("auto", "single", "ddp", "deepspeed", "zero2", "zero3", "zero3_offload", "fsdp2")
"""Backend names accepted by `create_backend` (and by the `dist.backend` config key).
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


def resolve_backend(name: str, zero_stage: int | None = None, env: dict | None = None) -> str:
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


def create_backend(name: str, model, optim: OptimizerSpec, dist_cfg=None) -> Backend:
    """Wrap `model` (trained weights already marked with requires_grad) for backend `name`
    (`auto` is resolved from the environment). `dist_cfg` is the run's `DistributedConfig`
    (DeepSpeed config file, ZeRO stage, offload, timeout); None takes its defaults."""
    if dist_cfg is None:
        from sap_dist.config import DistributedConfig

        dist_cfg = DistributedConfig()
    name = resolve_backend(name, dist_cfg.zero_stage)
    if name == "single":
        from sap_dist.backends.single import SingleBackend

        launch = launch_from_env()
        if launch.world_size > 1:
            raise ValueError(
                f"backend 'single' cannot run in {launch.world_size} processes; use ddp, zero2, zero3 or fsdp2"
            )
        return SingleBackend(model, optim, device_for(launch))
    launch = init_distributed(dist_cfg.timeout_minutes)
    device = device_for(launch)
    if name == "ddp":
        from sap_dist.backends.ddp import DDPBackend

        return DDPBackend(model, optim, device)
    if name == "fsdp2":
        from sap_dist.backends.fsdp2 import FSDP2Backend

        return FSDP2Backend(model, optim, device, dist_cfg)
    from sap_dist.backends.deepspeed import DeepSpeedBackend

    stage, offload = {"zero2": (2, False), "zero3": (3, False), "zero3_offload": (3, True)}.get(name, (None, False))
    return DeepSpeedBackend(model, optim, device, dist_cfg, stage=stage, offload=offload)
