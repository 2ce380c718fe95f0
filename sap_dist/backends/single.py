"""`single`: one process, plain PyTorch. The reference every other backend is compared with."""

from __future__ import annotations

import torch

from sap_dist.backends.common import (OptimizerSpec, add_direction, add_proximal, as_computed, build_optimizer,
                                     local_dot, unit_direction, with_compute_dtype)


class SingleBackend:
    """Plain PyTorch on one device; trained weights are the model's own tensors."""

    def __init__(self, model: torch.nn.Module, optim: OptimizerSpec, device: torch.device | None = None):
        self.rank = 0
        self.world_size = 1
        self.device = device or torch.device("cpu")
        self._module = model.to(self.device)
        # bf16 full fine-tuning: fp32 masters, the forward under autocast to bf16
        self.model, self.compute_dtype = with_compute_dtype(self._module)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trained parameters (none has requires_grad=True)")
        self.max_grad_norm = optim.max_grad_norm
        self.optimizer, self.scheduler = build_optimizer(self.params, optim)

    # passes
    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def optimizer_step(self) -> None:
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.zero_grad()

    def probe_grad(self, loss: torch.Tensor, probe: list[torch.Tensor]) -> list[torch.Tensor]:
        # autograd.grad only runs the graph nodes on a path to the probe, so the backward
        # stops at the lowest probed layer and no weight gradient is formed.
        return list(torch.autograd.grad(loss, probe))

    # reductions (one process: identities)
    def all_reduce_mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_max_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def grad_sq_norm(self) -> torch.Tensor:
        return _sq_norm([p.grad for p in self.params if p.grad is not None])

    def weight_sq_norm(self) -> torch.Tensor:
        return _sq_norm([p.detach() for p in self.params])

    # perturbation
    def save_weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def add_scaled_grad_to_weights(self, scale: float) -> None:
        for p in self.params:
            if p.grad is not None:
                p.add_(p.grad.to(p.dtype), alpha=scale)

    def weight_sq_distance(self, saved: list[torch.Tensor]) -> torch.Tensor:
        # as the forward computes with them: a move of an fp32 master that rounds away in the
        # bf16 cast never reaches the forward
        dtype = self.compute_dtype
        return _sq_norm([as_computed(p.detach(), dtype) - as_computed(s, dtype) for p, s in zip(self.params, saved)])

    @torch.no_grad()
    def restore_weights(self, saved: list[torch.Tensor]) -> None:
        for p, s in zip(self.params, saved):
            p.copy_(s)

    # the stored safety direction (sap.safety_every)
    def save_direction(self):
        return unit_direction([p.grad for p in self.params], self.grad_sq_norm())

    def add_scaled_direction_to_weights(self, direction, scale: float) -> None:
        add_direction(self.params, direction, scale)

    def direction_dot(self, a, b) -> float:
        return float(local_dot(a, b, self.device))

    # Lisa's proximal term: the parameters are the masters the optimizer steps
    def save_master_weights(self) -> list[torch.Tensor]:
        return self.save_weights()

    def master_sq_distance(self, saved: list[torch.Tensor]) -> torch.Tensor:
        return _sq_norm([p.detach().float() - s.float() for p, s in zip(self.params, saved)])

    @torch.no_grad()
    def add_proximal_grad(self, saved: list[torch.Tensor], rho: float) -> None:
        add_proximal(self.params, saved, rho)

    def local_shapes(self) -> list[torch.Size]:
        return [p.shape for p in self.params]

    # output
    def unwrapped_model(self) -> torch.nn.Module:
        return self._module

    def save_model(self, output_dir: str, tokenizer=None) -> None:
        from sap_dist.models import save_trained

        save_trained(self._module, tokenizer, output_dir)

    def barrier(self) -> None:
        pass

    # checkpoints (one torch.save file, see sap_dist/backends/checkpointing.py)
    checkpoint_format = "torch.save"

    def save_checkpoint(self, path: str) -> None:
        from sap_dist.backends.checkpointing import save_full_state

        save_full_state(self._module, self.optimizer, self.scheduler, path)

    def load_checkpoint(self, path: str) -> None:
        from sap_dist.backends.checkpointing import load_full_state

        load_full_state(self._module, self.optimizer, self.scheduler, path, self.device)

    def any_rank(self, flag: bool) -> bool:
        return bool(flag)

    def all_gather_object(self, obj) -> list:
        return [obj]


def _sq_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32)
    for t in tensors:
        total += t.detach().float().pow(2).sum().cpu()
    return total
