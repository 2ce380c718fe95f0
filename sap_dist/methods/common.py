"""What every method's step is built from: the task loss over the global batch, the pass
timer, the optimizer step with the add-on terms' gradients, and the inputs a step receives.

Losses are scaled so that the data-parallel *mean* gradient over ranks equals the gradient
of the global batch computed in one process: each rank divides its local sum by the global
count and multiplies by the world size.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from sap_dist.backends.base import Backend


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the step was not applied."""


@dataclass
class StepInputs:
    """What the trainer hands a method's step: this step's batches, built only when asked for."""

    backend: Backend
    """The training backend (the step's only way to touch weights and gradients)."""
    task_batch: dict[str, torch.Tensor]
    """This rank's share of the global task batch, collated on the backend's device."""
    global_tokens: float
    """Response tokens in the global task batch (the task loss's normaliser)."""
    probe: Any = None
    """The SAP probe (`sap_dist.probe.Probe`) of a method that declares `uses_probe`, else None."""
    safety_batch: Callable[[], dict[str, torch.Tensor]] | None = None
    """This step's safety pairs (this rank's share: n safe sequences, then their n harmful
    twins), collated when called; None for a run without safety pairs."""
    probe_rows: torch.Tensor | None = None
    """Local indices of the task rows the probe passes use (None: every row)."""
    probe_tokens: float | None = None
    """Response tokens of the probe rows over the global batch."""
    alignment_batch: Callable[[int], tuple[dict[str, torch.Tensor], float]] | None = None
    """The i-th alignment batch (the safe answers of a global batch of safety pairs, this
    rank's share) and its global response-token count."""
    before_step: list[Callable[[Backend, dict], None]] = field(default_factory=list)
    """The add-on terms (`method=sft+anchor`): each backpropagates its own loss into the
    gradient after the task backward and before the optimizer step of a *task* step."""


def forward_nll(backend: Backend, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of response-token NLL and per-sequence response-token counts.

    Logits are computed only at the positions that predict a response token in some row: the
    LM head and the [batch, positions, vocab] fp32 logits of prompt positions are never used
    (on SmolLM2's quick batches that was a third of a training pass; at a 128k vocabulary it
    is gigabytes of activations)."""
    labels = batch["labels"][:, 1:]
    keep = (labels != -100).any(dim=0).nonzero().squeeze(1)
    logits = _logits_at(backend.model, batch, keep).float()
    labels = labels[:, keep]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="none")
    nll = nll.view(labels.shape)
    return nll.sum(dim=1), (labels != -100).sum(dim=1)


_NO_LOGITS_TO_KEEP: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
"""Models whose forward does not take `logits_to_keep` (custom or old architectures); weak, so
a model freed and another built at the same address is not mistaken for it."""


def _logits_at(model: torch.nn.Module, batch: dict[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """The model's logits at sequence `positions` only (transformers' `logits_to_keep`),
    or all logits sliced afterwards where the model does not take that argument."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if model not in _NO_LOGITS_TO_KEEP:
        try:
            logits = model(**inputs, logits_to_keep=positions).logits
            # a forward that swallows unknown keywords returns every position
            return logits if logits.size(1) == positions.numel() else logits[:, positions]
        except TypeError as err:
            if "logits_to_keep" not in str(err):
                raise
            _NO_LOGITS_TO_KEEP.add(model)
    return model(**inputs).logits[:, positions]


def global_count(backend: Backend, local: torch.Tensor | float) -> float:
    """Sum over ranks of a local count."""
    t = torch.tensor(float(local), dtype=torch.float64, device=backend.device)
    return float(backend.all_reduce_mean_(t)) * backend.world_size


def task_loss(backend: Backend, batch: dict[str, torch.Tensor], global_tokens: float) -> torch.Tensor:
    """Mean response-token cross-entropy over the global batch (this rank's share of it)."""
    nll_sums, _ = forward_nll(backend, batch)
    return nll_sums.sum() * backend.world_size / global_tokens


class PassTimer:
    """Wall time of each pass (synchronising the device so the split is real)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, float] = {}
        self._start = 0.0
        self._name = ""

    def __call__(self, name: str) -> "PassTimer":
        self._name = name
        return self

    def __enter__(self):
        self._sync()
        self._start = time.perf_counter()

    def __exit__(self, *exc):
        self._sync()
        self.times[f"time_{self._name}"] = time.perf_counter() - self._start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def rng_state(device: torch.device):
    """RNG state, so two passes can draw identical dropout masks."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def check_finite(value: float, what: str) -> None:
    if not math.isfinite(value):
        raise NonFiniteLossError(f"{what} is {value}")


def train_pass(backend: Backend, batch, global_tokens: float, metrics: dict,
               rows: torch.Tensor | None = None, rows_tokens: float | None = None) -> float:
    """Forward + backward of the task loss; returns the global loss value (checked finite).
    With `rows` (local row indices) the task loss over those rows alone, normalised by their
    global token count `rows_tokens`, from the same forward, goes into
    metrics['task_loss_probe_rows']."""
    nll_sums, _ = forward_nll(backend, batch)
    loss = nll_sums.sum() * backend.world_size / global_tokens
    value = float(backend.all_reduce_mean_(loss.detach().clone()))
    check_finite(value, "task loss")
    if rows is not None:
        rows_loss = nll_sums.detach()[rows.to(nll_sums.device)].sum() * backend.world_size / rows_tokens
        metrics["task_loss_probe_rows"] = float(backend.all_reduce_mean_(rows_loss))
    backend.backward(loss)
    metrics["task_loss"] = value
    return value


def optimizer_step(backend: Backend, metrics: dict, terms: list[Callable[[Backend, dict], None]] = ()) -> None:
    """The add-on `terms` backpropagate their losses into the gradient the task backward left,
    then the gradient norm is recorded and the optimizer steps."""
    for term in terms:
        term(backend, metrics)
    metrics["grad_norm"] = float(torch.sqrt(backend.grad_sq_norm()))
    backend.optimizer_step()


def select_rows(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows `rows` of a collated batch (its padding stays: masked, so it changes nothing)."""
    return {k: v[rows.to(v.device)] for k, v in batch.items()}


def vector_norm(vectors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum(v.double().pow(2).sum() for v in vectors)))


def own_or_sap_safety_batch(section: str) -> Callable[[Any], tuple[str, int]]:
    """`Method.safety_pairs` of a method whose `<section>.batch_size` (pairs per step, null
    taking `sap.safety_batch_size`) sets the safety pairs it draws each step."""
    def pairs(config: Any) -> tuple[str, int]:
        own = getattr(config, section).batch_size
        return (f"{section}.batch_size", own) if own is not None else ("sap.safety_batch_size",
                                                                       config.sap.safety_batch_size)
    return pairs
