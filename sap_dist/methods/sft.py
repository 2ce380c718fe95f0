"""Plain fine-tuning: `method: sft`. The baseline every defense is measured against."""

from __future__ import annotations

from sap_dist.backends.base import Backend
from sap_dist.methods import Method
from sap_dist.methods.common import PassTimer, StepInputs, optimizer_step, train_pass


def sft_step(backend: Backend, probe, task_batch, global_tokens: float, terms: list = ()) -> dict:
    """Plain fine-tuning: one forward, backward and optimizer step (probe off), with the add-on
    `terms`' gradients added before the step."""
    metrics: dict = {}
    timer = PassTimer(backend.device)
    if probe is not None:
        probe.enabled = False
    backend.zero_grad()
    with timer("train"):
        train_pass(backend, task_batch, global_tokens, metrics)
        optimizer_step(backend, metrics, terms)
    return metrics | timer.times


def step(inputs: StepInputs, cfg: None, state: None) -> dict:
    return sft_step(inputs.backend, inputs.probe, inputs.task_batch, inputs.global_tokens, inputs.before_step)


METHOD = Method(
    name="sft",
    summary="plain fine-tuning",
    step=step,
    experiment={"sft": ("plain fine-tuning", {"method": "sft"})},
)
