"""Backend state in each backend's native checkpoint format (`Backend.save_checkpoint` /
`Backend.load_checkpoint`): trained weights, optimizer state and LR schedule.

- `single`, `ddp`: one `torch.save` file (`state.pt`) with the trained weights by name, the
  optimizer and the scheduler; under `ddp` rank 0 writes it (every replica holds the same) and
  every rank reads it.
- `fsdp2`: `torch.distributed.checkpoint` (DCP) with sharded state dicts: each rank writes its
  own shards of the trained weights and of the AdamW moments, no rank ever gathers a full
  tensor; rank 0 adds `scheduler.pt`.
- `zero2`/`zero3`: DeepSpeed's own `engine.save_checkpoint` / `load_checkpoint` (per-rank
  ZeRO partitions of the fp32 master weights and optimizer state, the scheduler inside), frozen
  base weights excluded.

Frozen weights (the base model under LoRA) are never written: the run rebuilds them from the
same config. Every file written here is fsync'ed before the function returns, so the caller
(`sap_dist.run_control.checkpoint`) may mark the checkpoint complete.
"""

from __future__ import annotations

import os
from typing import Any

import torch

STATE_FILE = "state.pt"
"""`single`/`ddp`: the one file holding weights, optimizer and scheduler."""


class BackendStateError(ValueError):
    """A checkpoint's backend state does not fit this run's model (keys or shapes differ)."""


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in directory `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_synced(obj: Any, path: str) -> None:
    """`torch.save(obj, path)`, flushed to disk before returning (a full disk raises here,
    not later)."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_tree(path: str) -> None:
    """fsync every file and directory under `path` (for files written by a library that does
    not sync them, e.g. DeepSpeed's torch.save)."""
    for root, dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def trained_named_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trained weights (requires_grad) of an unwrapped module, by name."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def save_full_state(module: torch.nn.Module, optimizer, scheduler, path: str) -> None:
    """`single`/`ddp`: write `path/state.pt` (call on one rank)."""
    os.makedirs(path, exist_ok=True)
    state = {
        "weights": {name: p.detach().cpu() for name, p in trained_named_parameters(module).items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    save_synced(state, os.path.join(path, STATE_FILE))
    fsync_dir(path)


@torch.no_grad()
def load_full_state(module: torch.nn.Module, optimizer, scheduler, path: str, device: torch.device) -> None:
    """`single`/`ddp`: restore `path/state.pt` into the module, optimizer and scheduler."""
    state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
    params = trained_named_parameters(module)
    check_keys(set(state["weights"]), set(params), "trained weights")
    for name, p in params.items():
        saved = state["weights"][name]
        if saved.shape != p.shape:
            raise BackendStateError(f"trained weight {name}: checkpoint shape {tuple(saved.shape)}, model {tuple(p.shape)}")
        p.copy_(saved.to(device=p.device, dtype=p.dtype))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])


def check_keys(saved: set[str], expected: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        raise BackendStateError(
            f"checkpoint {what} do not match this model: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )


# ------------------------------------------------------------------------------------------
# FSDP2: torch.distributed.checkpoint with sharded state dicts


def _dcp_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # sharded (DTensor) state dicts, trained weights only; strict=False because the frozen
    # weights are left out on purpose (the trained ones are checked by hand on load)
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _dcp_state(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """This rank's sharded state dicts of the trained weights and of the optimizer.
    `ignore_frozen_params` misses a frozen weight tied to another one (a tied LM head lists
    once in named_parameters, twice in the state dict), so only trained names are kept."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_dcp_options())
    trained = set(trained_named_parameters(model))
    return {k: v for k, v in model_sd.items() if k in trained}, optim_sd


def save_dcp(model: torch.nn.Module, optimizer, scheduler, path: str, rank: int) -> None:
    """FSDP2: every rank writes its shards with DCP (collective); rank 0 adds the scheduler."""
    import torch.distributed.checkpoint as dcp

    model_sd, optim_sd = _dcp_state(model, optimizer)
    # DCP gathers every rank's write result and raises the same CheckpointException on all
    # ranks when one failed (a full disk), so no rank is left waiting. (CheckpointException
    # derives from BaseException, not Exception.)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    if rank == 0:
        save_synced(scheduler.state_dict(), os.path.join(path, "scheduler.pt"))
    fsync_tree(path)


def load_dcp(model: torch.nn.Module, optimizer, scheduler, path: str) -> None:
    """FSDP2: read this rank's shards back (collective) and restore the scheduler."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    options = _dcp_options()
    model_sd, optim_sd = _dcp_state(model, optimizer)
    trained = set(model_sd)
    check_keys(trained, set(trained_named_parameters(model)), "trained weights")
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)  # in place, into this rank's shards
    result = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                            options=options)
    missing = sorted(k for k in getattr(result, "missing_keys", []) if k in trained)
    if missing:
        raise BackendStateError(f"checkpoint lacks trained weights {missing[:5]}")
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), map_location="cpu", weights_only=True))
