"""Fine-tune a model with plain SFT or safety-aware probing (SAP).

    python -m sap_dist.train --config quick [section.key=value ...]
    accelerate launch -m sap_dist.train --config FILE ...      (the same program)
    sap-dist train --config FILE ...                           (the same program)

Reads top to bottom: resolve the config, prepare the output directory, load tokenizer,
data and model, wrap the model in a backend, attach the probe, then loop over global
batches taking one step of the configured method (`sap_dist.methods`) each, logging every
step, and save.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from sap_dist.backends import OptimizerSpec, launch_from_env, prepare_loading
from sap_dist.batching import EffectiveBatches, probe_row_count
from sap_dist.run_control.checkpoint import (Checkpointer, CheckpointWriteError, checkpoint_dir, data_fingerprint,
                                             list_checkpoints, remove_checkpoints, resume_candidates)
from sap_dist.run_control.stop import (EXIT_CHECKPOINT_WRITE_FAILED, EXIT_REQUEUE, STOP_SIGNALS, Preempted, RunLock,
                                       StopRequest, clear_requeue_marker, preempt_exit_code, watch_launcher,
                                       write_requeue_marker)
from sap_dist import methods
from sap_dist.config import Config, ConfigError, describe, load_config, parse_overrides, save_config, to_dict
from sap_dist.run_control import preflight
from sap_dist.metrics import MetricsLog, peak_memory_mb
from sap_dist.noise import quiet_third_party
from sap_dist.models import record_base
from sap_dist.probe import Probe, check_probe_layers, default_probe_layers
from sap_dist.run_control.run_files import clear_previous_run, share_run_files
from sap_dist.methods import RunSetup
from sap_dist.methods.common import NonFiniteLossError, StepInputs

OUTPUT_MARKERS = ("summary.json", "metrics.jsonl", "adapter_config.json", "model.safetensors")
"""Files whose presence means an output directory already holds a run."""


class TrainingStopped(RuntimeError):
    """Training stopped early (non-finite loss); the last good weights were saved."""


@dataclass
class Batches:
    """Deterministic global batches: every rank computes the same order and takes its slice."""

    features: list[dict]
    global_size: int
    seed: int
    rank: int
    world_size: int

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.features), generator=g).tolist()

    def global_batch(self, step: int) -> list[dict]:
        """The `step`-th global batch (epochs wrap; a short tail of an epoch is skipped)."""
        per_epoch = len(self.features) // self.global_size
        epoch, index = divmod(step, per_epoch)
        ids = self.order(epoch)[index * self.global_size:(index + 1) * self.global_size]
        return [self.features[i] for i in ids]

    def local(self, rows: list[dict]) -> list[dict]:
        share = len(rows) // self.world_size
        return rows[self.rank * share:(self.rank + 1) * share]


# ------------------------------------------------------------------------------------------
# setup steps


def _unfinished(out: str) -> bool:
    """The run in `out` never finished (no summary, or it was preempted): `auto` may restart it
    from step 0 when it left no checkpoint."""
    try:
        with open(os.path.join(out, "summary.json")) as fh:
            return json.load(fh).get("status") == "preempted"
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False


def _setup_output_dir(cfg: Config, rank: int, resuming: bool = False) -> str:
    """Create the output dir. An existing run there is an error unless `train.overwrite`
    (which also deletes its checkpoints), the run resumes from a checkpoint, or
    `checkpoint.resume_from=auto` finds an unfinished run without one (restarted)."""
    out = cfg.train.output_dir
    if rank == 0:
        existing = [m for m in OUTPUT_MARKERS if os.path.exists(os.path.join(out, m))]
        ckpt_dir = checkpoint_dir(cfg)
        old_checkpoints = [os.path.basename(c.path) for c in list_checkpoints(ckpt_dir)]
        restart = str(cfg.checkpoint.resume_from).lower() == "auto" and _unfinished(out)
        if (existing or old_checkpoints) and not (cfg.train.overwrite or resuming or restart):
            held = existing + ([f"checkpoints {', '.join(old_checkpoints[-2:])} in {ckpt_dir}"] if old_checkpoints else [])
            raise ConfigError(
                f"{out} already holds a run ({', '.join(held)}); choose another train.output_dir, "
                f"set checkpoint.resume_from=auto to continue it, or train.overwrite=true to replace it"
            )
        if not resuming and (cfg.train.overwrite or (restart and existing)):
            clear_previous_run(out)  # only the new run's files remain; refuses foreign files
        try:
            os.makedirs(out, exist_ok=True)
            if not resuming:
                remove_checkpoints(ckpt_dir)  # only reached when overwriting or restarting
            save_config(cfg, os.path.join(out, "config.yaml"))
        except OSError as exc:
            raise _unwritable(out, exc) from None
    return out


def _unwritable(out: str, exc: OSError) -> ConfigError:
    """The one-line error for an output directory the run cannot write: a file in the way, a
    path under a file, no permission, a full disk."""
    return ConfigError(f"train.output_dir {out}: cannot write the run there ({exc.strerror or exc})")


def _setup_data(cfg: Config, tokenizer, batches: EffectiveBatches):
    from sap_dist import data

    examples = data.load_task_examples(cfg.data.task, cfg.data.task_format, cfg.data.task_columns,
                                       cfg.data.task_split, cfg.data.task_limit)
    task, task_stats = data.encode_task(tokenizer, examples, cfg.data.max_length, cfg.data.truncation)
    if len(task) < cfg.train.batch_size:
        raise ConfigError(
            f"{cfg.data.task}: {len(task)} usable task examples (of {len(examples)}), fewer than "
            f"train.batch_size={cfg.train.batch_size}"
        )
    safety, safety_stats = None, None
    if methods.select(cfg.method).reads_safety_data:
        pairs = data.load_safety_pairs(cfg.data.safety, cfg.data.safety_columns, cfg.data.safety_split)
        safety, safety_stats = data.encode_safety(tokenizer, pairs, cfg.data.safety_max_length, cfg.data.truncation)
        if batches.safety_pairs is not None and len(safety) < batches.safety_pairs:
            rounded = f" (rounded up to {batches.safety_pairs} for {batches.world_size} ranks)" \
                if batches.safety_pairs != batches.safety_asked else ""
            raise ConfigError(f"{cfg.data.safety}: {len(safety)} usable safety pairs, fewer than "
                              f"{batches.safety_key}={batches.safety_asked}{rounded}")
    return task, task_stats, safety, safety_stats


def _optimizer_step_index(cfg: Config, task_step: int) -> int:
    """Index of the optimizer step that takes task step `task_step` (0-based): a method's extra
    steps (Lisa's alignment steps) come before it in the same optimizer and LR schedule."""
    selection = methods.select(cfg.method)
    return selection.method.optimizer_steps(selection.section(cfg), task_step + 1) - 1


def data_report(cfg: Config, task_stats, safety_stats) -> str:
    """What encoding did to the data, said before training (it was only in summary.json)."""
    d = cfg.data
    policy = ("cut: the prompt's start, then the response's end" if d.truncation == "truncate"
              else "skipped")
    parts = [f"{d.task}: {task_stats.total} examples, {task_stats.truncated} truncated, {task_stats.dropped} dropped "
             f"(data.max_length={d.max_length})"]
    if safety_stats is not None:
        parts.append(f"{d.safety}: {safety_stats.total} pairs, {safety_stats.truncated} truncated, "
                     f"{safety_stats.dropped} dropped (data.safety_max_length={d.safety_max_length})")
    return f"data: {'; '.join(parts)}; too-long rows are {policy} (data.truncation={d.truncation})"


def _total_steps(cfg: Config, n_examples: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * (n_examples // cfg.train.batch_size)))


def _setup_probe(cfg: Config, backend) -> tuple[Probe | None, list[int]]:
    if not methods.select(cfg.method).method.uses_probe:
        return None, []
    from sap_dist.models import decoder_layers

    model = backend.unwrapped_model()
    layers = decoder_layers(model)
    wanted = methods.select(cfg.method).section(cfg).probe_layers  # a probing method's section names them
    ids = (check_probe_layers(wanted, len(layers)) if wanted is not None
           else default_probe_layers(len(layers)))
    hidden = model.config.hidden_size if hasattr(model, "config") else model.get_base_model().config.hidden_size
    return Probe(layers, ids, hidden, backend.device), ids


def _setup_chat_template(tokenizer) -> None:
    """A tokenizer without a chat template (a base model) gets the documented plain one
    (with a warning), and is saved with it, so inference renders prompts as training did."""
    from sap_dist import data

    if not data._has_template(tokenizer):  # logs the warning
        tokenizer.chat_template = data.PLAIN_TEMPLATE


def _collate_task(rows: list[dict], pad_id: int, device) -> dict:
    from sap_dist.data import collate

    return {k: v.to(device) for k, v in collate(rows, pad_id).items()}


def _collate_safety(pairs: list[dict], pad_id: int, device) -> dict:
    """n safe sequences then their n harmful twins, in one batch."""
    return _collate_task([p["safe"] for p in pairs] + [p["harmful"] for p in pairs], pad_id, device)


def _alignment_batch(safety_batches: Batches, index: int, pad_id: int, device) -> tuple[dict, float]:
    """Lisa's `index`-th alignment batch: the (prompt, safe) sequences of a global batch of
    safety pairs (this rank's share), and their global response-token count."""
    safe = [p["safe"] for p in safety_batches.global_batch(index)]
    return _collate_task(safety_batches.local(safe), pad_id, device), float(_response_tokens(safe))


def _probe_rows(rows: list[dict], fraction: float, world_size: int) -> tuple[list[dict], torch.Tensor]:
    """(The global batch's rows the probe passes use, their indices in this rank's slice.)

    With B rows and P probe rows (`batching.probe_row_count`: a multiple of the world size) they
    are the strided rows floor(i*B/P), i < P: the same rows on every world size that gets the
    same P, and exactly P/world_size of them in each rank's contiguous slice, at the same local
    indices floor(j*B/P), j < P/world_size, on every rank."""
    size = len(rows)
    count = probe_row_count(size, fraction, world_size)
    chosen = [rows[i * size // count] for i in range(count)]
    return chosen, torch.tensor([j * size // count for j in range(count // world_size)], dtype=torch.long)


def _response_tokens(rows: list[dict]) -> int:
    """Response tokens in a batch, as the loss counts them (labels shifted by one)."""
    return sum(sum(1 for label in row["labels"][1:] if label != -100) for row in rows)


# ------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    summary: dict
    """What summary.json holds."""
    model: torch.nn.Module
    """The trained (unwrapped) model, still in memory."""
    tokenizer: object
    """The tokenizer saved beside it."""


def run(cfg: Config) -> dict:
    """Train according to `cfg`; returns the summary (also written to output_dir)."""
    return train_model(cfg).summary


def train_model(cfg: Config, on_step_end: Callable[[int, torch.nn.Module, object], None] | None = None) -> TrainResult:
    """Train according to `cfg`; returns the summary and the trained model. `on_step_end(steps_done,
    model, tokenizer)` is called after every step with the unwrapped model (e.g. to evaluate it part
    way; it must leave the model as it found it). Rank 0 holds the
    run directory's lock for the life of the run; a run stopped by a stop request leaves the
    requeue marker there (REQUEUE_MARKER) for the batch script."""
    launcher_pid = watch_launcher()  # first thing: a worker whose torchrun dies stops too
    out, launch = cfg.train.output_dir, launch_from_env()
    # what `sap-dist config --world-size N` checks: accelerate's choices sap-dist would ignore,
    # a missing DeepSpeed, batches over the ranks; refused before anything is written (the lock
    # creates the directory)
    batches = preflight.check(cfg, launch.world_size).batches
    if launch.rank == 0:
        for note in batches.rounded():
            print(f"batches: {note}", file=sys.stderr, flush=True)
    try:
        lock = RunLock(out).acquire() if launch.rank == 0 else None
    except OSError as exc:
        raise _unwritable(out, exc) from None
    try:
        if lock:
            clear_requeue_marker(out)
        return _train_model(cfg, batches, launcher_pid, on_step_end)
    except Preempted as exc:
        if lock:
            write_requeue_marker(out, {"checkpoint": exc.checkpoint, "message": str(exc)})
        raise
    finally:
        if lock:
            lock.release()


def _train_model(cfg: Config, batches: EffectiveBatches, launcher_pid: int | None = None,
                 on_step_end: Callable[[int, torch.nn.Module, object], None] | None = None) -> TrainResult:
    from sap_dist.hardware import cpu_has_fast_bf16
    from sap_dist.models import load_model, load_tokenizer

    started = time.time()
    launch = launch_from_env()
    rank, world_size = launch.rank, launch.world_size
    candidates, explicit = resume_candidates(cfg, world_size)  # checkpoints to try, newest first
    out = _setup_output_dir(cfg, rank, resuming=bool(candidates))
    torch.manual_seed(cfg.train.seed)

    tokenizer = load_tokenizer(cfg.model)
    _setup_chat_template(tokenizer)
    task, task_stats, safety, safety_stats = _setup_data(cfg, tokenizer, batches)
    if rank == 0:
        print(data_report(cfg, task_stats, safety_stats), file=sys.stderr, flush=True)
    total_steps = _total_steps(cfg, len(task))
    preflight.check_run_length(cfg, total_steps)  # again: an epochs-based length is known only now

    # The backend is chosen (and the process group joined) before the model is loaded, so a
    # sharding backend gets it built sharded: no rank holds the whole model.
    loading = prepare_loading(cfg.dist.backend, cfg.dist)
    model = load_model(cfg.model, cfg.weights, seed=cfg.train.seed, loading=loading)
    optim = OptimizerSpec(lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay,
                          max_grad_norm=cfg.train.max_grad_norm, warmup_steps=cfg.train.warmup_steps,
                          total_steps=_optimizer_step_index(cfg, total_steps - 1) + 1, schedule=cfg.train.lr_schedule)
    backend = loading.wrap(model, optim)
    if cfg.model.dtype == "bf16" and backend.device.type == "cpu" and cpu_has_fast_bf16() is False and rank == 0:
        print("sap-dist train: warning: model.dtype=bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX) "
              "runs about 100x slower than fp32; set model.dtype=fp32", file=sys.stderr, flush=True)
    probe, probe_layers = _setup_probe(cfg, backend)
    selection = methods.select(cfg.method)
    section = selection.section(cfg)
    setup = RunSetup(backend, probe, safety, tokenizer.pad_token_id, cfg.train.seed)
    state, term_steps = methods.start(selection, cfg, setup)  # before any step: targets from the start weights
    torch.manual_seed(cfg.train.seed + backend.rank)  # dropout differs per rank, like data
    # Resume: backend state, SAP state, this rank's RNG and the metrics rows of the newest
    # usable checkpoint. The data position is the step itself (Batches depends on step and seed).
    checkpointer = Checkpointer(cfg, backend, out, data_fingerprint(task, safety), total_steps)
    resumed = checkpointer.resume(candidates, explicit, state) if candidates else None
    start_step = resumed["step"] if resumed else 0
    if candidates and not resumed and backend.rank == 0:
        for marker in ("metrics.jsonl", "summary.json"):  # nothing usable: a fresh start
            if os.path.exists(os.path.join(out, marker)):
                os.remove(os.path.join(out, marker))

    task_batches = Batches(task, cfg.train.batch_size, cfg.train.seed, backend.rank, backend.world_size)
    safety_batches = (Batches(safety, batches.safety_pairs, cfg.train.seed + 1, backend.rank, backend.world_size)
                      if batches.safety_pairs is not None else None)
    log = MetricsLog(out, backend.rank == 0, cfg.train.tensorboard, cfg.train.wandb, cfg.train.wandb_project, to_dict(cfg),
                     purge_step=start_step + 1 if resumed else None)
    pad_id = tokenizer.pad_token_id
    progress = tqdm(total=total_steps, initial=start_step, disable=backend.rank != 0 or not cfg.train.progress_bar,
                    desc=selection.label(cfg))

    status, stop_message, step = "completed", None, start_step
    tokens_seen, step_times = (resumed["tokens_seen"], resumed["step_times"]) if resumed else (0, [])
    stop = StopRequest(launcher_pid=launcher_pid)  # SIGTERM/SIGUSR1: checkpoint and exit EXIT_REQUEUE at the next step boundary
    try:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            rows = task_batches.global_batch(step)
            global_tokens = _response_tokens(rows)
            batch = _collate_task(task_batches.local(rows), pad_id, backend.device)
            inputs = StepInputs(backend, batch, float(global_tokens), probe=probe, before_step=term_steps)
            if safety_batches is not None:
                inputs.safety_batch = lambda: _collate_safety(safety_batches.local(safety_batches.global_batch(step)),
                                                              pad_id, backend.device)
                inputs.alignment_batch = lambda i: _alignment_batch(safety_batches, i, pad_id, backend.device)
            if batches.probe_rows is not None:
                probe_rows, inputs.probe_rows = _probe_rows(rows, batches.fraction, backend.world_size)
                inputs.probe_tokens = float(_response_tokens(probe_rows))
            metrics = selection.method.step(inputs, section, state.method)
            step_time = time.perf_counter() - t0
            step_times.append(step_time)
            if not math.isfinite(float(backend.weight_sq_norm())):
                status = "diverged"
                stop_message = (f"step {step + 1}: the weights are no longer finite after the update (their norm "
                                f"overflowed): train.learning_rate={cfg.train.learning_rate:g} is too large; "
                                f"no weights were saved")
            tokens = sum(len(r["input_ids"]) for r in rows)
            tokens_seen += tokens
            if step % cfg.train.log_every == 0 or step == total_steps - 1:
                log.write(step + 1, metrics | {"lr": optim.lr * _lr_factor(optim, _optimizer_step_index(cfg, step)), "step_time": step_time,
                                               "tokens_per_s": tokens / step_time, "epoch": (step + 1) * cfg.train.batch_size / len(task)})
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['task_loss']:.3f}")
            if status == "diverged":
                step += 1
                break
            if on_step_end is not None:
                on_step_end(step + 1, backend.unwrapped_model(), tokenizer)
            # step boundary: a stop request on any rank stops every rank here
            if backend.any_rank(stop.received is not None):
                path = checkpointer.save(step + 1, tokens_seen, step_times, state)
                status, step = "preempted", step + 1
                stop_message = (f"stopped by {stop.received or 'a signal to another rank'} after step {step}; "
                                f"checkpoint {path}; exit code {EXIT_REQUEUE} asks for a requeue "
                                f"(resume with checkpoint.resume_from=auto)")
                break
            if checkpointer.due(step + 1):
                checkpointer.save(step + 1, tokens_seen, step_times, state)
        else:
            step = total_steps
    except NonFiniteLossError as exc:
        status = "stopped_nonfinite"
        stop_message = f"step {step + 1}: {exc}; stopped before applying it, the last good weights are saved in {out}"
    finally:
        if status != "preempted":
            # a preempted run keeps its flag handlers until it exits: when the first rank
            # exits, torchrun SIGTERMs the others, which must still exit EXIT_REQUEUE
            stop.close()
        progress.close()
        log.close()

    if status not in ("preempted", "diverged"):  # a preempted run's state is in its checkpoint, not final
        backend.save_model(out, tokenizer)
        if backend.rank == 0:
            record_base(out, cfg.model)  # a base that loads anywhere, not this machine's cache path
            share_run_files(out)  # the user's umask, not transformers' 0600
    if probe is not None and backend.rank == 0 and status not in ("preempted", "diverged"):
        torch.save({"layers": probe_layers, "vectors": [v.cpu() for v in state.method.last_probe],
                    "signal": state.method.last_probe_signal, "signal_scale": state.method.last_probe_signal_scale},
                   os.path.join(out, "probe.pt"))
    summary = {
        "status": status,
        "message": stop_message,
        "method": selection.name,
        "variant": selection.method.variant(section) if selection.method.variant else None,
        "backend": type(backend).__name__,
        "world_size": backend.world_size,
        "probe_layers": probe_layers,
        "batches": batches.record(),  # after the rounding to the ranks (sap_dist.batching)
        "steps": step,
        "total_steps": total_steps,
        "task_examples": len(task),
        "task_truncated": task_stats.truncated,
        "task_dropped": task_stats.dropped,
        "safety_pairs": len(safety) if safety else 0,
        "safety_truncated": safety_stats.truncated if safety_stats else 0,
        "safety_dropped": safety_stats.dropped if safety_stats else 0,
        "tokens_seen": tokens_seen,
        "mean_step_time_s": sum(step_times) / len(step_times) if step_times else None,
        "tokens_per_s": tokens_seen / sum(step_times) if step_times else None,
        "wall_time_s": time.time() - started,
        "peak_memory_mb": peak_memory_mb(backend.device),
        "perturbation_warning": getattr(state.method, "perturbation_warning", None),
        "resumed_from": resumed["path"] if resumed else None,
        "last_checkpoint": checkpointer.last_saved,
        "output_dir": os.path.abspath(out),
        "metrics": os.path.abspath(os.path.join(out, "metrics.jsonl")),
    }
    if backend.rank == 0:
        with open(os.path.join(out, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
    backend.barrier()
    if status == "preempted":
        raise Preempted(stop_message, checkpointer.last_saved)
    if status != "completed":
        raise TrainingStopped(stop_message)
    return TrainResult(summary, backend.unwrapped_model(), tokenizer)


def _lr_factor(optim: OptimizerSpec, step: int) -> float:
    from sap_dist.backends.common import lr_lambda

    return lr_lambda(optim)(step)


def build_parser() -> argparse.ArgumentParser:
    from sap_dist.config import preset_names

    parser = argparse.ArgumentParser(
        prog="sap-dist train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune with SAP, plain SFT, Lisa or the safety anchor (the key `method`).\n\n"
                    "Every setting is a config key: `method` (sft, sap, lisa, anchor, sap+anchor, ...) or section.key\n"
                    "(sections: model, weights, data, sap, lisa, anchor, train, dist, checkpoint). Set it in a YAML\n"
                    "file given with --config, or override it on the command line as section.key=value or\n"
                    "--section.key value (the command line wins). For example:\n"
                    "  sap-dist train --config tiny train.max_steps=10 --sap.rho 0.1\n"
                    "  sap-dist train --config tiny method=sap+anchor anchor.weight=3\n"
                    "  sap-dist train --config my.yaml --model HuggingFaceTB/SmolLM2-135M-Instruct",
        epilog="Every key with its type, default and meaning: `sap-dist config` (or --help-config). The resolved "
               "config of a command line, without training: `sap-dist config --config FILE [overrides]`; with "
               "--world-size N, every check the run makes at N ranks.",
    )
    parser.add_argument("--config", help=f"YAML config file, or a preset name ({', '.join(preset_names())}); "
                                          "default: built-in defaults only")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("--verbose", action="store_true",
                        help="show third-party warnings too (bitsandbytes, transformers deprecations); "
                             "also SAP_DIST_VERBOSE=1")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.help_config:
        print(describe())
        return 0
    quiet_third_party(args.verbose)
    try:
        cfg = load_config(args.config, parse_overrides(rest))
        summary = run(cfg)
    except Preempted as exc:
        # From here on the process only exits with EXIT_REQUEUE: when the first rank exits,
        # torchrun SIGTERMs the others, and Python resets its own handlers to the default
        # (terminate) during interpreter teardown; SIG_IGN is kept through it.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        print(f"sap-dist train: rank {launch_from_env().rank}: {exc}", file=sys.stderr, flush=True)
        return preempt_exit_code()
    except CheckpointWriteError as exc:
        print(f"sap-dist train: rank {launch_from_env().rank}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CHECKPOINT_WRITE_FAILED
    except (ConfigError, TrainingStopped) as exc:
        print(f"sap-dist train: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 3
    except _user_errors() as exc:
        print(f"sap-dist train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the training loop, or twice: no checkpoint
        print("sap-dist train: interrupted (no checkpoint written)", file=sys.stderr)
        return 130
    if summary and launch_from_env().rank == 0:
        print(f"done: {summary['steps']} steps in {summary['wall_time_s']:.0f} s "
              f"({summary['mean_step_time_s']:.2f} s/step)")
        print(f"adapter/weights: {summary['output_dir']}")
        print(f"metrics: {summary['metrics']}")
        print(f"summary: {os.path.join(summary['output_dir'], 'summary.json')}")
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the input's fault: reported in one line, without a traceback."""
    from sap_dist.data import DataError
    from sap_dist.embedded import EmbeddedModelError
    from sap_dist.models import ModelLoadError

    return (DataError, EmbeddedModelError, ModelLoadError)


if __name__ == "__main__":
    sys.exit(main())
