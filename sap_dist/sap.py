"""One optimizer step: plain fine-tuning (`sft_step`), safety-aware probing (`sap_step`) or
the Lisa baseline (`lisa_step`).

Written once against `sap_dist.backends.base.Backend`; see docs/SAP.md for the algorithm and
docs/baselines.md for Lisa.
Losses are scaled so that the data-parallel *mean* gradient over ranks equals the gradient
of the global batch computed in one process: each rank divides its local sum by the global
count and multiplies by the world size.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from sap_dist.backends.base import Backend
from sap_dist.config import LisaConfig, SapConfig
from sap_dist.probe import Probe


logger = logging.getLogger(__name__)

PERTURBATION_TOO_SMALL = 0.1
"""A realised perturbation below this fraction of rho*||W|| is reported as rounded away."""


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
    """SAP steps taken so far (the probe is recomputed when steps_done % probe_every == 0,
    the safety direction on every `safety_every`-th of those)."""
    last_probe: list[torch.Tensor] = field(default_factory=list)
    """The probe the last weight step was taken with (saved as probe.pt)."""
    safety_direction: Any = field(default=None, metadata={"per_rank": True})
    """`safety_every` > 1: this rank's shard of the last recomputed g/|g|
    (`Backend.save_direction`), which the steps until the next safety pass perturb along.
    Shard-local, so checkpoints keep it per rank."""
    perturbation_warning: str | None = None
    """The first warning that the perturbation was (nearly) rounded away (summary.json)."""
    last_probe_signal: list[torch.Tensor] = field(default_factory=list, metadata={"checkpoint": False})
    """u_harm - u_here of the last refresh (saved in probe.pt beside the probe). The `reference`
    variant's probe is an AdamW step on it, which divides each element by its own size, so
    rounding-sized elements come out at full step size with a sign set by rounding: the
    backends are compared on this input instead. Not needed to resume, so not checkpointed."""
    last_probe_signal_scale: float = field(default=0.0, metadata={"checkpoint": False})
    """max |u_harm| of the last refresh: the scale the rounding of u_harm and u_here is relative to."""


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


def _train_pass(backend: Backend, batch, global_tokens: float, metrics: dict,
                rows: torch.Tensor | None = None, rows_tokens: float | None = None) -> float:
    """Forward + backward of the task loss; returns the global loss value (checked finite).
    With `rows` (local row indices) the task loss over those rows alone, normalised by their
    global token count `rows_tokens`, from the same forward, goes into
    metrics['task_loss_probe_rows']."""
    nll_sums, _ = _forward_nll(backend, batch)
    loss = nll_sums.sum() * backend.world_size / global_tokens
    value = float(backend.all_reduce_mean_(loss.detach().clone()))
    _check_finite(value, "task loss")
    if rows is not None:
        rows_loss = nll_sums.detach()[rows.to(nll_sums.device)].sum() * backend.world_size / rows_tokens
        metrics["task_loss_probe_rows"] = float(backend.all_reduce_mean_(rows_loss))
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
    A zero or non-finite direction gives s = 0 and `metrics['safety_degenerate']` = 1: the
    caller must then not touch the weights (W + 0*grad is NaN where grad is)."""
    backend.zero_grad()
    value, surrogate, log_scale = safety_loss(backend, safety_batch, cfg)
    _check_finite(value, "safety loss")
    backend.backward(surrogate)
    grad_norm = float(torch.sqrt(backend.grad_sq_norm()))
    weight_norm = float(torch.sqrt(backend.weight_sq_norm()))
    metrics["safety_loss"] = value
    metrics["safety_grad_norm"] = math.exp(log_scale) * grad_norm
    metrics["safety_grad_log10_norm"] = ((log_scale + math.log(grad_norm)) / math.log(10) if grad_norm > 0
                                         else float("-inf") if grad_norm == 0 else float("nan"))
    metrics["weight_norm"] = weight_norm
    metrics["perturb_norm_intended"] = cfg.rho * weight_norm
    degenerate = not (math.isfinite(grad_norm) and grad_norm > 0)
    metrics["safety_degenerate"] = int(degenerate)
    return 0.0 if degenerate else cfg.rho * weight_norm / grad_norm


def _probe_pass(backend: Backend, probe: Probe, batch, global_tokens: float,
                values: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], float]:
    """grad_V of the task loss at V = `values` (None: zeros; weights get no gradient), and the
    loss value."""
    probe.set(values)
    probe.enabled = True
    loss = task_loss(backend, batch, global_tokens)
    value = float(backend.all_reduce_mean_(loss.detach().clone()))
    return [g.detach().float() for g in backend.probe_grad(loss, probe.vectors)], value


def _probe_signal(u_harm: list[torch.Tensor], u_here: list[torch.Tensor], metrics: dict,
                  state: SapState) -> list[torch.Tensor]:
    """u_harm - u_here, and its largest element over u_harm's as `metrics['probe_signal_rel']`:
    how far the perturbation moved the probe gradient (near fp32's 1e-7, the probe is made of
    rounding noise)."""
    delta = [a - b for a, b in zip(u_harm, u_here)]
    scale = max(float(a.abs().max()) for a in u_harm)
    metrics["probe_signal_rel"] = max(float(d.abs().max()) for d in delta) / scale if scale > 0 else 0.0
    state.last_probe_signal = [d.detach().cpu() for d in delta]
    state.last_probe_signal_scale = scale
    return delta


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


def select_rows(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows `rows` of a collated batch (its padding stays: masked, so it changes nothing)."""
    return {k: v[rows.to(v.device)] for k, v in batch.items()}


def sap_step(backend: Backend, probe: Probe, task_batch, safety_batch, global_tokens: float,
             cfg: SapConfig, state: SapState, probe_rows: torch.Tensor | None = None,
             probe_tokens: float | None = None) -> dict:
    """One SAP step, `paper` (Algorithm 1) or `reference` (lagged, Adam-trained probe).

    The probe's gradients u_harm and u_here are both taken over the rows `probe_rows` (local
    indices into the task batch; default: every row), normalised by their global response
    token count `probe_tokens`, at the same probe value and with the same dropout masks, so
    u_harm - u_here differs by the perturbation only. Between refreshes (`cfg.probe_every` > 1)
    the step is a plain training pass with the last probe in place. With `cfg.safety_every` =
    k > 1 only every k-th refresh runs the safety pass; the others perturb along the stored
    direction `state.safety_direction` (a refresh without a valid stored one runs the safety
    pass). A degenerate safety direction makes the step plain fine-tuning (`_degenerate_step`)."""
    metrics: dict = {}
    timer = _PassTimer(backend.device)
    probe.enabled = False
    # no probe yet after a first refresh whose direction was degenerate: refresh again
    refresh = state.steps_done % cfg.probe_every == 0 or state.next_probe is None
    # a stored direction that a degenerate safety pass left empty is recomputed, not skipped
    new_direction = ((state.steps_done // cfg.probe_every) % cfg.safety_every == 0
                     or state.safety_direction is None)
    state.steps_done += 1
    metrics["probe_refreshed"] = int(refresh)
    if not refresh:
        with timer("train"):
            v_used = _train_with_probe(backend, probe, task_batch, global_tokens, state.next_probe, metrics, None)
        state.last_probe = v_used
        metrics["probe_norm"] = _norm(v_used)
        return metrics | timer.times
    if probe_rows is None:
        probe_batch, probe_tokens = task_batch, global_tokens
        probe_rows = torch.arange(task_batch["input_ids"].shape[0])
    else:
        every_row = probe_rows.numel() == task_batch["input_ids"].shape[0]  # rows are distinct
        probe_batch = task_batch if every_row else select_rows(task_batch, probe_rows)

    metrics["safety_refreshed"] = int(new_direction)
    with timer("safety"):
        saved = _perturb(backend, safety_batch, cfg, state, metrics, new_direction)
        backend.zero_grad()
    if saved is None:
        return _degenerate_step(backend, probe, task_batch, global_tokens, cfg, state, metrics, timer)

    # the probe in use: `paper` probes at V = 0, `reference` at its lagged probe V_t, and both
    # gradients are taken there (a different V in one would add grad_V L(W,V) - grad_V L(W,0))
    v_probe = state.next_probe if cfg.variant == "reference" else None
    dropout_rng = _rng_state(backend.device)  # u_harm and u_here see the same dropout masks
    with timer("probe_harm"):
        try:
            u_harm, loss_harm = _probe_pass(backend, probe, probe_batch, probe_tokens, v_probe)
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
        _check_perturbation(backend, state, metrics, loss_harm, loss_here)
        v_safe = _scale_probe(_probe_signal(u_harm, u_here, metrics, state), hidden_norms, cfg)
        metrics["probe_rel_size"] = float(sum(v.norm() / h for v, h in zip(v_safe, hidden_norms.tolist())) / len(v_safe))
        with timer("train"):
            _set_rng_state(backend.device, dropout_rng)
            v_used = _train_with_probe(backend, probe, task_batch, global_tokens, v_safe, metrics, None)
        state.next_probe = v_safe
    else:
        fused = probe_batch is task_batch
        if not fused:
            # the probe rows are a sub-batch: inside the full-batch training pass they would
            # draw other dropout masks (and sum in another order) than in u_harm's pass
            with timer("probe_here"):
                _set_rng_state(backend.device, dropout_rng)
                u_here, loss_here = _probe_pass(backend, probe, probe_batch, probe_tokens, v_probe)
        with timer("train"):
            _set_rng_state(backend.device, dropout_rng)
            if fused:
                # the probe rows are the whole batch: u_here comes from the same backward as the
                # weight gradient (the same forward as u_harm's, so the same masks), one pass less
                u_here = []
                v_used = _train_with_probe(backend, probe, task_batch, global_tokens, state.next_probe, metrics,
                                           u_here, probe_rows, probe_tokens)
                loss_here = metrics["task_loss_probe_rows"]
            else:
                v_used = _train_with_probe(backend, probe, task_batch, global_tokens, state.next_probe, metrics, None)
        metrics["perturb_loss_shift"] = loss_harm - loss_here
        _check_perturbation(backend, state, metrics, loss_harm, loss_here)
        _probe_signal(u_harm, u_here, metrics, state)
        with timer("probe_update"):
            state.next_probe = reference_probe_update(probe, state, u_harm, u_here)
        metrics["probe_next_norm"] = _norm(state.next_probe)

    state.last_probe = v_used
    metrics["probe_norm"] = _norm(v_used)
    return metrics | timer.times


def _perturb(backend: Backend, safety_batch, cfg: SapConfig, state: SapState, metrics: dict, new_direction: bool):
    """W <- W + rho*||W||*g_hat, with g_hat from the safety pass (`new_direction`) or the stored
    one; returns the saved unperturbed weights, or None with W untouched when the safety
    gradient is zero or not finite (then there is no direction to perturb along)."""
    if not new_direction:
        saved = _perturb_along_stored_direction(backend, state, cfg, metrics)
    else:
        scale = harmful_direction(backend, safety_batch, cfg, metrics)
        if cfg.safety_every > 1:
            _store_direction(backend, state, metrics)
        if metrics["safety_degenerate"]:
            metrics["perturb_norm_realized"] = 0.0
            return None
        saved = backend.save_weights()
        backend.add_scaled_grad_to_weights(scale)
    metrics["perturb_norm_realized"] = float(torch.sqrt(backend.weight_sq_distance(saved)))
    return saved


def _degenerate_step(backend: Backend, probe: Probe, task_batch, global_tokens: float, cfg: SapConfig,
                     state: SapState, metrics: dict, timer: _PassTimer) -> dict:
    """The step of a degenerate safety direction: plain fine-tuning (probe off, no probe pass,
    the probe optimizer not stepped). The probe from the last valid refresh stays for the next
    steps, and `sap_step` recomputes the direction on the next refresh instead of reusing it."""
    if backend.rank == 0:
        grad_norm = metrics["safety_grad_norm"]
        what = "zero" if grad_norm == 0 else f"not finite ({grad_norm})"
        retry = "the next step" if cfg.probe_every == 1 or state.next_probe is None else "the next probe refresh"
        logger.warning(f"SAP step {state.steps_done}: the safety gradient is {what}, so there is no harmful "
                       f"direction: the weights were not perturbed and this step was plain fine-tuning (probe "
                       f"off); {retry} recomputes the safety direction")
    with timer("train"):
        _train_pass(backend, task_batch, global_tokens, metrics)
        _step(backend, metrics)
    state.last_probe = [torch.zeros_like(v.detach()) for v in probe.vectors]
    metrics["probe_norm"] = 0.0
    return metrics | timer.times


def _store_direction(backend: Backend, state: SapState, metrics: dict) -> None:
    """Keep the safety gradient just computed as this rank's shard of g/|g| (None for a
    degenerate one: the next refresh recomputes it), and log its cosine with the previous
    stored direction (how far the direction turned in one interval)."""
    direction = None if metrics["safety_degenerate"] else backend.save_direction()
    if direction is not None and state.safety_direction is not None:
        metrics["safety_direction_cosine"] = backend.direction_dot(direction, state.safety_direction)
    state.safety_direction = direction


def _perturb_along_stored_direction(backend: Backend, state: SapState, cfg: SapConfig, metrics: dict):
    """W + rho*||W||*g_hat with the stored g_hat and the current ||W||; returns the saved
    weights."""
    weight_norm = float(torch.sqrt(backend.weight_sq_norm()))
    metrics["weight_norm"] = weight_norm
    metrics["perturb_norm_intended"] = cfg.rho * weight_norm
    metrics["safety_degenerate"] = 0
    saved = backend.save_weights()
    backend.add_scaled_direction_to_weights(state.safety_direction, cfg.rho * weight_norm)
    return saved


def _check_perturbation(backend: Backend, state: SapState, metrics: dict, loss_perturbed: float,
                        loss_unperturbed: float) -> None:
    """Warn once (log and `state.perturbation_warning`) when the perturbation was rounded
    (nearly) away: its realised size far below rho*||W||, or the perturbed loss equal to the
    unperturbed one (e.g. a tiny rho against bf16 weights)."""
    if state.perturbation_warning is not None:
        return
    intended, realized = metrics["perturb_norm_intended"], metrics["perturb_norm_realized"]
    problem = None
    if realized < PERTURBATION_TOO_SMALL * intended:
        problem = f"realised perturbation {realized:.3g} is far below the intended rho*||W|| = {intended:.3g}"
    elif loss_perturbed == loss_unperturbed:
        problem = f"the perturbed task loss equals the unperturbed one ({loss_perturbed:.6g})"
    if problem:
        state.perturbation_warning = (f"SAP step {state.steps_done}: {problem}: the perturbation was rounded away "
                                      "(raise sap.rho or train the weights in higher precision)")
        if backend.rank == 0:
            logger.warning(state.perturbation_warning)


def lisa_step(backend: Backend, task_batch, global_tokens: float, alignment_batch, cfg: LisaConfig,
              state: LisaState) -> dict:
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
    timer = _PassTimer(backend.device)
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
                                                     "task loss", metrics)
    state.task_steps_done += 1
    return metrics | timer.times


def _proximal_step(backend: Backend, batch, global_tokens: float, rho: float, anchor, what: str,
                   metrics: dict | None = None) -> tuple[float, float]:
    """zero_grad, forward + backward of the mean response-token loss, grad += rho*(W - anchor),
    optimizer step. Returns the loss value and (rho/2)*||W - anchor||^2 before the step; with
    `metrics`, records the loss and gradient norm there as `task_loss` and `grad_norm`."""
    out: dict = {} if metrics is None else metrics
    backend.zero_grad()
    loss = task_loss(backend, batch, global_tokens)
    value = float(backend.all_reduce_mean_(loss.detach().clone()))
    _check_finite(value, what)
    backend.backward(loss)
    proximal = rho / 2 * float(backend.master_sq_distance(anchor))
    backend.add_proximal_grad(anchor, rho)
    out["task_loss"] = value
    _step(backend, out)
    return value, proximal


def lisa_optimizer_steps(task_steps: int, cfg: LisaConfig) -> int:
    """Optimizer steps (alignment and task) Lisa takes through `task_steps` task steps: the
    alignment steps of every cycle begun, plus the task steps."""
    return task_steps + cfg.align_steps * -(-task_steps // cfg.task_steps)


def _norm(vectors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum(v.double().pow(2).sum() for v in vectors)))


def _train_with_probe(backend: Backend, probe: Probe, batch, global_tokens: float, values, metrics: dict,
                      probe_grad_out: list | None, rows: torch.Tensor | None = None,
                      rows_tokens: float | None = None) -> list[torch.Tensor]:
    """Training pass and weight step with the probe set to `values` (None: zeros). If
    `probe_grad_out` is a list, the probe gradient of the task loss over the rows `rows` alone
    (normalised by their global token count `rows_tokens`; DP mean), taken from the same
    backward through `Probe.start_row_gradient`, is appended to it, and that loss's value
    goes into metrics['task_loss_probe_rows']. Returns the probe values used."""
    probe.set(values)
    probe.enabled = True
    want_grad = probe_grad_out is not None
    for v in probe.vectors:
        v.grad = None
        v.requires_grad_(False)  # the probe's own gradient is never needed here: less work
    if want_grad:
        probe.start_row_gradient(rows, batch["input_ids"].shape[0])
    try:
        _train_pass(backend, batch, global_tokens, metrics, rows if want_grad else None, rows_tokens)
        if want_grad:
            # d(rows' nll / global_tokens) -> d(rows' nll / rows_tokens)
            rescale = global_tokens / rows_tokens
            probe_grad_out.extend(backend.all_reduce_mean_((g.float() * rescale).to(backend.device))
                                  for g in probe.stop_row_gradient())
        used = [v.detach().clone() for v in probe.vectors]
        _step(backend, metrics)
    finally:
        if probe.row_mask is not None:
            probe.stop_row_gradient()
        for v in probe.vectors:
            v.grad = None
            v.requires_grad_(True)
        probe.enabled = False
        probe.set(None)
    return used


def reference_probe_update(probe: Probe, state: SapState, u_harm, u_here) -> list[torch.Tensor]:
    """The reference code's probe update: reset V to zero, then one AdamW step (its moments
    persist across steps) on the gradient -(u_harm - u_here). Both gradients are taken at the
    probe in use; only the step starts from zero."""
    probe.set(None)
    for v, a, b in zip(probe.vectors, u_harm, u_here):
        v.grad = -(a - b)
    state.probe_optimizer.step()
    state.probe_optimizer.zero_grad(set_to_none=True)
    return [v.detach().clone() for v in probe.vectors]


def new_sap_state(probe: Probe | None, cfg: SapConfig) -> SapState | LisaState:
    """The state a run of `cfg.method` carries from step to step (Lisa's for `lisa`)."""
    if cfg.method == "lisa":
        return LisaState()
    state = SapState()
    if probe is not None and cfg.method == "sap" and cfg.variant == "reference":
        state.probe_optimizer = torch.optim.AdamW(probe.vectors, lr=cfg.probe_lr)
    return state
