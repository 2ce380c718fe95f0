"""The SAP step against an independent computation from torch.autograd.grad (in float64 where
the step cancels nearly equal gradients), on a tiny fp32 Llama with LoRA. The reference
computation here implements the probe as a bias on `mlp.down_proj` and the optimizer by
hand-built AdamW, so it shares no code with sap_dist.methods.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from sap_dist.backends import OptimizerSpec
from sap_dist.backends.single import SingleBackend
from sap_dist.methods.sap import SapConfig
from sap_dist.probe import Probe
from sap_dist.methods.sap import sap_state, sap_step
from sap_dist.methods.sft import sft_step

from helpers import batch, safety_batch, tiny_lora_model, tokens_of, trained

LAYERS = [1, 2]
LR = 1e-2
EPS = 1e-4  # Adam's eps well above float noise, so m/sqrt(v) does not amplify rounding in tiny grads


def layers_of(model):
    return model.base_model.model.model.layers


# ------------------------------------------------------------------------------------------
# The independent reference


def mean_nll(model, b) -> torch.Tensor:
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    labels = b["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)


def seq_logp(model, b) -> torch.Tensor:
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    labels = b["labels"][:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return -nll.sum(1)


def ref_safety_loss(model, b, form: str) -> torch.Tensor:
    n = b["input_ids"].shape[0] // 2
    if form == "difference":
        half = lambda sl: {k: v[sl] for k, v in b.items()}  # noqa: E731
        return mean_nll(model, half(slice(0, n))) - mean_nll(model, half(slice(n, None)))
    logp = seq_logp(model, b)
    return -F.logsigmoid(logp[:n] - logp[n:]).mean()


def add_down_proj_bias(model, layers):
    biases = []
    for layer in layers:
        down = layers_of(model)[layer].mlp.down_proj
        down.bias = torch.nn.Parameter(torch.zeros(down.out_features, dtype=down.weight.dtype))
        biases.append(down.bias)
    return biases


class HandAdamW:
    """AdamW written out, with persistent moments (torch defaults: betas .9/.999, wd .01)."""

    def __init__(self, lr, wd=0.01, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.wd, self.b1, self.b2, self.eps, self.t, self.m, self.v = lr, wd, b1, b2, eps, 0, None, None

    def step(self, params, grads):
        self.t += 1
        self.m = [torch.zeros_like(p) for p in params] if self.m is None else self.m
        self.v = [torch.zeros_like(p) for p in params] if self.v is None else self.v
        out = []
        for i, (p, g) in enumerate(zip(params, grads)):
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            mhat, vhat = self.m[i] / (1 - self.b1**self.t), self.v[i] / (1 - self.b2**self.t)
            out.append(p * (1 - self.lr * self.wd) - self.lr * mhat / (vhat.sqrt() + self.eps))
        return out


def lora_weights(model) -> list[torch.nn.Parameter]:
    """The trained LoRA weights (not the probe biases the reference adds)."""
    return [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]


def ref_direction_scale(model, sb, form, rho):
    w = lora_weights(model)
    g = torch.autograd.grad(ref_safety_loss(model, sb, form), w)
    gnorm = torch.sqrt(sum(x.pow(2).sum() for x in g))
    wnorm = torch.sqrt(sum(x.detach().pow(2).sum() for x in w))
    return [rho * wnorm * x / gnorm for x in g]


def ref_probe_grads(model, biases, b, dw=None):
    w = lora_weights(model)
    saved = [p.detach().clone() for p in w]
    with torch.no_grad():
        for p, d in zip(w, dw or []):
            p.add_(d)
    u = torch.autograd.grad(mean_nll(model, b), biases)
    with torch.no_grad():
        for p, s in zip(w, saved):
            p.copy_(s)
    return u


# ------------------------------------------------------------------------------------------


def pick(b, idx):
    return {k: v[idx] for k, v in b.items()}


def run_sap(model, cfg: SapConfig, batches, probe_rows: list[int] | None = None):
    backend = SingleBackend(model, OptimizerSpec(lr=LR, weight_decay=0.01, max_grad_norm=0.0, eps=EPS))
    probe = Probe(layers_of(model), LAYERS, 32, torch.device("cpu"))
    state = sap_state(probe, cfg)
    probes, metrics = [], []
    idx = torch.tensor(probe_rows) if probe_rows else None
    for tb, sb in batches:
        pb = pick(tb, idx) if probe_rows else None
        metrics.append(sap_step(backend, probe, tb, sb, tokens_of(tb), cfg, state, idx, tokens_of(pb) if pb else None))
        probes.append([v.clone() for v in state.last_probe])
    run_sap.metrics = metrics
    return probes, state


FP32_ULP = 2.0**-23
ROUNDING_ULPS = 64
"""fp32 rounding a gradient of this tiny model carries, in ulps of its largest element: the
backward through 4 layers sums at most 64 terms per element; measured against float64 the
error was under 10 ulps (Intel Xeon), so 64 leaves room for other CPUs' kernel orderings."""


@pytest.mark.parametrize("form, probe_rows", [("difference", None), ("logsigmoid", None), ("difference", [0, 2])])
def test_paper_step_matches_autograd(form, probe_rows):
    """The fp32 step against a float64 reference. The tolerances come from the size of the terms
    that cancel, not from one machine's rounding: the probe is beta * (u_harm - u_here), two
    nearly equal gradients, so its error is the rounding of those gradients (ROUNDING_ULPS of
    the larger), not a fraction of the small difference; the weights move by Adam's first step
    lr * g / (|g| + eps), whose slope in g is at most lr / eps."""
    cfg = SapConfig(variant="paper", safety_loss=form, rho=0.05, probe_step="beta", beta=3.0, probe_layers=LAYERS)
    model = tiny_lora_model()
    ref = copy.deepcopy(model).double()
    tb, sb = batch(1), safety_batch(2)
    probes, _ = run_sap(model, cfg, [(tb, sb)], probe_rows)

    biases = add_down_proj_bias(ref, LAYERS)
    dw = ref_direction_scale(ref, sb, form, cfg.rho)
    pb = pick(tb, torch.tensor(probe_rows)) if probe_rows else tb  # the probe passes see only these rows
    u_harm = ref_probe_grads(ref, biases, pb, dw)
    u_here = ref_probe_grads(ref, biases, pb)
    v_safe = [cfg.beta * (a - b) for a, b in zip(u_harm, u_here)]
    with torch.no_grad():
        for bias, v in zip(biases, v_safe):
            bias.copy_(v)
    w = lora_weights(ref)
    grads = torch.autograd.grad(mean_nll(ref, tb), w)
    expected = HandAdamW(LR, eps=EPS).step([p.detach() for p in w], grads)

    assert all(float(v.norm()) > 0 for v in v_safe)  # the check below is not about zeros
    for got, want, a, b in zip(probes[0], v_safe, u_harm, u_here):
        cancelled = cfg.beta * float(torch.maximum(a.abs(), b.abs()).max())
        torch.testing.assert_close(got.double(), want, rtol=0, atol=ROUNDING_ULPS * FP32_ULP * cancelled)
    grad_error = ROUNDING_ULPS * FP32_ULP * max(float(g.abs().max()) for g in grads)
    for got, want in zip(trained(model), expected):
        # a wrong probe moves the weights by ~lr (1e-2); this bound is ~1e-5
        torch.testing.assert_close(got.detach().double(), want, rtol=2 * FP32_ULP, atol=LR / EPS * grad_error)


def test_paper_probe_changes_the_step():
    """With a probe large enough to matter, the SAP weights differ from the SFT weights."""
    cfg = SapConfig(variant="paper", rho=0.05, probe_step="relative", probe_relative_size=0.5, probe_layers=LAYERS)
    sap_model, sft_model = tiny_lora_model(), tiny_lora_model()
    tb, sb = batch(1), safety_batch(2)
    run_sap(sap_model, cfg, [(tb, sb)])
    backend = SingleBackend(sft_model, OptimizerSpec(lr=LR, weight_decay=0.01, max_grad_norm=0.0, eps=EPS))
    sft_step(backend, None, tb, float((tb["labels"][:, 1:] != -100).sum()))
    diff = max(float((a - b).abs().max()) for a, b in zip(trained(sap_model), trained(sft_model)))
    assert diff > 1e-6


def test_relative_probe_has_stated_size():
    cfg = SapConfig(variant="paper", rho=0.05, probe_step="relative", probe_relative_size=0.1, probe_layers=LAYERS)
    model = tiny_lora_model()
    tb, sb = batch(1), safety_batch(2)
    # measure the hidden-state norms independently: mean over real tokens of each layer output norm
    out = model(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"], output_hidden_states=True)
    mask = tb["attention_mask"].bool()
    hidden_norms = [float(out.hidden_states[layer + 1][mask].norm(dim=-1).mean()) for layer in LAYERS]
    probes, _ = run_sap(model, cfg, [(tb, sb)])
    for v, h in zip(probes[0], hidden_norms):
        assert math.isclose(float(v.norm()), 0.1 * h, rel_tol=1e-4)


@pytest.mark.parametrize("probe_rows", [None, [0, 2]])
def test_reference_variant_lag_and_probe_adam(probe_rows):
    """u_harm and u_here are both the probe gradient over the probe rows alone, at the lagged
    probe in use, normalised by those rows' tokens (u_here from the training backward when the
    probe rows are the whole batch, from a pass of its own over a sub-batch)."""
    # the exact algorithm: a fresh safety direction on every step (the reference below recomputes it)
    cfg = SapConfig(variant="reference", safety_loss="difference", rho=0.05, probe_lr=0.05, probe_layers=LAYERS,
                    safety_every=1)
    model = tiny_lora_model()
    ref = copy.deepcopy(model).double()
    data = [(batch(1), safety_batch(2)), (batch(3), safety_batch(4))]
    probes, state = run_sap(model, cfg, data, probe_rows)

    biases = add_down_proj_bias(ref, LAYERS)
    w = lora_weights(ref)
    weight_opt, probe_opt = HandAdamW(LR, eps=EPS), HandAdamW(cfg.probe_lr)
    v = [torch.zeros(32, dtype=torch.float64), torch.zeros(32, dtype=torch.float64)]
    used, deltas, roundings, grad_error = [], [], [], 0.0
    for tb, sb in data:
        dw = ref_direction_scale(ref, sb, "difference", cfg.rho)
        with torch.no_grad():
            for bias, value in zip(biases, v):
                bias.copy_(value)
        pb = pick(tb, torch.tensor(probe_rows)) if probe_rows else tb
        u_harm = ref_probe_grads(ref, biases, pb, dw)  # at the lagged probe, like u_here
        used.append([x.clone() for x in v])
        gw = torch.autograd.grad(mean_nll(ref, tb), w)
        u_here = ref_probe_grads(ref, biases, pb)  # at the lagged probe, the probe rows only
        grad_error = max(grad_error, ROUNDING_ULPS * FP32_ULP * max(float(g.abs().max()) for g in gw))
        new_w = weight_opt.step([p.detach() for p in w], gw)
        with torch.no_grad():
            for p, value in zip(w, new_w):
                p.copy_(value)
        # the probe is reset to zero, then one Adam step on -(u_harm - u_here)
        deltas.append([-(a - b) for a, b in zip(u_harm, u_here)])
        roundings.append([ROUNDING_ULPS * FP32_ULP * float(torch.maximum(a.abs(), b.abs()).max()) for a, b in zip(u_harm, u_here)])
        v = probe_opt.step([torch.zeros(32, dtype=torch.float64)] * 2, deltas[-1])

    assert all(float(x.norm()) == 0 for x in probes[0])  # step 0 has no probe yet
    # Adam divides each element of u_harm - u_here by its own size, so an element that cancels to
    # rounding noise may come out anywhere in [-lr, lr]: each element's tolerance is how far the
    # hand Adam's output moves over the corners of the rounding box of its inputs
    first, both = adam_spread(cfg.probe_lr, deltas[:1], roundings[:1]), adam_spread(cfg.probe_lr, deltas, roundings)
    for got, want, tol in zip(probes[1], used[1], first):  # step 1 uses the probe computed from batch 0
        assert float(want.norm()) > 0
        assert bool(((got.double() - want).abs() <= tol + 8 * FP32_ULP * want.abs()).all()), (got, want, tol)  # + fp32 AdamW rounding
    for got, want, tol in zip(state.next_probe, v, both):  # moments persisted into the second probe update
        assert bool(((got.double() - want).abs() <= tol + 8 * FP32_ULP * want.abs()).all()), (got, want, tol)  # + fp32 AdamW rounding
    for got, want in zip(trained(model), w):  # two Adam steps, each of slope at most lr / eps in g
        torch.testing.assert_close(got.detach().double(), want.detach(), rtol=4 * FP32_ULP, atol=2 * LR / EPS * grad_error)


SAME_GRADIENT = 2 * ROUNDING_ULPS * FP32_ULP
"""Largest |u_harm - u_here| over max |u_harm| when both are fp32 computations of one gradient
(each within ROUNDING_ULPS ulps of its largest element). A perturbation of rho = 1e-12 moves the
probe gradient by about 1e-12 of its size, far below this."""


def test_reference_takes_both_probe_gradients_at_the_probe_in_use():
    """`reference` with a perturbation of nil size and the probe rows the whole batch: u_harm and
    u_here are the gradient at the same probe V_t, so they differ by rounding only, also from
    step 2 on, where V_t != 0 (a u_harm taken at V = 0 would differ by
    grad_V L(W,0) - grad_V L(W,V_t))."""
    cfg = SapConfig(variant="reference", rho=1e-12, probe_lr=0.05, probe_layers=LAYERS, safety_every=1)
    data = [(batch(i), safety_batch(10 + i)) for i in range(3)]
    probes, _ = run_sap(tiny_lora_model(), cfg, data)
    assert all(float(v.norm()) > 0 for v in probes[1] + probes[2])  # steps 2 and 3 probe at V_t != 0
    for step, m in enumerate(run_sap.metrics):
        assert m["probe_signal_rel"] <= SAME_GRADIENT, (step, m["probe_signal_rel"])


@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("probe_rows", [None, [0, 2]], ids=["all_rows", "sub_batch"])
def test_probe_gradients_see_the_same_dropout_masks(variant, probe_rows):
    """With LoRA dropout and a perturbation of nil size, u_harm - u_here is rounding only: both
    passes draw the same masks over the probe rows, whether they are the whole batch (`reference`:
    u_here from the training backward) or a sub-batch (`reference`: a probe pass of its own; in
    the full-batch training pass those rows would draw other masks)."""
    cfg = SapConfig(variant=variant, rho=1e-12, probe_layers=LAYERS, safety_every=1)
    model = tiny_lora_model(dropout=0.3)
    assert model.training and not torch.equal(mean_nll(model, batch(1)), mean_nll(model, batch(1)))  # real dropout
    data = [(batch(i), safety_batch(10 + i)) for i in range(3)]
    run_sap(model, cfg, data, probe_rows)
    for step, m in enumerate(run_sap.metrics):
        assert m["probe_signal_rel"] <= SAME_GRADIENT, (step, m["probe_signal_rel"])


def nan_gradient_in_forward_of(ids: torch.Tensor):
    """A forward hook (with kwargs) that leaves the logits' values as they are but makes their
    gradient NaN in the forward of the batch `ids`: 0 * sqrt(x - x) is 0, its derivative 0/0."""

    def hook(module, args, kwargs, output):
        if kwargs.get("input_ids") is ids:
            output.logits = output.logits + 0 * torch.sqrt(output.logits - output.logits)
        return output

    return hook


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("safety_every", [1, 4])
def test_a_non_finite_safety_gradient_makes_a_plain_step_and_is_retried(variant, safety_every, tmp_path, caplog):
    """A safety batch whose loss is finite but whose gradient is NaN, on a step that computes a
    new direction after valid ones: the weights are not perturbed (W + 0*NaN would be NaN), the
    step equals a plain fine-tuning step from the same weights and optimizer state (probe off),
    the probe optimizer is not stepped, a warning says so once, and the next step computes the
    direction again (with safety_every=4 it would otherwise reuse the missing one)."""
    cfg = SapConfig(variant=variant, rho=0.05, probe_layers=LAYERS, safety_every=safety_every)
    bad = safety_every  # steps 0..bad-1 valid; `bad` recomputes the direction on a poisoned batch
    data = [(batch(i), safety_batch(10 + i)) for i in range(bad + 3)]
    model = tiny_lora_model()
    spec = OptimizerSpec(lr=LR, weight_decay=0.01, max_grad_norm=0.0, eps=EPS)
    backend = SingleBackend(model, spec)
    probe = Probe(layers_of(model), LAYERS, 32, torch.device("cpu"))
    state = sap_state(probe, cfg)
    model.register_forward_hook(nan_gradient_in_forward_of(data[bad][1]["input_ids"]), with_kwargs=True)
    metrics = []
    with caplog.at_level("WARNING", logger="sap_dist.methods.sap"):
        for step, (tb, sb) in enumerate(data):
            if step == bad:
                backend.save_checkpoint(str(tmp_path / "before"))
                probe_before = state.next_probe
            metrics.append(sap_step(backend, probe, tb, sb, tokens_of(tb), cfg, state))
            assert all_finite(trained(model)) and all_finite(state.last_probe) and all_finite(state.next_probe), step
            if variant == "reference":
                moments = [t for s in state.probe_optimizer.state.values() for t in s.values()]
                assert all_finite(moments), step
                steps_taken = [int(s["step"]) for s in state.probe_optimizer.state.values()]
                assert steps_taken == [step + (step < bad)] * len(LAYERS), step  # not stepped at `bad`
            if step == bad:
                after_bad = [p.detach().clone() for p in trained(model)]
                assert all(torch.equal(a, b) for a, b in zip(state.next_probe, probe_before))  # kept for later steps

    assert metrics[bad]["safety_degenerate"] == 1 and metrics[bad]["probe_norm"] == 0
    assert metrics[bad]["perturb_norm_realized"] == 0 and "time_probe_harm" not in metrics[bad]
    twin = SingleBackend(tiny_lora_model(), spec)
    twin.load_checkpoint(str(tmp_path / "before"))
    sft_step(twin, None, data[bad][0], tokens_of(data[bad][0]))
    assert all(torch.equal(a, b.detach()) for a, b in zip(after_bad, trained(twin.unwrapped_model())))

    retry = metrics[bad + 1]
    assert retry["safety_refreshed"] == 1 and retry["safety_degenerate"] == 0 and "safety_loss" in retry
    assert retry["perturb_norm_realized"] > 0.5 * retry["perturb_norm_intended"] and retry["probe_norm"] > 0
    assert metrics[bad + 2]["safety_refreshed"] == (safety_every == 1)  # then the schedule goes on
    warned = [r.getMessage() for r in caplog.records if "safety gradient is not finite" in r.getMessage()]
    assert len(warned) == 1 and f"SAP step {bad + 1}:" in warned[0] and "plain fine-tuning" in warned[0], warned
    assert "the next step recomputes the safety direction" in warned[0]


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_a_degenerate_first_refresh_is_retried_before_its_probe_is_reused(variant):
    """probe_every=3 with a NaN safety gradient at the first refresh: there is no probe to keep
    in place, so step 2 refreshes (instead of two plain steps), and the schedule goes on."""
    cfg = SapConfig(variant=variant, rho=0.05, probe_layers=LAYERS, probe_every=3, safety_every=1)
    data = [(batch(i), safety_batch(10 + i)) for i in range(4)]
    model = tiny_lora_model()
    model.register_forward_hook(nan_gradient_in_forward_of(data[0][1]["input_ids"]), with_kwargs=True)
    probes, state = run_sap(model, cfg, data)
    metrics = run_sap.metrics
    assert [m["probe_refreshed"] for m in metrics] == [1, 1, 0, 1]
    assert metrics[0]["safety_degenerate"] == 1 and metrics[1]["safety_degenerate"] == 0
    assert all(float(v.norm()) > 0 for v in probes[2])  # the reused probe is the retry's
    assert all_finite(trained(model)) and all_finite(state.next_probe)


def adam_spread(lr, deltas, roundings):
    """Per element, the largest change of the hand AdamW's result (from zero, one step per entry
    of `deltas`) when each step's gradient moves by its rounding (+ or -, every combination)."""
    import itertools

    def run(signs):
        opt = HandAdamW(lr)
        for delta, rounding, sign in zip(deltas, roundings, signs):
            out = opt.step([torch.zeros_like(d) for d in delta], [d + sign * r for d, r in zip(delta, rounding)])
        return out

    centre = run([0] * len(deltas))
    spread = [torch.zeros_like(c) for c in centre]
    for signs in itertools.product([-1, 1], repeat=len(deltas)):
        spread = [torch.maximum(s, (o - c).abs()) for s, o, c in zip(spread, run(signs), centre)]
    return spread


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_probe_every_k_reuses_the_probe_between_refreshes(variant):
    cfg = SapConfig(variant=variant, rho=0.05, probe_every=3, probe_layers=LAYERS)
    model = tiny_lora_model()
    data = [(batch(i), safety_batch(10 + i)) for i in range(5)]
    probes, state = run_sap(model, cfg, data)
    metrics = run_sap.metrics
    assert [m["probe_refreshed"] for m in metrics] == [1, 0, 0, 1, 0]
    assert all("time_safety" not in m for m, r in zip(metrics, [1, 0, 0, 1, 0]) if not r)  # no extra passes
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
    if variant == "paper":
        assert same(probes[0], probes[1]) and same(probes[1], probes[2]) and not same(probes[2], probes[3])
        assert probes[0][0].norm() > 0
    else:  # step 0 trains at V=0, steps 1-3 with the probe from the refresh at step 0
        assert probes[0][0].norm() == 0 and same(probes[1], probes[2]) and same(probes[2], probes[3])
        assert probes[1][0].norm() > 0 and not same(probes[3], probes[4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_then_restore_is_bitwise(dtype):
    model = tiny_lora_model().to(dtype)
    for p in model.parameters():
        p.requires_grad_(True)  # full fine-tuning: every weight perturbed
    backend = SingleBackend(model, OptimizerSpec())
    before = [p.detach().clone() for p in trained(model)]
    loss = mean_nll(model, batch(1))
    backend.backward(loss)
    saved = backend.save_weights()
    backend.add_scaled_grad_to_weights(0.37)
    assert float(backend.weight_sq_distance(saved)) > 0
    backend.restore_weights(saved)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, trained(model)))


def test_saturated_logsigmoid_still_gives_the_direction():
    """A margin of thousands of nats makes -logsigmoid's gradient underflow to exactly zero;
    the step's surrogate keeps its direction: -grad(margin) / |grad(margin)|."""
    from sap_dist.methods.sap import harmful_direction

    cfg = SapConfig(safety_loss="logsigmoid", temperature=1e-4, rho=0.1)
    model = tiny_lora_model()
    sb = safety_batch(2, pairs=1)
    logp = seq_logp(model, sb)
    margin = (logp[0] - logp[1]) / cfg.temperature
    sign = 1.0 if float(margin) > 0 else -1.0
    cfg.temperature *= sign  # make the margin hugely positive: the loss is saturated
    margin = margin * sign
    assert float(margin) > 500
    naive = torch.autograd.grad(-F.logsigmoid(margin), trained(model), allow_unused=True, retain_graph=True)
    assert all(g is None or float(g.abs().max()) == 0 for g in naive)

    dmargin = torch.autograd.grad((logp[0] - logp[1]) * sign, trained(model))
    want = [-d / torch.sqrt(sum(x.pow(2).sum() for x in dmargin)) for d in dmargin]
    backend = SingleBackend(model, OptimizerSpec())
    metrics = {}
    scale = harmful_direction(backend, sb, cfg, metrics)
    assert scale > 0 and metrics["safety_degenerate"] == 0
    gnorm = math.sqrt(float(backend.grad_sq_norm()))
    for p, w in zip(trained(model), want):
        torch.testing.assert_close(p.grad / gnorm, w, rtol=1e-4, atol=1e-6)
    # the true |g| is reported in log space: exp(-margin) * |grad margin|, far below float range
    assert -float(margin) / math.log(10) - 5 < metrics["safety_grad_log10_norm"] < -100


def test_probe_hook_equals_down_proj_bias():
    model = tiny_lora_model()
    ref = copy.deepcopy(model)
    values = [torch.randn(32), torch.randn(32)]
    probe = Probe(layers_of(model), LAYERS, 32, torch.device("cpu"))
    probe.set(values)
    probe.enabled = True
    b = batch(5)
    got = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    biases = add_down_proj_bias(ref, LAYERS)
    with torch.no_grad():
        for bias, value in zip(biases, values):
            bias.copy_(value)
    want = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    probe.enabled = False
    off = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert float((off - got).abs().max()) > 1e-3  # switching it off really removes it


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward takes only ids and mask, like a custom architecture."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("wrap", [False, True], ids=["logits_to_keep", "no_logits_to_keep"])
def test_loss_on_response_positions_only_equals_full_logits(wrap):
    """The loss computes logits only where some row predicts a response token; with prompts of
    different lengths per row (and a model that does not take `logits_to_keep`) its value and
    gradient equal the full-logits computation's."""
    from sap_dist.methods.common import task_loss

    model = tiny_lora_model()
    b = batch(5, n=3, length=12)
    b["labels"][0, :8] = -100  # prompts of 4, 8 and 4 tokens
    b["labels"][1, :6] = -100
    backend = SingleBackend(_NoLogitsToKeep(model) if wrap else model, OptimizerSpec())
    tokens = float((b["labels"][:, 1:] != -100).sum())
    got = task_loss(backend, b, tokens)
    got_grads = torch.autograd.grad(got, trained(model))
    want = mean_nll(model, b)
    want_grads = torch.autograd.grad(want, trained(model))
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_a_rounded_away_perturbation_is_warned_once(variant, caplog):
    """rho=1e-12 moves fp32 weights by (next to) nothing: the step warns once, naming the
    realised and intended sizes; a normal rho does not warn."""
    tiny_rho = SapConfig(variant=variant, rho=1e-12, probe_layers=LAYERS)
    data = [(batch(1), safety_batch(2)), (batch(3), safety_batch(4))]
    with caplog.at_level("WARNING", logger="sap_dist.methods.sap"):
        _, state = run_sap(tiny_lora_model(), tiny_rho, data, [0, 2])
    assert state.perturbation_warning is not None and "rounded away" in state.perturbation_warning
    assert "SAP step 1" in state.perturbation_warning
    assert sum("rounded away" in r.getMessage() for r in caplog.records) == 1
    assert all(m["perturb_norm_realized"] < 0.1 * m["perturb_norm_intended"] for m in run_sap.metrics)
    _, state = run_sap(tiny_lora_model(), SapConfig(variant=variant, rho=0.05, probe_layers=LAYERS), data, [0, 2])
    assert state.perturbation_warning is None


def test_safety_every_perturbs_along_the_stored_direction_at_the_current_weight_norm():
    """sap.safety_every=2: steps 0 and 2 recompute g_hat from their safety batch; steps 1 and
    3 perturb by rho*||W_now||*g_hat of the step before (an independent computation), not by
    their own safety batch's direction. The cosine logged at step 2 is <g_hat0, g_hat2>."""
    cfg = SapConfig(variant="paper", safety_loss="difference", rho=0.05, probe_step="beta", beta=3.0,
                    probe_layers=LAYERS, safety_every=2)
    model = tiny_lora_model()
    ref = copy.deepcopy(model)
    data = [(batch(i), safety_batch(10 + i)) for i in range(4)]
    probes, state = run_sap(model, cfg, data, [0, 2])
    metrics = run_sap.metrics
    assert [m["safety_refreshed"] for m in metrics] == [1, 0, 1, 0]
    assert all("safety_loss" not in m for m in metrics[1::2])  # no safety pass on reuse steps

    biases = add_down_proj_bias(ref, LAYERS)
    w = lora_weights(ref)
    opt = HandAdamW(LR, eps=EPS)
    unit, units, v_fresh = None, [], None
    for step, (tb, sb) in enumerate(data):
        wnorm = torch.sqrt(sum(x.detach().pow(2).sum() for x in w))
        if step % 2 == 0:
            g = torch.autograd.grad(ref_safety_loss(ref, sb, "difference"), w)
            gnorm = torch.sqrt(sum(x.pow(2).sum() for x in g))
            unit = [x / gnorm for x in g]
            units.append(unit)
        pb = pick(tb, torch.tensor([0, 2]))
        u_here = ref_probe_grads(ref, biases, pb)
        u_harm = ref_probe_grads(ref, biases, pb, [cfg.rho * wnorm * x for x in unit])
        v_safe = [cfg.beta * (a - b) for a, b in zip(u_harm, u_here)]
        for got, want in zip(probes[step], v_safe):  # relative to the whole vector: Adam noise
            assert float((got - want).norm() / want.norm()) < 1e-4, step
        if step == 1:  # what a fresh direction would have given: really another probe
            g = torch.autograd.grad(ref_safety_loss(ref, sb, "difference"), w)
            gnorm = torch.sqrt(sum(x.pow(2).sum() for x in g))
            u_fresh = ref_probe_grads(ref, biases, pb, [cfg.rho * wnorm * x / gnorm for x in g])
            v_fresh = [cfg.beta * (a - b) for a, b in zip(u_fresh, u_here)]
            assert max(float((a - b).norm() / b.norm()) for a, b in zip(v_fresh, v_safe)) > 1e-2
        with torch.no_grad():
            for bias, v in zip(biases, v_safe):
                bias.copy_(v)
        grads = torch.autograd.grad(mean_nll(ref, tb), w)
        with torch.no_grad():
            for p, value in zip(w, opt.step([p.detach() for p in w], grads)):
                p.copy_(value)
            for bias in biases:
                bias.zero_()
        assert math.isclose(metrics[step]["perturb_norm_intended"], cfg.rho * float(wnorm), rel_tol=1e-5)
    cosine = float(sum((a * b).sum() for a, b in zip(units[0], units[1])))
    assert "safety_direction_cosine" not in metrics[0]
    assert math.isclose(metrics[2]["safety_direction_cosine"], cosine, rel_tol=1e-4)
    diff = torch.sqrt(sum((a.detach() - b.detach()).pow(2).sum() for a, b in zip(trained(model), w)))
    moved = torch.sqrt(sum((a.detach() - b.detach()).pow(2).sum() for a, b in zip(trained(tiny_lora_model()), w)))
    assert float(diff / moved) < 1e-4, float(diff / moved)  # of how far the 4 steps moved the weights


def test_reuse_step_applies_rho_times_current_norm_times_stored_direction():
    """The backend-level contract: on a reuse step W_perturbed - W = rho*||W_now||*d_stored."""
    from sap_dist.methods.sap import SapState, _perturb_along_stored_direction

    model = tiny_lora_model()
    backend = SingleBackend(model, OptimizerSpec())
    backend.backward(mean_nll(model, batch(1)))
    gnorm = torch.sqrt(sum(p.grad.pow(2).sum() for p in trained(model)))
    state = SapState(safety_direction=backend.save_direction())
    want_dir = [p.grad / gnorm for p in trained(model)]
    for got, want in zip(state.safety_direction, want_dir):
        torch.testing.assert_close(got, want)
    backend.zero_grad()
    with torch.no_grad():
        for p in trained(model):
            p.mul_(1.5)  # the weights moved since the direction was stored
    before = [p.detach().clone() for p in trained(model)]
    wnorm = torch.sqrt(sum(p.pow(2).sum() for p in before))
    metrics = {}
    saved = _perturb_along_stored_direction(backend, state, SapConfig(rho=0.05), metrics)
    for p, b, d in zip(trained(model), before, want_dir):  # up to W + dW - W's rounding
        assert float((p.detach() - b - 0.05 * wnorm * d).norm() / (0.05 * wnorm * d).norm()) < 1e-4
    assert math.isclose(metrics["perturb_norm_intended"], 0.05 * float(wnorm), rel_tol=1e-6)
    backend.restore_weights(saved)
    assert all(torch.equal(p.detach(), b) for p, b in zip(trained(model), before))
