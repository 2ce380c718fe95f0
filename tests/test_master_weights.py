"""Full fine-tuning in bf16 keeps fp32 master weights (issue "Cluster-ready", defect 3): AdamW
steps fp32 copies and the forward computes in bf16, so updates smaller than bf16's resolution
add up over steps instead of rounding away, and SAP's perturb/restore still works on them."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sap_dist.backends import OptimizerSpec
from sap_dist.backends.single import SingleBackend
from sap_dist.methods.sap import SapConfig
from sap_dist.probe import Probe
from sap_dist.methods.sap import sap_state, sap_step
from sap_dist.methods.sft import sft_step
from helpers import batch, safety_batch, tokens_of

LR = 1e-5
"""Adam moves every weight by about LR per step: far below half the bf16 spacing (2^-8 of the
weight, 2e-3 at the RMSNorm weights' 1.0), so a bf16 weight stepped directly never moves."""


def tiny_full_bf16() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


def test_updates_below_bf16_resolution_accumulate():
    model = tiny_full_bf16()
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    backend = SingleBackend(model, OptimizerSpec(lr=LR, max_grad_norm=0.0))
    for step in range(8):
        sft_step(backend, None, batch(step), tokens_of(batch(step)))
    after = dict(backend.unwrapped_model().named_parameters())
    # weights of magnitude >= 0.05: each step is < 1% of half their bf16 spacing
    moved = torch.cat([(after[n].detach().float() - w)[w.abs() >= 0.05].abs() for n, w in before.items()])
    assert moved.numel() > 100
    assert (moved > 0).float().mean() > 0.9, "updates below bf16's resolution were rounded away"
    assert moved.mean() > 2 * LR  # several steps' worth, accumulated
    assert all(p.dtype == torch.float32 for p in backend.params)  # the masters AdamW steps
    b = batch(0)
    assert backend.model(input_ids=b["input_ids"]).logits.dtype == torch.bfloat16  # still bf16 compute


def test_sap_perturb_and_restore_on_fp32_masters():
    """The perturbation lands on the fp32 masters: a step of 1e-4 of ||W|| moves the weights of
    magnitude >= 0.05 (on bf16 weights it would round away there), and restore is bitwise."""
    model = tiny_full_bf16()
    backend = SingleBackend(model, OptimizerSpec(lr=LR))
    b = batch(1)
    backend.zero_grad()
    backend.backward(backend.model(input_ids=b["input_ids"]).logits.float().pow(2).mean())
    saved = backend.save_weights()
    scale = 1e-4 * float(backend.weight_sq_norm().sqrt()) / float(backend.grad_sq_norm().sqrt())
    backend.add_scaled_grad_to_weights(scale)
    big = torch.cat([(p.detach().float() - s.float())[s.float().abs() >= 0.05] for p, s in zip(backend.params, saved)])
    assert big.numel() > 100 and (big != 0).float().mean() > 0.5
    backend.restore_weights(saved)
    assert all(torch.equal(p, s) for p, s in zip(backend.params, saved))



SMALLEST = 2.0**-7
"""Every weight of the warning test is at least this large, so bf16's spacing is at least
2^-14 at each of them and a move below half of it, 2^-15, rounds back to the same value."""


def bf16_half_spacing(weights) -> float:
    """The smallest half-spacing of bf16 at any of `weights`: |w| = m*2^e with m in [0.5, 1)
    has 8 significant bits, a spacing of 2^(e-8)."""
    return min(2.0 ** (int(torch.frexp(w.detach().float().abs())[1].min()) - 9) for w in weights)


def _sap_first_step(rho: float) -> tuple[dict, str | None, float]:
    """One SAP step (paper variant) on the bf16 model's fp32 masters: its metrics, warning, and
    bf16's smallest half-spacing at the masters it started from."""
    model = tiny_full_bf16()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.where(p < 0, -1.0, 1.0) * p.abs().clamp_min(SMALLEST))
    backend = SingleBackend(model, OptimizerSpec(lr=LR, max_grad_norm=0.0))
    half_spacing = bf16_half_spacing(backend.params)
    cfg = SapConfig(rho=rho, probe_layers=[1])
    probe = Probe(model.model.layers, cfg.probe_layers, model.config.hidden_size, torch.device("cpu"))
    state = sap_state(probe, cfg)
    metrics = sap_step(backend, probe, batch(2), safety_batch(3), tokens_of(batch(2)), cfg, state)
    return metrics, state.perturbation_warning, half_spacing


def test_a_perturbation_the_bf16_forward_never_sees_is_warned():
    """The forward computes with the bf16 cast of the fp32 masters, and the realised
    perturbation is measured on that cast. The masters start on bf16 values; no element of a
    perturbation moves by more than its whole norm, rho*||W||, so below bf16's smallest
    half-spacing at the weights every element of the cast rounds back to its value: realised
    size 0 (the masters themselves moved by all of it) and the step warns that the
    perturbation was rounded away. At rho=0.05 the cast moves by the intended size give or
    take its rounding, at most 2^-9*||W||: no warning."""
    metrics, warning, half_spacing = _sap_first_step(5e-7)
    assert metrics["perturb_norm_intended"] < 0.5 * half_spacing, (metrics, half_spacing)
    assert metrics["perturb_norm_realized"] == 0.0, metrics
    assert warning is not None and "realised perturbation 0 " in warning and "rounded away" in warning, warning
    metrics, warning, _ = _sap_first_step(0.05)
    assert warning is None and metrics["perturb_norm_realized"] > 0.5 * metrics["perturb_norm_intended"], metrics
