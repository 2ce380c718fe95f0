"""Full fine-tuning in bf16 keeps fp32 master weights (issue "Cluster-ready", defect 3): AdamW
steps fp32 copies and the forward computes in bf16, so updates smaller than bf16's resolution
add up over steps instead of rounding away, and SAP's perturb/restore still works on them."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sap_dist.backends import OptimizerSpec
from sap_dist.backends.single import SingleBackend
from sap_dist.sap import sft_step
from test_sap_step import batch, tokens_of

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
