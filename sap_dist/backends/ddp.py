"""`ddp`: torch DistributedDataParallel, every rank holds the full model.

Also home of the small pieces the sharded backends share: reductions over the default process
group, the squared-norm sum, and collective saving of a model whose parameters live in shards
(gather one parameter at a time, rank 0 keeps a CPU copy and writes).
"""

from __future__ import annotations

import inspect
import os
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sap_dist.backends.common import (OptimizerSpec, add_direction, add_proximal, as_computed, build_optimizer,
                                     local_dot, unit_direction, with_compute_dtype)


class ProcessGroupOps:
    """Reductions and barrier over the default process group (every backend but `single`)."""

    device: torch.device

    def all_reduce_mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        # gloo has no AVG; SUM then divide works on both gloo and nccl.
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
        return tensor

    def all_reduce_max_(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def all_gather_object(self, obj) -> list:
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def probe_grad(self, loss: torch.Tensor, probe: list[torch.Tensor]) -> list[torch.Tensor]:
        # autograd.grad runs only the nodes on a path to the probe: no weight gradient is
        # formed, so no backend's gradient hooks (DDP buckets, ZeRO reduction, FSDP
        # reduce-scatter) fire. The probe is replicated, so one flat all-reduce averages it.
        grads = torch.autograd.grad(loss, probe)
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.device)
        self.all_reduce_mean_(flat)
        out, offset = [], 0
        for g in grads:
            out.append(flat[offset : offset + g.numel()].view_as(g).to(g.device))
            offset += g.numel()
        return out

    def global_sq_sum(self, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        """Sum of squares of local pieces, all-reduced (sum) over ranks; fp32 0-dim on CPU."""
        local = local_sq_sum(tensors, self.device)
        self.all_reduce_sum_(local)
        return local.cpu()


def local_sq_sum(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squares of `tensors`, accumulated in fp32 on `device` (no host sync per tensor)."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for t in tensors:
        total += t.detach().float().pow(2).sum().to(device)
    return total


MAX_SHARD_BYTES = 4 << 30
"""Full-model saves are written in safetensors shards of about this size as they are
gathered, so rank 0 never holds more than one shard in CPU memory."""


def save_gathered(
    model: torch.nn.Module,
    output_dir: str,
    tokenizer,
    gather: Callable[[torch.nn.Parameter], torch.Tensor | None],
) -> None:
    """Collective save of a model whose parameters are sharded. Every rank walks the same
    parameters in the same order and calls `gather` (a collective returning the full tensor on
    rank 0, anything elsewhere); rank 0 copies each to CPU at once, so no GPU ever holds more
    than one full parameter. A peft model saves its trained (adapter) weights with peft's
    `save_pretrained`; a full model is streamed into safetensors shards with an index, the
    layout `from_pretrained` reads. Either loads in a plain single-process session."""
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
    if hasattr(model, "peft_config"):
        by_id: dict[int, torch.Tensor] = {}
        for _, p in model.named_parameters():
            if p.requires_grad:
                full = gather(p)
                if rank == 0:
                    by_id[id(p)] = full.detach().to("cpu", copy=True).contiguous()
        if rank == 0:
            state = {n: by_id[id(t)] for n, t in model.state_dict(keep_vars=True).items() if id(t) in by_id}
            model.save_pretrained(output_dir, state_dict=state)
    else:
        _stream_full_model(model, output_dir, gather, rank == 0)
    if rank == 0 and tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    dist.barrier()


def _stream_full_model(model, output_dir: str, gather, writer: bool) -> None:
    import json

    from safetensors.torch import save_file

    files: list[tuple[str, dict[str, torch.Tensor]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0
    total = 0

    def flush():
        nonlocal shard, size
        if shard:
            name = f"part-{len(files):05d}.safetensors"
            save_file(shard, os.path.join(output_dir, name), metadata={"format": "pt"})
            files.append((name, {k: None for k in shard}))
        shard, size = {}, 0

    persistent = set(model.state_dict(keep_vars=True))
    # named_parameters lists a tied weight once; from_pretrained re-ties the other name
    items = [(n, p, True) for n, p in model.named_parameters()]
    items += [(n, b, False) for n, b in model.named_buffers() if n in persistent]
    for name, t, is_param in items:
        full = gather(t) if is_param else t
        if writer:
            cpu = _local_value(full).contiguous()
            shard[name] = cpu
            size += cpu.numel() * cpu.element_size()
            total += cpu.numel() * cpu.element_size()
            if size >= MAX_SHARD_BYTES:
                flush()
        del full
    if not writer:
        return
    flush()
    n = len(files)
    if n == 1:
        os.replace(os.path.join(output_dir, files[0][0]), os.path.join(output_dir, "model.safetensors"))
    else:
        weight_map = {}
        for i, (tmp, keys) in enumerate(files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(output_dir, tmp), os.path.join(output_dir, final))
            weight_map.update({k: final for k in keys})
        with open(os.path.join(output_dir, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    model.config.save_pretrained(output_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(output_dir)


def _local_value(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return (to_local() if to_local else t).detach().to("cpu", copy=True)


class DDPBackend(ProcessGroupOps):
    """Full replica per rank; DDP averages gradients inside backward (overlapped with it)."""

    def __init__(self, model: torch.nn.Module, optim: OptimizerSpec, device: torch.device):
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trained parameters (none has requires_grad=True)")
        self._module = model.to(device)
        # DDP broadcasts rank 0's parameters here, so all replicas start identical.
        # No buffer sync per forward: the only buffers (rotary tables) are deterministic.
        # A probe-only pass (autograd.grad wrt the probe) fires no DDP hook and leaves the
        # reducer in a state the next forward accepts (checked in tests/test_backends.py).
        no_sync = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})  # torch before the rename
        forward, self.compute_dtype = with_compute_dtype(model)  # bf16 full fine-tuning: fp32 masters
        self.model = DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None, **no_sync
        )
        self.max_grad_norm = optim.max_grad_norm
        self.optimizer, self.scheduler = build_optimizer(self.params, optim)

    # passes
    def backward(self, loss: torch.Tensor) -> None:
        # DDP all-reduces (mean) p.grad after accumulation; an earlier gradient that is already
        # the mean stays correct because mean(old + new_r) = old + mean(new_r).
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

    # norms: every rank holds the full (already averaged) gradient and weights, so the
    # local sum is the global one; no reduction needed.
    def grad_sq_norm(self) -> torch.Tensor:
        return local_sq_sum([p.grad for p in self.params if p.grad is not None], self.device).cpu()

    def weight_sq_norm(self) -> torch.Tensor:
        return local_sq_sum(self.params, self.device).cpu()

    # perturbation (replicas: the "local shard" is the whole weight)
    def save_weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def add_scaled_grad_to_weights(self, scale: float) -> None:
        for p in self.params:
            if p.grad is not None:
                p.add_(p.grad.to(p.dtype), alpha=scale)

    def weight_sq_distance(self, saved: list[torch.Tensor]) -> torch.Tensor:
        # as the forward computes with them (the bf16 cast of an fp32 master)
        dtype = self.compute_dtype
        moved = (as_computed(p.detach(), dtype) - as_computed(s, dtype) for p, s in zip(self.params, saved))
        return local_sq_sum(moved, self.device).cpu()

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
        return float(local_dot(a, b, self.device))  # replicas: local is global

    # Lisa's proximal term: the parameters are the masters the optimizer steps
    def save_master_weights(self) -> list[torch.Tensor]:
        return self.save_weights()

    def master_sq_distance(self, saved: list[torch.Tensor]) -> torch.Tensor:
        return local_sq_sum((p.detach().float() - s.float() for p, s in zip(self.params, saved)), self.device).cpu()

    def add_proximal_grad(self, saved: list[torch.Tensor], rho: float) -> None:
        # the gradient is already the all-reduced mean and the replicas are equal, so the
        # local term is the same on every rank
        add_proximal(self.params, saved, rho)

    def local_shapes(self) -> list[torch.Size]:
        return [p.shape for p in self.params]

    # output
    def unwrapped_model(self) -> torch.nn.Module:
        return self._module

    def save_model(self, output_dir: str, tokenizer=None) -> None:
        if self.rank == 0:
            os.makedirs(output_dir, exist_ok=True)
            self._module.save_pretrained(output_dir)
            if tokenizer is not None:
                tokenizer.save_pretrained(output_dir)
        dist.barrier()

    # checkpoints: replicas are identical, so rank 0 writes one torch.save file and every rank
    # reads it (sap_dist/backends/checkpointing.py); the caller's agreement step is the barrier
    checkpoint_format = "torch.save"

    def save_checkpoint(self, path: str) -> None:
        from sap_dist.backends.checkpointing import save_full_state

        if self.rank == 0:
            save_full_state(self._module, self.optimizer, self.scheduler, path)

    def load_checkpoint(self, path: str) -> None:
        from sap_dist.backends.checkpointing import load_full_state

        load_full_state(self._module, self.optimizer, self.scheduler, path, self.device)
