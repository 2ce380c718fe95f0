"""Pieces every backend shares: the optimizer and LR schedule built from one spec."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class OptimizerSpec:
    """What the trainer asks of the weight optimizer; each backend builds it its own way."""

    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 0.0
    """Clip the global gradient norm to this before each step; 0 disables clipping."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to `lr` over this many steps."""
    total_steps: int = 1
    """Number of optimizer steps in the run (for the schedule's decay)."""
    schedule: str = "constant"
    """'constant', 'linear' or 'cosine' decay after warm-up."""


def lr_lambda(spec: OptimizerSpec):
    """Multiplier of the peak LR at a given step, as a plain function (picklable by value)."""

    def factor(step: int) -> float:
        if spec.warmup_steps and step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        if spec.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - spec.warmup_steps) / max(1, spec.total_steps - spec.warmup_steps))
        if spec.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(params, spec: OptimizerSpec):
    """AdamW over `params` and its LambdaLR schedule."""
    optimizer = torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec))
    return optimizer, scheduler


# --- the stored safety direction (sap.safety_every): helpers for each backend's local pieces


def unit_direction(grads: list[torch.Tensor | None], grad_sq_norm: torch.Tensor) -> list[torch.Tensor | None] | None:
    """fp32 copies of the local gradient pieces divided by the global gradient norm (None
    where a piece has no gradient); None when that norm is zero or not finite."""
    norm = float(torch.sqrt(grad_sq_norm))
    if not (math.isfinite(norm) and norm > 0):
        return None
    return [None if g is None else g.detach().float() / norm for g in grads]


@torch.no_grad()
def add_direction(weights: list[torch.Tensor], direction: list[torch.Tensor | None], scale: float) -> None:
    """weights[i] += scale * direction[i], piece by piece, in each weight's dtype. A direction
    with another number of pieces than the weights is an error: pairing them up to the shorter
    list would perturb some weights along another weight's direction, or not at all."""
    if len(direction) != len(weights):
        raise ValueError(f"the stored safety direction has {len(direction)} pieces, this rank's weights {len(weights)}")
    for w, d in zip(weights, direction):
        if d is not None and w.numel():
            w.add_(d.to(device=w.device, dtype=w.dtype).view_as(w), alpha=scale)


def local_dot(a: list[torch.Tensor | None], b: list[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """Dot product of two directions' local pieces, in fp64 on `device`."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in zip(a, b):
        if x is not None and y is not None:
            total += (x.double() * y.to(x.device).double()).sum().to(device)
    return total


@torch.no_grad()
def add_proximal(params, saved: list[torch.Tensor], rho: float, local=lambda t: t) -> None:
    """p.grad += rho * (p - s) for every parameter, on its `local` shard, computed in fp32; a
    parameter without a gradient gets the proximal term alone (zeros_like keeps a sharded
    parameter's layout)."""
    for p, s in zip(params, saved):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        w, g = local(p).detach(), local(p.grad)
        g.add_((w.float() - s.to(device=w.device).float()).mul_(rho).to(g.dtype))


def fp32_master_weights(model: torch.nn.Module) -> torch.dtype | None:
    """Full fine-tuning in bf16 (or fp16): turn the trained weights into fp32, the master copy
    AdamW steps (stepping bf16 weights directly rounds every update below bf16's resolution
    away, ~0.4% of the weight), and return the dtype they had: the compute dtype the forward
    casts them to (autocast on `single`/`ddp`, FSDP2's mixed-precision policy). None when every
    trained weight is fp32 already (LoRA adapters over a bf16 base, fp32 runs). DeepSpeed keeps
    its own fp32 master (its bf16 mode) and does not call this. Works on meta parameters."""
    low = {p.dtype for p in model.parameters() if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)}
    if not low:
        return None
    for p in model.parameters():
        if p.requires_grad and p.dtype in low:
            p.data = p.data.float()
    return low.pop()


class ComputeIn(torch.nn.Module):
    """`module` run under autocast to `dtype`: fp32 master weights, bf16 matmuls."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *args, **kwargs):
        device = next(self.module.parameters()).device.type
        with torch.autocast(device_type=device, dtype=self.dtype):
            return self.module(*args, **kwargs)


def with_compute_dtype(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.dtype | None]:
    """(the model to call for forward passes, the compute dtype): `model` itself and None, or,
    once the trained weights are fp32 masters, `model` under autocast to their original
    low-precision dtype and that dtype."""
    dtype = fp32_master_weights(model)
    return (model, None) if dtype is None else (ComputeIn(model, dtype), dtype)


def as_computed(weight: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.Tensor:
    """`weight` as the forward computes with it, in fp32: an fp32 master rounded to the compute
    dtype it is cast to (bf16 full fine-tuning), else the weight itself. FSDP2's policy casts
    every weight so; under autocast the matmuls, which hold nearly all the weights, read that
    cast, while the norms and the embedding lookup read the master: for those it may report
    less movement than the forward sees, which errs towards warning of a rounded-away step."""
    return (weight if compute_dtype is None else weight.to(compute_dtype)).float()

