"""The Lisa baseline (`method=lisa`): its proximal gradient, its alternation of alignment
and task steps, and a whole run against a reference written here without sap_dist's step code
(autograd gradients, the proximal term added by hand, torch's AdamW)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sap_dist.backends import OptimizerSpec
from sap_dist.backends.single import SingleBackend
from sap_dist.config import ConfigError, load_config
from sap_dist.methods.lisa import LisaConfig
from sap_dist.methods.lisa import LisaState, lisa_optimizer_steps, lisa_step
from helpers import batch, tiny_lora_model, tokens_of, trained

LR = 1e-2


def _backend(model) -> SingleBackend:
    return SingleBackend(model, OptimizerSpec(lr=LR, eps=1e-4, max_grad_norm=0.0))


def test_proximal_gradient_is_rho_times_distance_to_the_anchor():
    """add_proximal_grad adds rho*(W - anchor) to the gradient already there, and gives a
    weight without a gradient the term alone."""
    model = tiny_lora_model()
    backend = _backend(model)
    anchor = backend.save_master_weights()
    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(p.shape, generator=g) * 1e-2 for p in backend.params]
    with torch.no_grad():
        for p, d in zip(backend.params, deltas):
            p.add_(d)
    backend.zero_grad()
    backend.add_proximal_grad(anchor, 3.0)
    for p, s in zip(backend.params, anchor):
        assert torch.allclose(p.grad, 3.0 * (p.detach() - s), rtol=1e-6, atol=0)
        assert p.grad.abs().max() > 0
    before = [p.grad.clone() for p in backend.params]
    backend.add_proximal_grad(anchor, 0.5)
    for p, s, b in zip(backend.params, anchor, before):
        assert torch.allclose(p.grad, b + 0.5 * (p.detach() - s), rtol=1e-6, atol=1e-9)


def _alignment_batches(log: list[int]):
    def get(i: int):
        log.append(i)
        b = batch(500 + i)
        return b, tokens_of(b)
    return get


def test_alternation_schedule():
    """K1=2 alignment steps before every K2=3 task steps: the alignment batches are taken in
    order, the first task step of a cycle starts at its anchor (proximal term 0), later ones
    do not, and the optimizer count is what lisa_optimizer_steps says."""
    cfg = LisaConfig(align_steps=2, task_steps=3, rho=1.0)
    backend, state, used = _backend(tiny_lora_model()), LisaState(), []
    metrics = [lisa_step(backend, batch(t), tokens_of(batch(t)), _alignment_batches(used), cfg, state) for t in range(7)]
    assert [m["lisa_align_steps"] for m in metrics] == [2, 0, 0, 2, 0, 0, 2]
    assert used == [0, 1, 2, 3, 4, 5]
    assert [("align_loss" in m) for m in metrics] == [True, False, False, True, False, False, True]
    assert [m["task_proximal"] == 0.0 for m in metrics] == [True, False, False, True, False, False, True]
    assert all(m["align_proximal"] > 0 for m in metrics if "align_loss" in m)  # the second alignment step moved
    assert state.task_steps_done == 7 and state.align_steps_done == 6
    assert backend.scheduler.last_epoch == lisa_optimizer_steps(7, cfg) == 13


def _reference_run(model, cfg: LisaConfig, task_steps: int) -> list[torch.Tensor]:
    """Lisa as the paper states it, by hand: K1 alignment steps then K2 task steps, each
    on loss + (rho/2)*||W - W_anchor||^2, W_anchor the weights at the last switch."""
    params = trained(model)
    opt = torch.optim.AdamW(params, lr=LR, eps=1e-4, weight_decay=0.0)

    def step(b, anchor):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), b["labels"][:, 1:].reshape(-1), ignore_index=-100)
        loss = loss + cfg.rho / 2 * sum((p - a).pow(2).sum() for p, a in zip(params, anchor))
        opt.zero_grad()
        loss.backward()
        opt.step()

    aligned = 0
    for t in range(task_steps):
        if t % cfg.task_steps == 0:
            anchor = [p.detach().clone() for p in params]
            for _ in range(cfg.align_steps):
                step(batch(500 + aligned), anchor)
                aligned += 1
            anchor = [p.detach().clone() for p in params]
        step(batch(t), anchor)
    return [p.detach() for p in params]


def test_lisa_steps_match_the_stated_algorithm():
    """Five task steps in cycles of 2 alignment + 2 task steps, with a proximal term large
    enough to matter (rho=20): the trained weights equal the hand-written reference's, and
    differ from a run without the proximal term."""
    cfg = LisaConfig(align_steps=2, task_steps=2, rho=20.0)
    want = _reference_run(tiny_lora_model(), cfg, 5)
    backend, state = _backend(tiny_lora_model()), LisaState()
    for t in range(5):
        lisa_step(backend, batch(t), tokens_of(batch(t)), _alignment_batches([]), cfg, state)
    got = [p.detach() for p in backend.params]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, want))
    free = _reference_run(tiny_lora_model(), LisaConfig(align_steps=2, task_steps=2, rho=0.0), 5)
    assert max((a - b).abs().max() for a, b in zip(free, want)) > 1e-3


def test_lisa_config_keys_and_validation():
    cfg = load_config("tiny", ["method=lisa", "lisa.align_steps=3", "lisa.task_steps=7", "lisa.rho=0.5",
                               "lisa.batch_size=2"])
    assert (cfg.lisa.align_steps, cfg.lisa.task_steps, cfg.lisa.rho, cfg.lisa.batch_size) == (3, 7, 0.5, 2)
    assert load_config("tiny", ["method=lisa"]).lisa.batch_size is None  # sap.safety_batch_size
    for bad in ("lisa.align_steps=0", "lisa.task_steps=0", "lisa.rho=-1", "lisa.batch_size=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config("tiny", ["method=lisa", bad])
    assert lisa_optimizer_steps(1, LisaConfig(align_steps=2, task_steps=18)) == 3
    assert lisa_optimizer_steps(40, LisaConfig(align_steps=2, task_steps=18)) == 46

