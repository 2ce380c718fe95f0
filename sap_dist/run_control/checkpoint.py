"""Checkpoints: save, list, verify and load them; exact resume (stop requests: `run_control.stop`).

A checkpoint holds everything the next step depends on, so a run stopped after step s and
resumed ends with the weights an uninterrupted run ends with (see docs/reliability.md):

    <checkpoint.dir>/                 default <train.output_dir>/checkpoints
      step-00000040/                  complete: created only by renaming a finished temp dir
        meta.json                     format, step, config, world size, backend, data
                                      fingerprint, and every file with its size and SHA-256
        trainer.pt                    step, tokens seen, step times, the method's state (SAP's
                                      probe AdamW and probe, a term's targets, ...)
        metrics.jsonl                 metrics rows of steps 1..40 (restored on resume, so the
                                      log never holds a row twice)
        rng/rank-00000.pt             each rank's RNG states (torch CPU/CUDA, python, numpy)
        rank_state/rank-00000.pt      each rank's shard of the method state's per-rank fields
                                      (Lisa's anchor weights, SAP's stored safety direction of
                                      sap.safety_every)
        backend/                      trained weights + optimizer + LR schedule in the
                                      backend's native format (sharded under ZeRO and FSDP2)
      .tmp-step-00000050/             being written, or left by a crash: never loaded,
                                      removed at the next start
      step-00000030.corrupt/          failed verification during an `auto` resume; kept for
                                      inspection, never loaded again

Writing is atomic: every rank writes into the temp dir, all ranks agree that every write
succeeded, rank 0 writes meta.json last and renames the dir. Only then are older checkpoints
pruned (keep the last `checkpoint.keep_last`). A failed write (full disk) removes the temp dir
and raises `CheckpointWriteError`; the previous checkpoint is never touched.

    python -m sap_dist.run_control.checkpoint DIR     list and verify the checkpoints in DIR
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from sap_dist.backends.checkpointing import fsync_dir, save_synced
from sap_dist.config import Config, ConfigError, to_dict

FORMAT_VERSION = 2
"""Bumped when the layout changes; a checkpoint of another version is refused."""

META = "meta.json"
TRAINER = "trainer.pt"
METRICS = "metrics.jsonl"
BACKEND = "backend"
RNG_DIR = "rng"
RANK_STATE_DIR = "rank_state"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
CORRUPT_SUFFIX = ".corrupt"
_NAME = re.compile(r"^step-(\d{8})$")

RESUME_IGNORED_KEYS = frozenset({
    "train.output_dir", "train.overwrite", "train.log_every", "train.tensorboard", "train.wandb",
    "train.wandb_project", "train.progress_bar", "model.cache_dir", "dist.timeout_minutes",
    "checkpoint.every_steps", "checkpoint.keep_last", "checkpoint.resume_from", "checkpoint.dir",
    "checkpoint.verify",
})
"""Config keys that may differ between the run that saved a checkpoint and the run resuming
from it: they change where things are written and what is logged, never the training
trajectory. Every other key must match (the mismatching ones are listed)."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (partial, corrupt, from another config or another
    world size); the message says which and why. The input's fault: exit code 2."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed on some rank (e.g. no space left); the temp dir was removed
    and the previous checkpoint is intact."""


@dataclass
class CheckpointInfo:
    path: str
    step: int


# ------------------------------------------------------------------------------------------
# Names, listing, verification (plain filesystem; no process group needed)


def checkpoint_dir(cfg: Config) -> str:
    """Where this run's checkpoints live."""
    return cfg.checkpoint.dir or os.path.join(cfg.train.output_dir, "checkpoints")


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(directory: str) -> list[CheckpointInfo]:
    """Every `step-N` directory in `directory`, oldest first, complete or not (temp dirs and
    `*.corrupt` ones are not listed)."""
    if not os.path.isdir(directory):
        return []
    out = []
    for name in os.listdir(directory):
        m = _NAME.match(name)
        if m and os.path.isdir(os.path.join(directory, name)):
            out.append(CheckpointInfo(os.path.join(directory, name), int(m.group(1))))
    return sorted(out, key=lambda c: c.step)


def read_meta(path: str) -> dict:
    """The checkpoint's meta.json; CheckpointError saying why a checkpoint is not complete."""
    meta_path = os.path.join(path, META)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not os.path.exists(meta_path):
        raise CheckpointError(f"{path}: partial checkpoint (no {META}, which is written last: the save never finished)")
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: {META} is unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: checkpoint format {got!r}, this version reads format {FORMAT_VERSION}")
    return meta


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: str, hashes: bool = True, share: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems that make checkpoint `path` unusable (empty list: it is complete and intact).
    Sizes of all files are always checked; with `hashes`, the SHA-256 of the files in this
    rank's `share` (rank, world_size) too, so several ranks split the reading."""
    try:
        meta = read_meta(path)
    except CheckpointError as exc:
        return [str(exc)]
    problems = []
    files = meta.get("files") or {}
    if not files:
        return [f"{path}: {META} lists no files"]
    rank, world = share
    for i, (rel, want) in enumerate(sorted(files.items())):
        full = os.path.join(path, rel)
        try:
            size = os.path.getsize(full)
        except OSError:
            problems.append(f"{rel} is missing")
            continue
        if size != want["size"]:
            problems.append(f"{rel} has {size} bytes, {want['size']} were written (truncated or partial)")
        elif hashes and want.get("sha256") and i % world == rank and _sha256(full) != want["sha256"]:
            problems.append(f"{rel} is corrupt (SHA-256 differs from the one recorded when it was written)")
    return problems


def latest_complete(directory: str, hashes: bool = True) -> CheckpointInfo | None:
    """The newest checkpoint in `directory` that is complete and passes verification, or None."""
    for info in reversed(list_checkpoints(directory)):
        if not verify(info.path, hashes):
            return info
    return None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("task_columns", "safety_columns"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_mismatches(saved: dict, current: dict) -> list[str]:
    """`key: checkpoint value != this run's value` for every config key that differs (keys in
    RESUME_IGNORED_KEYS excepted)."""
    a, b = _flatten(saved), _flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_IGNORED_KEYS:
            continue
        if key not in a:
            out.append(f"{key}: not in the checkpoint's config (this run: {b[key]!r})")
        elif key not in b:
            out.append(f"{key}: {a[key]!r} in the checkpoint, unknown to this version")
        elif a[key] != b[key]:
            out.append(f"{key}: {a[key]!r} in the checkpoint, {b[key]!r} in this run")
    return out


def data_fingerprint(task: list[dict], safety: list[dict] | None) -> dict[str, str]:
    """Short hashes of the encoded task and safety data: resuming at step s is only exact if
    step s means the same rows."""
    def h(rows):
        return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()[:16]

    return {"task": h(task), "safety": h(safety) if safety else None}


# ------------------------------------------------------------------------------------------
# RNG and method state


def rng_state() -> dict:
    """This process's RNG states (torch CPU and CUDA, python, numpy), in types
    `torch.load(weights_only=True)` reads."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss))
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _fields(state, per_rank: bool) -> list[dataclasses.Field]:
    """The state's fields held by every rank alike (saved once, by rank 0), or those marked
    `metadata={"per_rank": True}` (each rank's own shards, saved by every rank: one piece per
    local weight piece, which `check_pieces` holds a loaded one to); never those
    marked `metadata={"checkpoint": False}` (diagnostics a resumed run does not need)."""
    return [f for f in dataclasses.fields(state)
            if f.metadata.get("per_rank", False) == per_rank and f.metadata.get("checkpoint", True)]


def method_state_dict(run_state, per_rank: bool = False) -> dict:
    """Every part of a run's state (`methods.RunState`: the method's, each term's) in saveable
    form, by part name: the shared fields, or with `per_rank` this rank's own."""
    return {name: state_dict(part, per_rank) for name, part in run_state.parts().items()}


def load_method_state(run_state, saved: dict, device: torch.device, per_rank: bool = False) -> None:
    """Restore `method_state_dict`'s output into a freshly built run state of the same config."""
    for name, part in run_state.parts().items():
        if name not in saved:
            raise CheckpointError(f"the checkpoint has no state of {name!r} (saved with another `method`)")
        load_state(part, saved[name], device, per_rank)


def has_per_rank_state(run_state) -> bool:
    """Some part of the run's state keeps each rank's own shards."""
    return any(_fields(part, per_rank=True) for part in run_state.parts().values())


def state_dict(state, per_rank: bool = False) -> dict:
    """Every field of one state dataclass (`SapState`, `LisaState`, a term's) in saveable form (an
    optimizer by its state_dict): the shared fields, or with `per_rank` this rank's own."""
    out = {}
    for f in _fields(state, per_rank):
        value = getattr(state, f.name)
        if isinstance(value, torch.optim.Optimizer):
            out[f.name] = {"optimizer_state": value.state_dict()}
        elif isinstance(value, torch.Tensor):
            out[f.name] = value.detach().cpu()
        elif isinstance(value, (list, tuple)):
            out[f.name] = [v.detach().cpu() if isinstance(v, torch.Tensor) else v for v in value]
        else:
            out[f.name] = value
        if per_rank:  # shard-local tensors stay where the backend keeps them (ZeRO offload: the CPU)
            pieces = value if isinstance(value, (list, tuple)) else [value]
            out[f"{f.name}{_ON_CPU}"] = [isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in pieces]
    return out


_ON_CPU = "__on_cpu"
"""Suffix of a per-rank field's record of which of its tensors lived on the CPU."""


def _to_home(value, on_cpu: bool, device: torch.device):
    return value.to("cpu" if on_cpu else device) if isinstance(value, torch.Tensor) else value


def load_state(state, saved: dict, device: torch.device, per_rank: bool = False) -> None:
    """Restore `state_dict`'s output into a freshly built state of the same config."""
    names = [f.name for f in _fields(state, per_rank)]
    missing = [n for n in names if n not in saved]
    if missing:
        raise CheckpointError(f"the checkpoint's method state lacks {missing} (written by another version of sap-dist)")
    for name in names:
        current, value = getattr(state, name), saved[name]
        if isinstance(current, torch.optim.Optimizer):
            if not isinstance(value, dict) or "optimizer_state" not in value:
                raise CheckpointError(f"the checkpoint's method state has no {name} (saved with another sap.variant)")
            current.load_state_dict(value["optimizer_state"])
        elif isinstance(value, torch.Tensor):
            setattr(state, name, _to_home(value, saved.get(name + _ON_CPU, [False])[0], device))
        elif isinstance(value, list):
            on_cpu = saved.get(name + _ON_CPU) or [False] * len(value)
            if len(on_cpu) != len(value):  # zip would drop the pieces beyond the shorter list
                raise CheckpointError(f"the checkpoint's {name} has {len(value)} pieces and records where "
                                      f"{len(on_cpu)} of them live")
            setattr(state, name, [_to_home(v, c, device) for v, c in zip(value, on_cpu)])
        else:
            setattr(state, name, value)


def check_pieces(run_state, shapes: list[torch.Size], where: str) -> None:
    """Every per-rank field of a loaded method state holds one piece per local weight piece of
    this rank (`Backend.local_shapes`), each of that piece's shape (None: a piece without
    one). A checkpoint cut into other pieces (another partitioning, a rank file swapped) is
    refused here, naming the field: applied piece by piece it would be paired with the wrong
    weights, and extra pieces would be dropped without a word."""
    want = [tuple(s) for s in shapes]
    for state, f in ((part, f) for part in run_state.parts().values() for f in _fields(part, per_rank=True)):
        pieces = getattr(state, f.name)
        if pieces is None:
            continue
        if len(pieces) != len(want):
            raise CheckpointError(f"{where}: {f.name} has {len(pieces)} pieces, this rank holds {len(want)} weight "
                                  "pieces (written with another partitioning of the weights)")
        for i, (piece, shape) in enumerate(zip(pieces, want)):
            if piece is not None and tuple(piece.shape) != shape:
                raise CheckpointError(f"{where}: {f.name} piece {i} has shape {tuple(piece.shape)}, this rank's "
                                      f"weight piece {shape} (written with another partitioning of the weights)")


# ------------------------------------------------------------------------------------------
# The trainer's side: resume and save, collective over the backend's ranks


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(f"sap-dist: {message}", file=sys.stderr, flush=True)


def resume_candidates(cfg: Config, world_size: int = 1) -> tuple[list[str], bool]:
    """(checkpoints to try, newest first; whether the user named one explicitly), from
    `checkpoint.resume_from`. Filesystem only, so every rank gets the same answer, and run
    before the model is loaded so that a wrong choice fails in seconds: a named checkpoint
    that is partial or truncated, or a checkpoint (named, or the newest readable one under
    `auto`) from another config or world size, raises CheckpointError here. SHA-256 and the
    data fingerprint are checked later, by `Checkpointer.resume`."""
    how = cfg.checkpoint.resume_from
    if how is None or str(how).lower() in ("", "null", "none"):
        return [], False
    if str(how).lower() == "auto":
        candidates = [c.path for c in reversed(list_checkpoints(checkpoint_dir(cfg)))]
        for path in candidates:
            try:
                meta = read_meta(path)
            except CheckpointError:
                continue  # partial or unreadable: Checkpointer.resume skips it with a message
            _check_same_run(path, meta, cfg, world_size)
            break
        return candidates, False
    path = os.path.expanduser(str(how))
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint.resume_from={how}: no such checkpoint directory")
    if not _NAME.match(os.path.basename(os.path.normpath(path))) and list_checkpoints(path):
        newest = list_checkpoints(path)[-1].path
        raise CheckpointError(f"checkpoint.resume_from={how} is a directory of checkpoints; name one of them "
                              f"(newest: {newest}) or use checkpoint.resume_from=auto with checkpoint.dir={how}")
    problems = verify(path, hashes=False)
    if problems:
        raise CheckpointError(f"checkpoint {path} refused: " + "; ".join(problems))
    _check_same_run(path, read_meta(path), cfg, world_size)
    return [path], True


def _check_same_run(path: str, meta: dict, cfg: Config, world_size: int) -> None:
    mismatches = config_mismatches(meta.get("config") or {}, to_dict(cfg))
    if meta.get("world_size") != world_size:
        mismatches.append(f"world size: {meta.get('world_size')} ranks in the checkpoint, {world_size} in this run "
                          "(sharded optimizer state, per-rank RNG and data slices need the same number)")
    if mismatches:
        raise CheckpointError(
            f"checkpoint {path} was written by another configuration; mismatching keys:\n  "
            + "\n  ".join(mismatches)
            + "\nresume with the config it was written with, or start a new run "
              "(another train.output_dir, or checkpoint.resume_from=null with train.overwrite=true)"
        )


def remove_checkpoints(directory: str) -> None:
    """Delete every checkpoint (complete, temp or corrupt) in `directory`: a run that
    overwrites an output dir must not resume from the old run later."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if _NAME.match(name) or name.startswith(TMP_PREFIX + PREFIX) or (name.startswith(PREFIX) and name.endswith(CORRUPT_SUFFIX)):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


class Checkpointer:
    """Saves and restores one run's checkpoints; every method is collective (all ranks call
    it at the same step boundary)."""

    def __init__(self, cfg: Config, backend, output_dir: str, fingerprint: dict, total_steps: int):
        self.cfg = cfg
        self.backend = backend
        self.rank, self.world_size = backend.rank, backend.world_size
        self.output_dir = output_dir
        self.directory = checkpoint_dir(cfg)
        self.fingerprint = fingerprint
        self.total_steps = total_steps
        self.last_saved: str | None = None
        if self.rank == 0 and os.path.isdir(self.directory):
            for name in os.listdir(self.directory):  # left by a crash while writing
                if name.startswith(TMP_PREFIX + PREFIX):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    # --- resume ---------------------------------------------------------------------------
    def _problems(self, path: str) -> list[str]:
        """Verification split over ranks; the same list on every rank."""
        mine = verify(path, self.cfg.checkpoint.verify, (self.rank, self.world_size))
        seen, out = set(), []
        for problems in self.backend.all_gather_object(mine):
            for p in problems:
                if p not in seen:
                    seen.add(p)
                    out.append(p)
        return out

    def _check_same_run(self, path: str, meta: dict) -> None:
        """Config and world size (as checked before the model was loaded), then what only
        the built run knows: the backend's format and the data's contents."""
        _check_same_run(path, meta, self.cfg, self.world_size)
        out = []
        if meta.get("backend_format") != self.backend.checkpoint_format:
            out.append(f"backend format: {meta.get('backend_format')!r} in the checkpoint, "
                       f"{self.backend.checkpoint_format!r} for this run's backend")
        for key in ("task", "safety"):
            saved = (meta.get("data") or {}).get(key)
            if saved != self.fingerprint.get(key):
                out.append(f"data.{key} contents: fingerprint {saved} in the checkpoint, {self.fingerprint.get(key)} "
                           "in this run (the data changed, so step s would not mean the same rows)")
        if out:
            raise CheckpointError(f"checkpoint {path} does not fit this run: " + "; ".join(out))

    def resume(self, candidates: list[str], explicit: bool, run_state) -> dict | None:
        """Load the first usable checkpoint of `candidates`: the backend state, the method's
        state (`methods.RunState`), this rank's RNG, and (rank 0) the metrics rows. Returns the trainer's progress
        (`step`, `tokens_seen`, `step_times`, `path`), or None when there is nothing to resume.
        A partial or corrupt checkpoint is refused when named explicitly; under `auto` it is
        renamed *.corrupt and the one before is tried. A config mismatch is always refused."""
        for path in candidates:
            problems = self._problems(path)
            if problems:
                message = f"checkpoint {path} refused: " + "; ".join(problems)
                if explicit:
                    raise CheckpointError(message)
                _log(self.rank, f"{message}; falling back to the previous complete checkpoint")
                if self.rank == 0:  # set aside: never tried again, and its step can be saved anew
                    aside = os.path.normpath(path) + CORRUPT_SUFFIX
                    shutil.rmtree(aside, ignore_errors=True)
                    try:
                        os.replace(path, aside)
                    except FileNotFoundError:  # removed meanwhile (by another run): refused all the same
                        _log(self.rank, f"checkpoint {path} vanished while being set aside")
                self.backend.barrier()
                continue
            self._check_same_run(path, read_meta(path))
            try:
                self.backend.load_checkpoint(os.path.join(path, BACKEND))
                trainer = torch.load(os.path.join(path, TRAINER), map_location="cpu", weights_only=True)
                load_method_state(run_state, trainer["method_state"], self.backend.device)
                if has_per_rank_state(run_state):
                    rank_file = os.path.join(RANK_STATE_DIR, f"rank-{self.rank:05d}.pt")
                    mine = torch.load(os.path.join(path, rank_file), map_location="cpu", weights_only=True)
                    load_method_state(run_state, mine, self.backend.device, per_rank=True)
                    check_pieces(run_state, self.backend.local_shapes(), f"checkpoint {path}: {rank_file}")
                set_rng_state(torch.load(os.path.join(path, RNG_DIR, f"rank-{self.rank:05d}.pt"), weights_only=True))
            except (CheckpointError, KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # verified, yet unreadable: refuse rather than half-resume
                raise CheckpointError(f"checkpoint {path} could not be loaded: {type(exc).__name__}: "
                                      f"{_first_line(exc)}") from exc
            if self.rank == 0:
                self._restore_metrics(path, trainer["step"])
            self.backend.barrier()
            _log(self.rank, f"resumed from {path} (step {trainer['step']} of {self.total_steps})")
            self.last_saved = path
            return {"step": trainer["step"], "tokens_seen": trainer["tokens_seen"],
                    "step_times": list(trainer["step_times"]), "path": path}
        if candidates:
            _log(self.rank, "no usable checkpoint left; starting from step 0")
        return None

    def _restore_metrics(self, path: str, step: int) -> None:
        """metrics.jsonl := the rows the checkpoint holds (rows of steps after it, written
        before the interruption, are dropped so that they are not logged twice)."""
        src = os.path.join(path, METRICS)
        dst = os.path.join(self.output_dir, METRICS)
        rows = []
        if os.path.exists(src):
            with open(src) as fh:
                rows = [line for line in fh if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = dst + ".tmp"
        with open(tmp, "w") as fh:
            fh.writelines(rows)
        os.replace(tmp, dst)

    # --- save -----------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        every = self.cfg.checkpoint.every_steps
        return bool(every) and step % every == 0

    def _agree(self, error: str | None, tmp: str, what: str) -> None:
        """Collective: raise CheckpointWriteError on every rank if any rank failed."""
        errors = [e for e in self.backend.all_gather_object(error) if e]
        if errors:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = self.last_saved or "none"
            try:  # torch.save reports ENOSPC as "unexpected pos": say how much room there is
                free = f"; {shutil.disk_usage(self.directory).free / 2**20:.1f} MiB free in {self.directory}"
            except OSError:
                free = ""
            raise CheckpointWriteError(f"writing checkpoint {tmp} failed ({what}): {errors[0]}"
                                       + (f" (and {len(errors) - 1} more ranks)" if len(errors) > 1 else "")
                                       + f"{free}; it was removed, the previous checkpoint ({previous}) is intact")

    def save(self, step: int, tokens_seen: int, step_times: list[float], run_state) -> str:
        """Write the checkpoint of the state after `step` steps; returns its path."""
        name = checkpoint_name(step)
        final = os.path.join(self.directory, name)
        tmp = os.path.join(self.directory, TMP_PREFIX + name)
        if os.path.exists(os.path.join(final, META)):
            # resumed from it and stopped again before another step: nothing new to write
            self.last_saved = final
            return final
        started = time.perf_counter()

        error = None
        if self.rank == 0:
            try:
                os.makedirs(self.directory, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(os.path.join(tmp, RNG_DIR))
                os.makedirs(os.path.join(tmp, RANK_STATE_DIR))
            except OSError as exc:
                error = f"rank 0: {exc}"
        self._agree(error, tmp, "creating the directory")

        error = None
        try:
            self.backend.save_checkpoint(os.path.join(tmp, BACKEND))
            save_synced(rng_state(), os.path.join(tmp, RNG_DIR, f"rank-{self.rank:05d}.pt"))
            if has_per_rank_state(run_state):
                os.makedirs(os.path.join(tmp, RANK_STATE_DIR), exist_ok=True)
                save_synced(method_state_dict(run_state, per_rank=True),
                            os.path.join(tmp, RANK_STATE_DIR, f"rank-{self.rank:05d}.pt"))
            if self.rank == 0:
                save_synced({"step": step, "tokens_seen": tokens_seen, "step_times": list(step_times),
                             "method_state": method_state_dict(run_state)}, os.path.join(tmp, TRAINER))
                metrics = os.path.join(self.output_dir, METRICS)
                if os.path.exists(metrics):
                    shutil.copyfile(metrics, os.path.join(tmp, METRICS))
                    with open(os.path.join(tmp, METRICS), "rb+") as fh:
                        os.fsync(fh.fileno())
        except BaseException as exc:  # OSError, DeepSpeed's errors, DCP's CheckpointException (a BaseException)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            error = f"rank {self.rank}: {type(exc).__name__}: {_first_line(exc)}"
        self._agree(error, tmp, "writing the state")

        # the manifest: sizes, and SHA-256 computed in parallel (file i by rank i % world)
        error, mine = None, {}
        try:
            files = _walk(tmp)
            for i, rel in enumerate(files):
                if i % self.world_size == self.rank:
                    full = os.path.join(tmp, rel)
                    mine[rel] = {"size": os.path.getsize(full),
                                 "sha256": _sha256(full) if self.cfg.checkpoint.verify else None}
        except OSError as exc:
            error = f"rank {self.rank}: {exc}"
        gathered = self.backend.all_gather_object((error, mine))
        self._agree(next((e for e, _ in gathered if e), None), tmp, "listing the files")

        error = None
        if self.rank == 0:
            try:
                manifest = {}
                for _, part in gathered:
                    manifest.update(part)
                for rel in _walk(tmp):  # a file another rank did not see (should not happen)
                    if rel not in manifest:
                        full = os.path.join(tmp, rel)
                        manifest[rel] = {"size": os.path.getsize(full), "sha256": _sha256(full) if self.cfg.checkpoint.verify else None}
                meta = {
                    "format": FORMAT_VERSION,
                    "step": step,
                    "total_steps": self.total_steps,
                    "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "world_size": self.world_size,
                    "backend": type(self.backend).__name__,
                    "backend_format": self.backend.checkpoint_format,
                    "torch": torch.__version__,
                    "data": self.fingerprint,
                    "config": to_dict(self.cfg),
                    "files": dict(sorted(manifest.items())),
                }
                with open(os.path.join(tmp, META), "w") as fh:
                    json.dump(meta, fh, indent=1)
                    fh.flush()
                    os.fsync(fh.fileno())
                fsync_dir(tmp)
                os.rename(tmp, final)  # the commit point: `final` exists only when complete
                fsync_dir(self.directory)
            except OSError as exc:
                error = f"rank 0: {exc}"
        self._agree(error, tmp, "committing")
        self.last_saved = final

        if self.rank == 0:
            complete = [c for c in list_checkpoints(self.directory) if os.path.exists(os.path.join(c.path, META))]
            for old in complete[:-self.cfg.checkpoint.keep_last]:
                shutil.rmtree(old.path, ignore_errors=True)
        _log(self.rank, f"checkpoint {final} written in {time.perf_counter() - started:.1f} s")
        return final


def _first_line(exc: BaseException) -> str:
    """The gist of an error (DCP's CheckpointException carries every rank's traceback)."""
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^\w*(Error|Exception)\b", line.strip())]
    return (errors[-1] if errors else lines[0] if lines else repr(exc)).strip()


def _walk(root: str) -> list[str]:
    out = []
    for base, _, files in os.walk(root):
        for name in files:
            out.append(os.path.relpath(os.path.join(base, name), root))
    return sorted(out)


# ------------------------------------------------------------------------------------------
# python -m sap_dist.run_control.checkpoint DIR


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m sap_dist.run_control.checkpoint",
                                description="List the checkpoints in a directory and verify each (sizes and SHA-256).")
    p.add_argument("directory", help="checkpoint.dir of a run (default <train.output_dir>/checkpoints)")
    p.add_argument("--no-hashes", action="store_true", help="check sizes only")
    args = p.parse_args(argv)
    infos = list_checkpoints(args.directory)
    if not infos:
        print(f"no checkpoints in {args.directory}")
        return 1
    newest_ok = None
    for info in infos:
        problems = verify(info.path, not args.no_hashes)
        print(f"{os.path.basename(info.path)}  step {info.step:>8}  {'ok' if not problems else 'REFUSED: ' + '; '.join(problems)}")
        if not problems:
            newest_ok = info
    print(f"resume_from=auto would use: {newest_ok.path if newest_ok else 'nothing (start at step 0)'}")
    return 0 if newest_ok else 1


if __name__ == "__main__":
    sys.exit(main())
