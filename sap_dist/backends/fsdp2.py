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

from sap_dist.backends.common import (OptimizerSpec, add_direction, add_proximal, as_computed, build_optimizer,
                                     fp32_master_weights, local_dot, unit_direction)
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

    def __init__(self, model: torch.nn.Module, optim: OptimizerSpec, device: torch.device, dist_cfg,
                 weight_source=None):
        """`model` may hold parameters on the meta device (built by `prepare_loading`'s meta
        loading): they are sharded first, then filled from `weight_source(name)` (read on
        rank 0 only, one parameter at a time, each rank keeping its shard)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has no trained parameters (none has requires_grad=True)")
        on_meta = [name for name, p in model.named_parameters() if p.is_meta]
        if not on_meta:
            model.to(device)
        mesh = init_device_mesh(device.type, (self.world_size,))
        reshard = dist_cfg.fsdp_reshard_after_forward
        # bf16 full fine-tuning: fp32 sharded masters, all-gathered in bf16 for compute and
        # gradients reduced in fp32
        compute = fp32_master_weights(model)
        self.compute_dtype = compute
        extra = {}
        if compute is not None:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            extra["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, **extra)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard, **extra)
        self.largest_full_param = 0
        """Most elements of one full parameter this rank held at once while filling shards."""
        if on_meta:
            self._materialize(model, on_meta, weight_source)
        self.model = model
        self._fsdp_modules = [m for m in model.modules() if hasattr(m, "reshard") and hasattr(m, "unshard")]
        # collected after sharding: the parameters are now DTensors
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_grad_norm = optim.max_grad_norm
        self.optimizer, self.scheduler = build_optimizer(self.params, optim)

    @torch.no_grad()
    def _materialize(self, model: torch.nn.Module, on_meta: list[str], source) -> None:
        """Give the sharded meta parameters storage and their values: `to_empty` (FSDP2's
        route, which re-registers the shards) wipes every tensor, so the parameters and
        buffers that were real (LoRA adapters, rotary tables) are kept aside, as local shards,
        and copied back; each meta parameter is then read on rank 0 and broadcast, so every
        rank holds its shards plus at most one full parameter in transit."""
        from torch.distributed.tensor import distribute_tensor

        if self.rank == 0 and source is None:
            raise ValueError("the model has parameters on the meta device and no weight source to fill them")
        meta = set(on_meta)
        params = dict(model.named_parameters())
        kept = {n: _local(p).detach().clone() for n, p in params.items() if n not in meta}
        buffers = dict(model.named_buffers())
        if any(b.is_meta for b in buffers.values()):
            raise ValueError("buffers on the meta device cannot be filled; build the model with real buffers")
        kept_buffers = {n: b.detach().clone() for n, b in buffers.items()}
        model.to_empty(device=self.device)
        params = dict(model.named_parameters())
        for n, value in kept.items():
            _local(params[n]).copy_(value)
        for n, b in model.named_buffers():
            b.copy_(kept_buffers[n])
        for n in on_meta:  # the same order on every rank: one broadcast per parameter
            p = params[n]
            if self.rank == 0:
                full = source(n)
                if tuple(full.shape) != tuple(p.shape):
                    raise ValueError(f"weight {n}: the source has shape {tuple(full.shape)}, the model {tuple(p.shape)}")
                full = full.to(device=self.device, dtype=p.dtype)
            else:
                full = torch.empty(p.shape, dtype=p.dtype, device=self.device)
            self.largest_full_param = max(self.largest_full_param, full.numel())
            # a broadcast, then each rank keeps its own (possibly uneven) chunk
            dist.broadcast(full, src=0)
            shard = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
            _local(p).copy_(shard.to_local())
            del full, shard

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
        # as the forward computes with them: the policy's all-gather casts the fp32 shards to bf16
        dtype = self.compute_dtype
        return self.global_sq_sum(as_computed(_local(p).detach(), dtype) - as_computed(s, dtype)
                                  for p, s in zip(self.params, saved))

    @torch.no_grad()
    def restore_weights(self, saved: list[torch.Tensor]) -> None:
        self._reshard_all()
        for p, s in zip(self.params, saved):
            _local(p).copy_(s)

    # --- the stored safety direction (sap.safety_every): local shards only ---------------
    def save_direction(self):
        return unit_direction([None if p.grad is None else _local(p.grad) for p in self.params], self.grad_sq_norm())

    def add_scaled_direction_to_weights(self, direction, scale: float) -> None:
        self._reshard_all()
        add_direction([_local(p) for p in self.params], direction, scale)

    def direction_dot(self, a, b) -> float:
        return float(self.all_reduce_sum_(local_dot(a, b, self.device)))

    # Lisa's proximal term: the sharded parameters are the masters the optimizer steps
    def save_master_weights(self) -> list[torch.Tensor]:
        return self.save_weights()

    def master_sq_distance(self, saved: list[torch.Tensor]) -> torch.Tensor:
        return self.global_sq_sum(_local(p).detach().float() - s.float() for p, s in zip(self.params, saved))

    def add_proximal_grad(self, saved: list[torch.Tensor], rho: float) -> None:
        # p and p.grad are DTensors sharded alike: each rank edits its own shard
        add_proximal(self.params, saved, rho, local=_local)

    def local_shapes(self) -> list[torch.Size]:
        return [_local(p).shape for p in self.params]

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
