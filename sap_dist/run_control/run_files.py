"""Which files in an output directory belong to a run, and clearing them when a run is replaced.

`train.overwrite=true` must leave only the new run's files: an old full model's
`model.safetensors` beside a new adapter would be loaded as the base by transformers, and old
TensorBoard events would draw over the new curves. It must also never delete what a run did not
write, so a directory holding anything else is refused instead.
"""

from __future__ import annotations

import fnmatch
import os
import shutil

from sap_dist.config import ConfigError

RUN_FILE_PATTERNS = (
    # sap-dist's own
    "config.yaml", "metrics.jsonl", "summary.json", "probe.pt", "sap_dist_model.json",
    # the run lock and the requeue marker (sap_dist.run_control.stop.RUN_LOCK, REQUEUE_MARKER)
    ".lock", ".requeue", ".requeue.*.tmp",
    # the saved adapter or model (peft and transformers save_pretrained)
    "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md",
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "pytorch_model*.bin",
    # the tokenizer (save_pretrained)
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
)
RUN_DIRS = ("tensorboard", "wandb", "checkpoints", "logs", "nccl_flight_recorder")
"""Folders a run writes into its output directory (checkpoints: the default checkpoint.dir;
logs and the NCCL flight recorder: the Slurm launch's per-rank logs)."""

KEEP_ON_OVERWRITE = (".lock", "logs", "nccl_flight_recorder")
"""Entries the starting run itself holds before the directory is cleared: its lock, and under
Slurm the per-rank logs and flight-recorder folder torchrun is already writing into."""


def is_run_entry(name: str, path: str) -> bool:
    if os.path.isdir(path):
        return name in RUN_DIRS
    return any(fnmatch.fnmatch(name, pattern) for pattern in RUN_FILE_PATTERNS)


def clear_previous_run(out: str) -> None:
    """Delete everything a previous run left in `out`; refuse (ConfigError, nothing deleted) if
    `out` holds anything a run does not write."""
    if not os.path.isdir(out):
        return
    names = sorted(os.listdir(out))
    foreign = [n for n in names if not is_run_entry(n, os.path.join(out, n))]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"{out} holds files that are not a sap-dist run's ({shown}); train.overwrite=true "
                          "deletes only a previous run's files: choose another train.output_dir")
    for name in names:
        path = os.path.join(out, name)
        if name in KEEP_ON_OVERWRITE:
            continue
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: str) -> None:
    """Give `path` (recursively) the modes the user's umask asks for: transformers and tempfile
    write 0600 files and 0700 directories, which colleagues on a shared filesystem cannot read."""
    mask = current_umask()
    if os.path.isdir(path):
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    elif os.path.isfile(path):
        os.chmod(path, 0o666 & ~mask)


def share_run_files(out: str) -> None:
    """follow_umask on every file and folder of the run in `out` (nothing else there)."""
    for name in os.listdir(out):
        if is_run_entry(name, os.path.join(out, name)):
            follow_umask(os.path.join(out, name))
