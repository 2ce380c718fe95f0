"""Booster (Huang et al., ICLR 2025, "Attenuating Harmful Perturbation"): `method: booster`.

An alignment-stage defence (`sap-dist align --method booster`): each step minimises the
alignment loss f plus lambda * [h(W) - h(W - alpha * g/|g|)], h the loss of harmful answers and
g = grad h(W). The bracket is how much one normalised harmful step would lower the harmful loss;
Booster makes the aligned model one where that step gains little. As in the authors' code, the
perturbed point is treated as a constant, so the gradient is

    grad f(W) + lambda * grad h(W) - lambda * grad h(W - alpha * g/|g|).

Three passes per step, in an order that lets the gradient accumulate them with the existing
`Backend` primitives and no extra copy of it: lambda * h(W) backward (its gradient, the only one
there, gives the perturbation's direction), the weights moved to W - alpha * g/|g| and
-lambda * h backward there, the weights restored bitwise, then the alignment (task) backward.
The harmful answers are the harmful twins of the safety pairs (`data.safety`), never evaluation
prompts.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

from sap_dist.backends.base import Backend
from sap_dist.errors import ConfigError
from sap_dist.methods import Method
from sap_dist.methods.common import (PassTimer, StepInputs, check_finite, forward_nll, global_count, optimizer_step,
                                     own_or_sap_safety_batch, select_rows, train_pass)

logger = logging.getLogger(__name__)


@dataclass
class BoosterConfig:
    """Booster (Huang et al., ICLR 2025): the task step's gradient gets
    lambda * [grad h(W) - grad h(W - alpha * g/|g|)], h the harmful answers' loss."""

    lamb: float = 5.0
    """lambda: the weight of the harmful-loss drop against the task (alignment) loss (the
    authors' default 5)."""
    alpha: float = 0.1
    """alpha: the length of the simulated harmful step, in weight space (the authors' default 0.1)."""
    batch_size: Optional[int] = None
    """Safety pairs per step, global (split over ranks), whose harmful answers make h; null takes
    `sap.safety_batch_size`. The authors use 10."""

    def check(self) -> None:
        """Values that need more than their type."""
        if not self.lamb >= 0:
            raise ConfigError(f"booster.lamb must be 0 or positive, got {self.lamb}")
        if not self.alpha > 0:
            raise ConfigError(f"booster.alpha must be positive, got {self.alpha}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"booster.batch_size must be at least 1, got {self.batch_size}")


def harmful_loss(backend: Backend, safety_batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Mean response-token NLL of the harmful answers over the global batch (this rank's share
    of it, to backpropagate) and its value. `safety_batch` holds n safe sequences, then their n
    harmful twins; only the twins are run."""
    n = safety_batch["input_ids"].shape[0] // 2
    nll_sums, counts = forward_nll(backend, select_rows(safety_batch, torch.arange(n, 2 * n)))
    loss = nll_sums.sum() * backend.world_size / global_count(backend, counts.sum())
    return loss, float(backend.all_reduce_mean_(loss.detach().clone()))


def booster_step(backend: Backend, task_batch, global_tokens: float, safety_batch, cfg: BoosterConfig,
                 terms: list = ()) -> dict:
    """One Booster step. Metrics: `harmful_loss` (h(W)), `harmful_loss_perturbed` (h after the
    simulated harmful step), `harmful_drop` (their difference, what Booster shrinks),
    `harmful_grad_norm` (|g|), then the task pass's `task_loss` and `grad_norm`. A zero or
    non-finite g leaves the step plain fine-tuning (logged, `booster_degenerate` = 1)."""
    metrics: dict = {}
    timer = PassTimer(backend.device)
    backend.zero_grad()
    with timer("harmful"):
        loss, value = harmful_loss(backend, safety_batch)
        check_finite(value, "harmful loss")
        backend.backward(cfg.lamb * loss)
        scaled_norm = float(torch.sqrt(backend.grad_sq_norm()))  # lambda * |g|
        degenerate = not (math.isfinite(scaled_norm) and scaled_norm > 0)
        metrics.update(harmful_loss=value, booster_degenerate=int(degenerate),
                       harmful_grad_norm=scaled_norm / cfg.lamb if cfg.lamb > 0 else 0.0)
        if degenerate:
            backend.zero_grad()
            if backend.rank == 0 and cfg.lamb > 0:
                logger.warning(f"Booster: the harmful gradient is {scaled_norm}, so there is no harmful step to "
                               "simulate: this step was plain fine-tuning")
        else:
            saved = backend.save_weights()
            backend.add_scaled_grad_to_weights(-cfg.alpha / scaled_norm)  # W - alpha * g/|g|
            perturbed, perturbed_value = harmful_loss(backend, safety_batch)
            check_finite(perturbed_value, "perturbed harmful loss")
            backend.backward(-cfg.lamb * perturbed)
            backend.restore_weights(saved)
            metrics["harmful_loss_perturbed"] = perturbed_value
            metrics["harmful_drop"] = value - perturbed_value
    with timer("train"):
        train_pass(backend, task_batch, global_tokens, metrics)
        optimizer_step(backend, metrics, terms)
    return metrics | timer.times


def step(inputs: StepInputs, cfg: BoosterConfig, state: None) -> dict:
    return booster_step(inputs.backend, inputs.task_batch, inputs.global_tokens, inputs.safety_batch(), cfg,
                        inputs.before_step)


METHOD = Method(
    name="booster",
    summary="Booster (alignment stage): the step also shrinks what one simulated harmful step would gain",
    step=step,
    section="booster",
    config=BoosterConfig,
    safety_pairs=own_or_sap_safety_batch("booster"),
    # the restored weights: one copy of each rank's shard of the trained weights
    plan_memory="master_copy",
)
