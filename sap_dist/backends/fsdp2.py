"""`fsdp2`: torch FSDP2 (`fully_shard`), one FSDP unit per decoder layer plus the root.

Every parameter becomes a DTensor sharded on dim 0; its `to_local()` is this rank's shard and
is the storage every forward all-gathers from (cast to the compute dtype on the way when a
mixed-precision policy is set), so editing it in place is what the next forward computes with.
Gradients arrive already reduce-scattered and averaged as sharded DTensors.

This path does not go through accelerate's FSDP plugin (which refuses CPU and, for FSDP2,
may leave the model unwrapped there): an `accelerate launch` with an FSDP config only selects
this backend (see `sap_dist.backends.resolve_backend`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sap_dist.backends.common import OptimizerSpec, build_optimizer
from sap_dist.backends.ddp import ProcessGroupOps, save_gathered


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks to shard one by one: modules whose class the model names in
    `_no_split_modules` (transformers' own list; peft models are searched through)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        # unknown architecture: every child of the largest ModuleList
        lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
        layers = list(max(lists, key=len)) if lists else []
    return layers


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class FSDP2Backend(ProcessGroupOps):
    """Parameters, gradients and optimizer state sharded over ranks with `fully_shard`."""

    def __init__(self, model: torch.nn.Module, optim: OptimizerSpec, device: torch.device, dist_cfg):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has no trained parameters (none has requires_grad=True)")
        model.to(device)
        mesh = init_device_mesh(device.type, (self.world_size,))
        reshard = dist_cfg.fsdp_reshard_after_forward
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
        self.model = model
        self._fsdp_modules = [m for m in model.modules() if hasattr(m, "reshard") and hasattr(m, "unshard")]
        # collected after sharding: the parameters are now DTensors
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_grad_norm = optim.max_grad_norm
        self.optimizer, self.scheduler = build_optimizer(self.params, optim)

    # --- passes -------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        # FSDP2 reduce-scatters (mean) each unit's gradients during backward and adds them to
        # any sharded gradient already present.
        loss.backward()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def optimizer_step(self) -> None:
        if self.max_grad_norm:
            # DTensor-aware: the norm is reduced over the shards
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.zero_grad()

    # --- norms --------------------------------------------------------------------------
    def grad_sq_norm(self) -> torch.Tensor:
        return self.global_sq_sum(_local(p.grad) for p in self.params if p.grad is not None)

    def weight_sq_norm(self) -> torch.Tensor:
        return self.global_sq_sum(_local(p) for p in self.params)

    # --- perturbation -------------------------------------------------------------------
    def _reshard_all(self) -> None:
        # A unit still holding gathered weights (the root after a forward without backward)
        # would skip its next all-gather and miss an edit of the shards: free them first.
        for m in self._fsdp_modules:
            m.reshard()

    def save_weights(self) -> list[torch.Tensor]:
        return [_local(p).detach().clone() for p in self.params]

    @torch.no_grad()
    def add_scaled_grad_to_weights(self, scale: float) -> None:
        self._reshard_all()
        for p in self.params:
            if p.grad is not None:
                w = _local(p)
                w.add_(_local(p.grad).to(w.dtype), alpha=scale)

    def weight_sq_distance(self, saved: list[torch.Tensor]) -> torch.Tensor:
        return self.global_sq_sum(_local(p).float() - s.float() for p, s in zip(self.params, saved))

    @torch.no_grad()
    def restore_weights(self, saved: list[torch.Tensor]) -> None:
        self._reshard_all()
        for p, s in zip(self.params, saved):
            _local(p).copy_(s)

    # --- output -------------------------------------------------------------------------
    def unwrapped_model(self) -> torch.nn.Module:
        return self.model

    def save_model(self, output_dir: str, tokenizer=None) -> None:
        def gather(p):
            return p.full_tensor() if hasattr(p, "full_tensor") else p

        save_gathered(self.model, output_dir, tokenizer, gather)

    # --- checkpoints: torch.distributed.checkpoint, sharded (backends/checkpointing.py) ---
    checkpoint_format = "dcp"

    def save_checkpoint(self, path: str) -> None:
        from sap_dist.backends.checkpointing import save_dcp

        self._reshard_all()
        save_dcp(self.model, self.optimizer, self.scheduler, path, self.rank)

    def load_checkpoint(self, path: str) -> None:
        from sap_dist.backends.checkpointing import load_dcp

        self._reshard_all()
        load_dcp(self.model, self.optimizer, self.scheduler, path)
