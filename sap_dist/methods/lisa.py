"""The Lisa baseline (Huang et al. 2024, Bi-State Optimization): `method: lisa`.

Alignment steps on the safe answers of the safety pairs alternate with task steps, each under a
proximal term towards the weights at the last switch of state (docs/baselines.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from sap_dist.backends.base import Backend
from sap_dist.errors import ConfigError
from sap_dist.methods import Method, RunSetup
from sap_dist.methods.common import (PassTimer, StepInputs, check_finite, optimizer_step, own_or_sap_safety_batch,
                                     task_loss)


@dataclass
class LisaConfig:
    """Lisa (Huang et al. 2024, Bi-State Optimization): `align_steps` optimizer steps on the
    alignment data, then `task_steps` task steps, repeated; every step adds the gradient of
    (rho/2)*||W - W_anchor||^2, W_anchor being the trained weights at the last switch of state.
    Alignment steps are extra: `train.max_steps`/`epochs` count task steps, so the task batches
    are the other methods' and a run costs (align_steps + task_steps)/task_steps optimizer steps
    per task step."""

    align_steps: int = 2
    """K1: alignment steps at the start of each cycle (before its task steps)."""
    task_steps: int = 18
    """K2: task steps per cycle. 2 and 18: a 1:9 split, alignment the small share as in the
    paper's asymmetric setting (10% extra optimizer steps), at a cycle short enough for a
    40-step run to go through three cycles."""
    rho: float = 1.0
    """Proximal coefficient: each step's gradient gets rho*(W - W_anchor) (Lisa's default 1)."""
    batch_size: Optional[int] = None
    """Alignment examples per alignment step, global (split over ranks): the (prompt, safe)
    of that many `data.safety` pairs; null takes `sap.safety_batch_size`."""

    def check(self) -> None:
        """Values that need more than their type."""
        for key, value in [("align_steps", self.align_steps), ("task_steps", self.task_steps),
                           ("batch_size", 1 if self.batch_size is None else self.batch_size)]:
            if value < 1:
                raise ConfigError(f"lisa.{key} must be at least 1, got {value}")
        if not self.rho >= 0:
            raise ConfigError(f"lisa.rho must be 0 or positive, got {self.rho}")


@dataclass
class LisaState:
    """What Lisa carries from one task step to the next."""

    task_steps_done: int = 0
    """Task steps taken so far: a cycle's alignment steps run before the task step with
    task_steps_done % task_steps == 0, so the state (alignment or task) follows from it."""
    align_steps_done: int = 0
    """Alignment steps taken so far (the index of the next alignment batch)."""
    anchor: list[torch.Tensor] | None = field(default=None, metadata={"per_rank": True})
    """The trained weights at the last switch of state (`Backend.save_master_weights`: this
    rank's shards of the fp32 masters), the proximal term's centre; None before the first step."""


def lisa_step(backend: Backend, task_batch, global_tokens: float, alignment_batch, cfg: LisaConfig,
              state: LisaState, terms: list = ()) -> dict:
    """One Lisa task step (Bi-State Optimization, Huang et al. 2024), preceded at the start of
    each cycle by `cfg.align_steps` alignment steps. `alignment_batch(i)` gives the i-th
    alignment batch and its global response-token count. Each step's gradient gets
    rho*(W - anchor), the anchor being the weights at the last switch of state: the end of the
    last task phase for alignment steps (the initial weights in the first cycle), the end of
    the last alignment phase for task steps.

    Metrics: `lisa_align_steps` (alignment steps run before this task step: 0 or K1),
    `align_loss` and `align_proximal` (mean over them), `task_proximal` (the task step's
    (rho/2)*||W - anchor||^2, before its update)."""
    metrics: dict = {}
    timer = PassTimer(backend.device)
    aligned: list[tuple[float, float]] = []
    if state.task_steps_done % cfg.task_steps == 0:
        with timer("align"):
            state.anchor = backend.save_master_weights()  # switch task -> alignment
            for _ in range(cfg.align_steps):
                batch, tokens = alignment_batch(state.align_steps_done)
                aligned.append(_proximal_step(backend, batch, tokens, cfg.rho, state.anchor, "alignment loss"))
                state.align_steps_done += 1
            state.anchor = backend.save_master_weights()  # switch alignment -> task
        metrics["align_loss"] = sum(v for v, _ in aligned) / len(aligned)
        metrics["align_proximal"] = sum(p for _, p in aligned) / len(aligned)
    metrics["lisa_align_steps"] = len(aligned)
    with timer("train"):
        _, metrics["task_proximal"] = _proximal_step(backend, task_batch, global_tokens, cfg.rho, state.anchor,
                                                     "task loss", metrics, terms)
    state.task_steps_done += 1
    return metrics | timer.times


def _proximal_step(backend: Backend, batch, global_tokens: float, rho: float, anchor, what: str,
                   metrics: dict | None = None, terms: list = ()) -> tuple[float, float]:
    """zero_grad, forward + backward of the mean response-token loss, the add-on `terms`'
    backward passes, grad += rho*(W - anchor), optimizer step. Returns the loss value and (rho/2)*||W - anchor||^2 before the step; with
    `metrics`, records the loss and gradient norm there as `task_loss` and `grad_norm`."""
    out: dict = {} if metrics is None else metrics
    backend.zero_grad()
    loss = task_loss(backend, batch, global_tokens)
    value = float(backend.all_reduce_mean_(loss.detach().clone()))
    check_finite(value, what)
    backend.backward(loss)
    for term in terms:  # backward passes first: the proximal gradient is added to the finished gradient
        term(backend, out)
    proximal = rho / 2 * float(backend.master_sq_distance(anchor))
    backend.add_proximal_grad(anchor, rho)
    out["task_loss"] = value
    optimizer_step(backend, out)
    return value, proximal


def lisa_optimizer_steps(task_steps: int, cfg: LisaConfig) -> int:
    """Optimizer steps (alignment and task) Lisa takes through `task_steps` task steps: the
    alignment steps of every cycle begun, plus the task steps."""
    return task_steps + cfg.align_steps * -(-task_steps // cfg.task_steps)


def new_state(cfg: LisaConfig, setup: RunSetup) -> LisaState:
    return LisaState()


def step(inputs: StepInputs, cfg: LisaConfig, state: LisaState) -> dict:
    return lisa_step(inputs.backend, inputs.task_batch, inputs.global_tokens, inputs.alignment_batch, cfg, state,
                     inputs.before_step)


METHOD = Method(
    name="lisa",
    summary="the Lisa baseline: alignment steps alternated with task steps under a proximal term",
    step=step,
    section="lisa",
    config=LisaConfig,
    new_state=new_state,
    # its alignment batch: `lisa.batch_size` pairs' safe answers, null meaning sap.safety_batch_size
    safety_pairs=own_or_sap_safety_batch("lisa"),
    optimizer_steps=lambda cfg, task_steps: lisa_optimizer_steps(task_steps, cfg),
    bench_cycle=lambda cfg: cfg.task_steps,
    bench_amortized_pass="align",
    plan_memory="master_copy",
    experiment={"lisa": ("Lisa", {"method": "lisa"})},
)
