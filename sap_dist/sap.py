"""One optimizer step: plain fine-tuning (`sft_step`) or safety-aware probing (`sap_step`).

Written once against `sap_dist.backends.base.Backend`; see docs/SAP.md for the algorithm.
Losses are scaled so that the data-parallel *mean* gradient over ranks equals the gradient
of the global batch computed in one process: each rank divides its local sum by the global
count and multiplies by the world size.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sap_dist.backends.base import Backend
from sap_dist.config import SapConfig
from sap_dist.probe import Probe


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the step was not applied."""


@dataclass
class SapState:
    """What SAP carries from one step to the next."""

    probe_optimizer: torch.optim.Optimizer | None = None
    """`reference` variant: the probe's own AdamW (its moments persist across steps)."""
    next_probe: list[torch.Tensor] | None = None
    """The probe the next step uses if it does not recompute one (`reference`: the probe
    computed at the previous refresh, which the next weight step always uses)."""
    steps_done: int = 0
    """SAP steps taken so far (the probe is recomputed when steps_done % probe_every == 0)."""
    last_probe: list[torch.Tensor] = field(default_factory=list)
    """The probe the last weight step was taken with (saved as probe.pt)."""


# ------------------------------------------------------------------------------------------
# Losses


def _forward_nll(backend: Backend, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
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
    nll_sums, _ = _forward_nll(backend, batch)
    return nll_sums.sum() * backend.world_size / global_tokens


def safety_loss(backend: Backend, batch: dict[str, torch.Tensor], cfg: SapConfig) -> tuple[float, torch.Tensor, float]:
    """(loss value over the global batch, a surrogate whose gradient has the direction of
    the loss's gradient, log of the factor from the surrogate's gradient to the loss's).

    `batch` holds n safe sequences followed by their n harmful twins.
    The logsigmoid loss saturates on an aligned model (margins of ~50 nats make its gradient
    underflow to zero). Only the gradient's direction is used, so the surrogate weights each
    pair by sigmoid(-m_i) / max_j sigmoid(-m_j), computed in log space: the same direction,
    never zero. The true |g| is recovered as exp(log_scale) * |grad surrogate|.
    """
    nll_sums, counts = _forward_nll(backend, batch)
    n = nll_sums.shape[0] // 2
    nll_safe, nll_harm = nll_sums[:n], nll_sums[n:]
    w = backend.world_size
    if cfg.safety_loss == "difference":
        tokens_safe = global_count(backend, counts[:n].sum())
        tokens_harm = global_count(backend, counts[n:].sum())
        loss = (nll_safe.sum() / tokens_safe - nll_harm.sum() / tokens_harm) * w
        value = float(backend.all_reduce_mean_(loss.detach().clone()))
        return value, loss, 0.0
    pairs = global_count(backend, n)
    margin = (nll_harm - nll_safe) / cfg.temperature  # (logp(safe) - logp(harmful)) / T
    log_weights = F.logsigmoid(-margin.detach())
    log_scale = backend.all_reduce_max_(log_weights.max().clone())
    surrogate = -(torch.exp(log_weights - log_scale) * margin).sum() * w / pairs
    value = backend.all_reduce_mean_((-F.logsigmoid(margin.detach())).sum() * w / pairs)
    return float(value), surrogate, float(log_scale)


# ------------------------------------------------------------------------------------------
# Steps


class _PassTimer:
    """Wall time of each pass (synchronising the device so the split is real)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, float] = {}
        self._start = 0.0
        self._name = ""

    def __call__(self, name: str) -> "_PassTimer":
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


def _rng_state(device: torch.device):
    """RNG state, so two passes can draw identical dropout masks."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _check_finite(value: float, what: str) -> None:
    if not math.isfinite(value):
        raise NonFiniteLossError(f"{what} is {value}")


def _train_pass(backend: Backend, batch, global_tokens: float, metrics: dict) -> float:
    """Forward + backward of the task loss; returns the global loss value (checked finite)."""
    loss = task_loss(backend, batch, global_tokens)
    value = float(backend.all_reduce_mean_(loss.detach().clone()))
    _check_finite(value, "task loss")
    backend.backward(loss)
    metrics["task_loss"] = value
    return value


def _step(backend: Backend, metrics: dict) -> None:
    metrics["grad_norm"] = float(torch.sqrt(backend.grad_sq_norm()))
    backend.optimizer_step()


def sft_step(backend: Backend, probe: Probe | None, task_batch, global_tokens: float) -> dict:
    """Plain fine-tuning: one forward, backward and optimizer step (probe off)."""
    metrics: dict = {}
    timer = _PassTimer(backend.device)
    if probe is not None:
        probe.enabled = False
    backend.zero_grad()
    with timer("train"):
        _train_pass(backend, task_batch, global_tokens, metrics)
        _step(backend, metrics)
    return metrics | timer.times


def harmful_direction(backend: Backend, safety_batch, cfg: SapConfig, metrics: dict) -> float:
    """Step 1: backpropagate the safety loss (probe off) and return the scale s such that
    W + s*grad is W + rho*||W||*g_hat. Leaves the (surrogate) gradient in place.
    A zero or non-finite direction gives s = 0 (the step degenerates to plain fine-tuning),
    counted in `metrics['safety_degenerate']`."""
    backend.zero_grad()
    value, surrogate, log_scale = safety_loss(backend, safety_batch, cfg)
    _check_finite(value, "safety loss")
    backend.backward(surrogate)
    grad_norm = float(torch.sqrt(backend.grad_sq_norm()))
    weight_norm = float(torch.sqrt(backend.weight_sq_norm()))
    metrics["safety_loss"] = value
    metrics["safety_grad_norm"] = math.exp(log_scale) * grad_norm
    metrics["safety_grad_log10_norm"] = (log_scale + math.log(grad_norm)) / math.log(10) if grad_norm > 0 else float("-inf")
    metrics["weight_norm"] = weight_norm
    metrics["perturb_norm_intended"] = cfg.rho * weight_norm
    degenerate = not (math.isfinite(grad_norm) and grad_norm > 0)
    metrics["safety_degenerate"] = int(degenerate)
    return 0.0 if degenerate else cfg.rho * weight_norm / grad_norm


def _probe_pass(backend: Backend, probe: Probe, batch, global_tokens: float) -> tuple[list[torch.Tensor], float]:
    """grad_V of the task loss at V = 0 (weights get no gradient), and the loss value."""
    probe.set(None)
    probe.enabled = True
    loss = task_loss(backend, batch, global_tokens)
    value = float(backend.all_reduce_mean_(loss.detach().clone()))
    return [g.detach().float() for g in backend.probe_grad(loss, probe.vectors)], value


def _scale_probe(delta: list[torch.Tensor], probe_norms: torch.Tensor, cfg: SapConfig) -> list[torch.Tensor]:
    """V_safe from u_harm - u_here: the paper's beta step, or the same direction per layer
    at a stated size relative to that layer's hidden-state norm."""
    if cfg.probe_step == "beta":
        return [cfg.beta * d for d in delta]
    out = []
    for d, hidden_norm in zip(delta, probe_norms.tolist()):
        d_norm = float(d.norm())
        out.append(d * (cfg.probe_relative_size * hidden_norm / d_norm) if d_norm > 0 else torch.zeros_like(d))
    return out


def sap_step(backend: Backend, probe: Probe, task_batch, safety_batch, global_tokens: float,
             cfg: SapConfig, state: SapState, probe_batch=None, probe_tokens: float | None = None) -> dict:
    """One SAP step, `paper` (Algorithm 1) or `reference` (lagged, Adam-trained probe).

    The probe passes run on `probe_batch` (default: the task batch) with `probe_tokens`
    response tokens globally. Between refreshes (`cfg.probe_every` > 1) the step is a plain
    training pass with the last probe in place."""
    metrics: dict = {}
    timer = _PassTimer(backend.device)
    probe.enabled = False
    refresh = state.steps_done % cfg.probe_every == 0
    state.steps_done += 1
    metrics["probe_refreshed"] = int(refresh)
    if not refresh:
        with timer("train"):
            v_used = _train_with_probe(backend, probe, task_batch, global_tokens, state.next_probe, metrics, None)
        state.last_probe = v_used
        metrics["probe_norm"] = _norm(v_used)
        return metrics | timer.times
    if probe_batch is None:
        probe_batch, probe_tokens = task_batch, global_tokens

    with timer("safety"):
        scale = harmful_direction(backend, safety_batch, cfg, metrics)
        saved = backend.save_weights()
        backend.add_scaled_grad_to_weights(scale)
        metrics["perturb_norm_realized"] = float(torch.sqrt(backend.weight_sq_distance(saved)))
        backend.zero_grad()

    dropout_rng = _rng_state(backend.device)  # u_harm and u_here see the same dropout masks
    with timer("probe_harm"):
        try:
            u_harm, loss_harm = _probe_pass(backend, probe, probe_batch, probe_tokens)
        finally:
            backend.restore_weights(saved)  # exact copy back, never a subtraction
        del saved

    if cfg.variant == "paper":
        with timer("probe_here"):
            _set_rng_state(backend.device, dropout_rng)
            probe.start_norm_measurement(probe_batch["attention_mask"])
            u_here, loss_here = _probe_pass(backend, probe, probe_batch, probe_tokens)
            norm_sums, tokens = probe.stop_norm_measurement()
            hidden_norms = backend.all_reduce_mean_(norm_sums.to(backend.device)).cpu() / (global_count(backend, tokens) / backend.world_size)
        # What the perturbation did to the task loss the forward computed: exactly 0 means
        # it was rounded away (e.g. a tiny rho against a bf16 forward), see PILOT.md.
        metrics["perturb_loss_shift"] = loss_harm - loss_here
        v_safe = _scale_probe([a - b for a, b in zip(u_harm, u_here)], hidden_norms, cfg)
        metrics["probe_rel_size"] = float(sum(v.norm() / h for v, h in zip(v_safe, hidden_norms.tolist())) / len(v_safe))
        with timer("train"):
            _set_rng_state(backend.device, dropout_rng)
            v_used = _train_with_probe(backend, probe, task_batch, global_tokens, v_safe, metrics, None)
        state.next_probe = v_safe
    else:
        with timer("train"):
            _set_rng_state(backend.device, dropout_rng)
            u_here: list[torch.Tensor] = []
            # u_here comes from the same backward as the weight gradient (one-step lag)
            v_used = _train_with_probe(backend, probe, task_batch, global_tokens, state.next_probe, metrics, u_here)
        with timer("probe_update"):
            state.next_probe = reference_probe_update(probe, state, u_harm, u_here)
        metrics["probe_next_norm"] = _norm(state.next_probe)

    state.last_probe = v_used
    metrics["probe_norm"] = _norm(v_used)
    return metrics | timer.times


def _norm(vectors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum(v.double().pow(2).sum() for v in vectors)))


def _train_with_probe(backend: Backend, probe: Probe, batch, global_tokens: float, values, metrics: dict,
                      probe_grad_out: list | None) -> list[torch.Tensor]:
    """Training pass and weight step with the probe set to `values` (None: zeros). If
    `probe_grad_out` is a list, the probe's gradient from the same backward (DP mean) is
    appended to it. Returns the probe values used."""
    probe.set(values)
    probe.enabled = True
    want_grad = probe_grad_out is not None
    for v in probe.vectors:
        v.grad = None
        v.requires_grad_(want_grad)  # no probe gradient unless asked: less work in backward
    try:
        _train_pass(backend, batch, global_tokens, metrics)
        if want_grad:
            probe_grad_out.extend(backend.all_reduce_mean_(v.grad.detach().float().clone()) for v in probe.vectors)
        used = [v.detach().clone() for v in probe.vectors]
        _step(backend, metrics)
    finally:
        for v in probe.vectors:
            v.grad = None
            v.requires_grad_(True)
        probe.enabled = False
        probe.set(None)
    return used


def reference_probe_update(probe: Probe, state: SapState, u_harm, u_here) -> list[torch.Tensor]:
    """The reference code's probe update: reset V to zero, then one AdamW step (its moments
    persist across steps) on the gradient -(u_harm - u_here)."""
    probe.set(None)
    for v, a, b in zip(probe.vectors, u_harm, u_here):
        v.grad = -(a - b)
    state.probe_optimizer.step()
    state.probe_optimizer.zero_grad(set_to_none=True)
    return [v.detach().clone() for v in probe.vectors]


def new_sap_state(probe: Probe | None, cfg: SapConfig) -> SapState:
    state = SapState()
    if probe is not None and cfg.method == "sap" and cfg.variant == "reference":
        state.probe_optimizer = torch.optim.AdamW(probe.vectors, lr=cfg.probe_lr)
    return state
