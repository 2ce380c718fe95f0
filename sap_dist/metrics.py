"""Per-step metrics: a JSONL file (always), TensorBoard (optional), Weights & Biases (when
installed and asked for). Only rank 0 writes."""

from __future__ import annotations

import json
import math
import os
import resource
import warnings

import torch


class MetricsLog:
    """Appends one JSON object per logged step to `metrics.jsonl` and mirrors the numbers."""

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "sap-dist", run_config: dict | None = None, purge_step: int | None = None):
        """`purge_step`: a resumed run's first step; TensorBoard drops the events logged at
        it and after by the interrupted run (metrics.jsonl is restored from the checkpoint)."""
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._file = open(self.path, "a") if enabled else None
        self._tb = None
        self._wandb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=purge_step)
        if enabled and wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                warnings.warn("train.wandb is set but wandb is not installed (pip install wandb); logging to JSONL only")
            else:
                self._wandb = wandb_module.init(project=wandb_project, config=run_config, dir=output_dir)

    def write(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step} | {k: _plain(v) for k, v in row.items()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()  # a crash or preemption keeps every row written so far
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step" and math.isfinite(v)}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(value):
    """JSON-safe scalar (NaN and inf become strings so the file stays valid JSON)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated device memory on CUDA, resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
