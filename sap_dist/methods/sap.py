"""Safety-aware probing (SAP, arXiv 2505.16737): `method: sap`.

Each step finds the direction in weight space that makes harmful answers likelier, probes the
hidden states for what the task loss does if the weights drift that way, and takes the task
step with that probe in place. docs/SAP.md states the algorithm; the step is written once
against `sap_dist.backends.base.Backend`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F

from sap_dist.backends.base import Backend
from sap_dist.errors import ConfigError
from sap_dist.methods import Method, RunSetup
from sap_dist.methods.common import (PassTimer, StepInputs, check_finite, forward_nll, global_count, optimizer_step,
                                     rng_state, select_rows, set_rng_state, task_loss, train_pass, vector_norm)
from sap_dist.probe import Probe


logger = logging.getLogger(__name__)

PERTURBATION_TOO_SMALL = 0.1
"""A realised perturbation below this fraction of rho*||W|| is reported as rounded away."""


@dataclass
class SapConfig:
    """Safety-aware probing (docs/SAP.md): `method: sap`."""

    variant: Literal["paper", "reference"] = "paper"
    """`paper`: Algorithm 1, four passes, probe recomputed every step. `reference`: the
    reference code's lagged probe trained by its own AdamW, three passes."""
    safety_loss: Literal["logsigmoid", "difference"] = "difference"
    """`difference`: NLL(safe) - NLL(harmful) (paper v1; does not saturate). `logsigmoid`:
    -log sigmoid((logp(safe) - logp(harmful)) / T) (reference code)."""
    temperature: float = 1.0
    """T of the logsigmoid loss."""
    rho: float = 1e-2
    """Perturbation radius relative to the trained weights' norm: dW = rho*||W||*g/||g||."""
    probe_layers: Optional[list[int]] = None
    """Decoder layers (0-based) whose outputs get a probe vector; None = the reference's
    [3, 9] of 32 scaled to the model's depth."""
    probe_step: Literal["beta", "relative"] = "relative"
    """How the paper variant sizes V_safe: `beta` = beta*(u_harm - u_here) as written;
    `relative` = the same direction per layer, rescaled so ||v_l|| equals
    probe_relative_size times that layer's mean hidden-state norm per token."""
    beta: float = 0.05
    """Step size of the `beta` probe step."""
    probe_relative_size: float = 0.05
    """Probe norm per layer over the mean per-token hidden-state norm (`relative` step)."""
    probe_lr: float = 0.05
    """AdamW learning rate of the probe (`reference` variant)."""
    safety_batch_size: int = 4
    """Contrastive pairs per step (global, split over ranks). 4 pairs (8 sequences) cost about
    one task pass of 8 rows on the quick bench; the safety direction is only used normalised."""
    probe_every: int = 1
    """Recompute the probe (safety direction and probe passes) every k steps and keep the
    last probe in place for the steps between; 1 is the exact algorithm. The cost of the
    extra passes is divided by k, but the probe is specific to the batch it was computed on:
    on the quick experiment k=10 lost SAP's protection (docs/experiment.md), so k>1 is a
    measured trade-off, not a default."""
    probe_batch_fraction: float = 0.5
    """Share of the global task batch (strided rows 0, B/P, 2B/P, ..., the same on every
    world size; P must be a multiple of the ranks) on which the probe passes estimate u_harm
    and u_here; the weight step always uses the whole batch. 1 is exact; 0.5 halves the probe
    passes and kept SAP's protection on the quick experiment; a quarter did not (over 5
    validation seeds it lost about a fifth of it: the quarter's probe direction agrees with
    the whole batch's at a median cosine of 0.33, the half's at 0.51)."""
    safety_every: int = 4
    """Recompute the safety direction g_hat (the safety pass: a forward and backward of the
    safety batch) on every k-th perturbing step only, and perturb the steps between along the
    stored direction, at the current size rho*||W||; u_harm, u_here and the probe are still
    recomputed on every batch. 1 is exact (a fresh direction from each step's safety batch).
    k>1 saves most of the safety pass's cost (quick bench: about 3.3x -> 2.4x plain
    fine-tuning's step) for one fp32 copy of each rank's shard of the trained weights. Default 4, measured:
    on the quick experiment the direction turns as much between two draws of safety pairs at
    the same weights (cosine 0.50-0.56) as between directions 4 steps apart (0.49), so reusing
    it for 4 steps adds no staleness the pair sampling does not already have, and over 5
    validation seeds k=4 kept the protection of k=1 (docs/experiment.md). The log's
    `safety_direction_cosine` shows how fast it turns on your run."""

    def check(self) -> None:
        """Values that need more than their type."""
        if self.safety_batch_size < 1:
            raise ConfigError(f"sap.safety_batch_size must be at least 1, got {self.safety_batch_size}")
        for key in ("rho", "beta", "probe_relative_size", "probe_lr", "temperature"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"sap.{key} must be positive, got {getattr(self, key)}")
        for key in ("probe_every", "safety_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"sap.{key} must be at least 1, got {getattr(self, key)}")
        if not 0 < self.probe_batch_fraction <= 1:
            raise ConfigError(f"sap.probe_batch_fraction must be in (0, 1], got {self.probe_batch_fraction}")
        if self.probe_layers is not None and not self.probe_layers:
            raise ConfigError("sap.probe_layers must name at least one layer (or be null for the default)")


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


# ------------------------------------------------------------------------------------------
# Losses and passes


def safety_loss(backend: Backend, batch: dict[str, torch.Tensor], cfg: SapConfig) -> tuple[float, torch.Tensor, float]:
    """(loss value over the global batch, a surrogate whose gradient has the direction of
    the loss's gradient, log of the factor from the surrogate's gradient to the loss's).

    `batch` holds n safe sequences followed by their n harmful twins.
    The logsigmoid loss saturates on an aligned model (margins of ~50 nats make its gradient
    underflow to zero). Only the gradient's direction is used, so the surrogate weights each
    pair by sigmoid(-m_i) / max_j sigmoid(-m_j), computed in log space: the same direction,
    never zero. The true |g| is recovered as exp(log_scale) * |grad surrogate|.
    """
    nll_sums, counts = forward_nll(backend, batch)
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


def harmful_direction(backend: Backend, safety_batch, cfg: SapConfig, metrics: dict) -> float:
    """Step 1: backpropagate the safety loss (probe off) and return the scale s such that
    W + s*grad is W + rho*||W||*g_hat. Leaves the (surrogate) gradient in place.
    A zero or non-finite direction gives s = 0 and `metrics['safety_degenerate']` = 1: the
    caller must then not touch the weights (W + 0*grad is NaN where grad is)."""
    backend.zero_grad()
    value, surrogate, log_scale = safety_loss(backend, safety_batch, cfg)
    check_finite(value, "safety loss")
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


def sap_step(backend: Backend, probe: Probe, task_batch, safety_batch, global_tokens: float,
             cfg: SapConfig, state: SapState, probe_rows: torch.Tensor | None = None,
             probe_tokens: float | None = None, terms: list = ()) -> dict:
    """One SAP step, `paper` (Algorithm 1) or `reference` (lagged, Adam-trained probe).

    The probe's gradients u_harm and u_here are both taken over the rows `probe_rows` (local
    indices into the task batch; default: every row), normalised by their global response
    token count `probe_tokens`, at the same probe value and with the same dropout masks, so
    u_harm - u_here differs by the perturbation only. Between refreshes (`cfg.probe_every` > 1)
    the step is a plain training pass with the last probe in place. With `cfg.safety_every` =
    k > 1 only every k-th refresh runs the safety pass; the others perturb along the stored
    direction `state.safety_direction` (a refresh without a valid stored one runs the safety
    pass). A degenerate safety direction makes the step plain fine-tuning (`_degenerate_step`).
    The add-on `terms` add their gradients to the weight step's, with the probe off."""
    metrics: dict = {}
    timer = PassTimer(backend.device)
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
            v_used = _train_with_probe(backend, probe, task_batch, global_tokens, state.next_probe, metrics, None, terms=terms)
        state.last_probe = v_used
        metrics["probe_norm"] = vector_norm(v_used)
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
        return _degenerate_step(backend, probe, task_batch, global_tokens, cfg, state, metrics, timer, terms)

    # the probe in use: `paper` probes at V = 0, `reference` at its lagged probe V_t, and both
    # gradients are taken there (a different V in one would add grad_V L(W,V) - grad_V L(W,0))
    v_probe = state.next_probe if cfg.variant == "reference" else None
    dropout_rng = rng_state(backend.device)  # u_harm and u_here see the same dropout masks
    with timer("probe_harm"):
        try:
            u_harm, loss_harm = _probe_pass(backend, probe, probe_batch, probe_tokens, v_probe)
        finally:
            backend.restore_weights(saved)  # exact copy back, never a subtraction
        del saved

    if cfg.variant == "paper":
        with timer("probe_here"):
            set_rng_state(backend.device, dropout_rng)
            probe.start_norm_measurement(probe_batch["attention_mask"])
            u_here, loss_here = _probe_pass(backend, probe, probe_batch, probe_tokens)
            norm_sums, tokens = probe.stop_norm_measurement()
            hidden_norms = backend.all_reduce_mean_(norm_sums.to(backend.device)).cpu() / (global_count(backend, tokens) / backend.world_size)
        # What the perturbation did to the task loss the forward computed: exactly 0 means
        # it was rounded away (e.g. a tiny rho against a bf16 forward).
        metrics["perturb_loss_shift"] = loss_harm - loss_here
        _check_perturbation(backend, state, metrics, loss_harm, loss_here)
        v_safe = _scale_probe(_probe_signal(u_harm, u_here, metrics, state), hidden_norms, cfg)
        metrics["probe_rel_size"] = float(sum(v.norm() / h for v, h in zip(v_safe, hidden_norms.tolist())) / len(v_safe))
        with timer("train"):
            set_rng_state(backend.device, dropout_rng)
            v_used = _train_with_probe(backend, probe, task_batch, global_tokens, v_safe, metrics, None, terms=terms)
        state.next_probe = v_safe
    else:
        fused = probe_batch is task_batch
        if not fused:
            # the probe rows are a sub-batch: inside the full-batch training pass they would
            # draw other dropout masks (and sum in another order) than in u_harm's pass
            with timer("probe_here"):
                set_rng_state(backend.device, dropout_rng)
                u_here, loss_here = _probe_pass(backend, probe, probe_batch, probe_tokens, v_probe)
        with timer("train"):
            set_rng_state(backend.device, dropout_rng)
            if fused:
                # the probe rows are the whole batch: u_here comes from the same backward as the
                # weight gradient (the same forward as u_harm's, so the same masks), one pass less
                u_here = []
                v_used = _train_with_probe(backend, probe, task_batch, global_tokens, state.next_probe, metrics,
                                           u_here, probe_rows, probe_tokens, terms)
                loss_here = metrics["task_loss_probe_rows"]
            else:
                v_used = _train_with_probe(backend, probe, task_batch, global_tokens, state.next_probe, metrics, None, terms=terms)
        metrics["perturb_loss_shift"] = loss_harm - loss_here
        _check_perturbation(backend, state, metrics, loss_harm, loss_here)
        _probe_signal(u_harm, u_here, metrics, state)
        with timer("probe_update"):
            state.next_probe = reference_probe_update(probe, state, u_harm, u_here)
        metrics["probe_next_norm"] = vector_norm(state.next_probe)

    state.last_probe = v_used
    metrics["probe_norm"] = vector_norm(v_used)
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
                     state: SapState, metrics: dict, timer: PassTimer, terms: list = ()) -> dict:
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
        train_pass(backend, task_batch, global_tokens, metrics)
        optimizer_step(backend, metrics, terms)
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


def _train_with_probe(backend: Backend, probe: Probe, batch, global_tokens: float, values, metrics: dict,
                      probe_grad_out: list | None, rows: torch.Tensor | None = None,
                      rows_tokens: float | None = None, terms: list = ()) -> list[torch.Tensor]:
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
        train_pass(backend, batch, global_tokens, metrics, rows if want_grad else None, rows_tokens)
        if want_grad:
            # d(rows' nll / global_tokens) -> d(rows' nll / rows_tokens)
            rescale = global_tokens / rows_tokens
            probe_grad_out.extend(backend.all_reduce_mean_((g.float() * rescale).to(backend.device))
                                  for g in probe.stop_row_gradient())
        used = [v.detach().clone() for v in probe.vectors]
        probe.enabled = False  # the add-on terms' losses are the model's own, not the probed one's
        optimizer_step(backend, metrics, terms)
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




# ------------------------------------------------------------------------------------------
# The method's declaration


def sap_state(probe: Probe | None, cfg: SapConfig) -> SapState:
    """A fresh SAP state (the `reference` variant's probe AdamW, over the probe's vectors)."""
    state = SapState()
    if probe is not None and cfg.variant == "reference":
        state.probe_optimizer = torch.optim.AdamW(probe.vectors, lr=cfg.probe_lr)
    return state


def new_state(cfg: SapConfig, setup: RunSetup) -> SapState:
    return sap_state(setup.probe, cfg)


def step(inputs: StepInputs, cfg: SapConfig, state: SapState) -> dict:
    return sap_step(inputs.backend, inputs.probe, inputs.task_batch, inputs.safety_batch(), inputs.global_tokens,
                    cfg, state, inputs.probe_rows, inputs.probe_tokens, inputs.before_step)


def check_run(cfg: SapConfig, total_steps: int) -> None:
    """A refresh interval longer than the run means it never repeats: a mistake, refused. Not
    when it equals the default (safety_every=4; the config cannot tell a default from the same
    value given): a smoke test of 2 steps must not fail on a setting it never chose, and a
    default longer than the run only means one safety pass."""
    defaults = SapConfig()
    for key in ("probe_every", "safety_every"):
        value = getattr(cfg, key)
        if value > total_steps and value != getattr(defaults, key):
            raise ConfigError(f"sap.{key}={value} is more than the run's {total_steps} steps (train.max_steps / "
                              f"train.epochs); lower sap.{key} or train longer")


METHOD = Method(
    name="sap",
    summary="safety-aware probing: the task step taken with a probe that resists the harmful direction",
    step=step,
    section="sap",
    config=SapConfig,
    new_state=new_state,
    uses_probe=True,
    safety_pairs=lambda config: ("sap.safety_batch_size", config.sap.safety_batch_size),
    probe_fraction=lambda config: config.sap.probe_batch_fraction,
    check_run=check_run,
    label=lambda cfg: f"sap/{cfg.variant}",
    variant=lambda cfg: cfg.variant,
    bench_cycle=lambda cfg: cfg.probe_every * cfg.safety_every,
    plan_memory="probe",
    experiment={
        "sap_paper": ("SAP (paper)", {"method": "sap", "sap.variant": "paper"}),
        "sap_reference": ("SAP (reference)", {"method": "sap", "sap.variant": "reference"}),
        # the safety direction recomputed on every step instead of every 4th (the cost lever's
        # exact end), and a cheaper setting: u_harm/u_here from a strided quarter of the batch
        "sap_every_step": ("SAP, safety direction every step",
                           {"method": "sap", "sap.variant": "paper", "sap.safety_every": 1}),
        "sap_fast": ("SAP, cheaper (probe on 1/4)", {"method": "sap", "sap.variant": "paper", "sap.safety_every": 4,
                                                     "sap.probe_batch_fraction": 0.25}),
    },
)
