"""The one interface every training backend implements.

The methods' steps (`sap_dist.methods`) and the trainer (`sap_dist.train`) are written once against
`Backend`; nothing outside `sap_dist/backends/` names a backend. Each method states what SAP
needs from it (see docs/SAP.md, "What distributed training must keep true").

Conventions:
- "trained weights" are the parameters with `requires_grad=True` (LoRA adapters or the full
  model). A backend only ever touches the *local shard* of each one: no method may gather a
  full parameter or gradient.
- Gradients returned or used by a method are the data-parallel *mean* over ranks, exactly as
  the optimizer would see them.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Backend(Protocol):
    rank: int
    """This process's data-parallel rank (0 on a single process)."""
    world_size: int
    """Number of data-parallel ranks."""
    device: torch.device
    """Device that batches must be moved to before `forward`."""
    model: torch.nn.Module
    """The wrapped model (call it to run a forward pass)."""

    # --- passes -------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss` into the trained weights' gradients. Never steps the
        optimizer, never clears gradients. After it returns (and before the next zero_grad),
        the gradient seen by `grad_sq_norm`/`add_scaled_grad_to_weights`/`optimizer_step` is
        the data-parallel mean."""

    def zero_grad(self) -> None:
        """Clear the trained weights' gradients for real (a following backward starts
        from zero, on every backend)."""

    def optimizer_step(self) -> None:
        """Clip (if configured), step the optimizer and the LR scheduler, then clear
        gradients."""

    def probe_grad(self, loss: torch.Tensor, probe: list[torch.Tensor]) -> list[torch.Tensor]:
        """Gradient of `loss` with respect to the probe tensors only (no weight gradient is
        computed or accumulated), averaged over data-parallel ranks so every rank holds the
        same values."""

    # --- global reductions ----------------------------------------------------------------
    def all_reduce_mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place mean over data-parallel ranks (used for the probe gradient and for
        scalar metrics). Returns `tensor`."""

    def all_reduce_max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place max over data-parallel ranks. Returns `tensor`."""

    def grad_sq_norm(self) -> torch.Tensor:
        """Squared global L2 norm of the (mean) gradient of all trained weights: the sum of
        shard-local squares, all-reduced. A 0-dim fp32 tensor, equal on every rank."""

    def weight_sq_norm(self) -> torch.Tensor:
        """Squared global L2 norm of all trained weights, computed the same way."""

    # --- perturbation ---------------------------------------------------------------------
    def save_weights(self) -> Any:
        """An exact copy of the local shard of every trained weight that the perturbation
        edits: the fp32 masters where the backend keeps them beside the parameters (`single`,
        `ddp` and `fsdp2` cast them to bf16 for the forward), the compute partitions under
        ZeRO (at most one shard's worth of extra memory)."""

    def add_scaled_grad_to_weights(self, scale: float) -> None:
        """W <- W + scale * grad, applied to the weights the next forward pass computes
        with, shard by shard, with no gather."""

    def weight_sq_distance(self, saved: Any) -> torch.Tensor:
        """Squared global L2 distance between the current weights and `saved`, both as the
        forward computes with them (fp32 masters rounded to the bf16 they are cast to): how
        far a perturbation really moved what the forward sees (it may round away in bf16)."""

    def restore_weights(self, saved: Any) -> None:
        """Copy `saved` back into the weights: bitwise the state before the perturbation."""

    # --- the stored safety direction (sap.safety_every) -----------------------------------
    def save_direction(self) -> Any:
        """The local shard of the current (mean) gradient divided by its global norm, g/|g|,
        as fp32 copies aligned with the local weights; None when |g| is zero or not
        finite. Kept by the SAP step between safety passes (and in checkpoints, per rank)."""

    def add_scaled_direction_to_weights(self, direction: Any, scale: float) -> None:
        """W <- W + scale * direction for a `save_direction` result, shard by shard, applied
        to the weights the next forward pass computes with (like add_scaled_grad_to_weights)."""

    def direction_dot(self, a: Any, b: Any) -> float:
        """Global dot product of two `save_direction` results (local pieces, all-reduced),
        equal on every rank."""

    # --- Lisa's proximal term, on the weights the optimizer steps -------------------------
    def save_master_weights(self) -> Any:
        """An exact copy of the local shard of every trained weight as the optimizer holds it:
        the fp32 master in bf16 full fine-tuning (on every backend: ZeRO's own master
        partitions, the fp32 parameters elsewhere), else the weight itself."""

    def master_sq_distance(self, saved: Any) -> torch.Tensor:
        """Squared global L2 distance, in fp32, between the current master weights and
        `saved` (from `save_master_weights`)."""

    def add_proximal_grad(self, saved: Any, rho: float) -> None:
        """grad <- grad + rho * (W - saved), W the master weights and `saved` from
        `save_master_weights`, computed in fp32 shard by shard with no gather, on the gradient
        the next `optimizer_step` clips and applies (norms included): the gradient of a
        proximal term (rho/2)*||W - saved||^2 added to the loss (Lisa)."""

    # --- per-rank state in checkpoints ------------------------------------------------------
    def local_shapes(self) -> list[torch.Size]:
        """The shape of this rank's local piece of each trained weight, in the order
        `save_weights`, `save_master_weights` and `save_direction` list their pieces."""

    # --- output ---------------------------------------------------------------------------
    def unwrapped_model(self) -> torch.nn.Module:
        """The underlying (peft or transformers) model, for saving and hooks."""

    def save_model(self, output_dir: str, tokenizer: Any | None) -> None:
        """Write complete weights (or the adapter) plus tokenizer to `output_dir`, loadable
        by a plain single-process transformers/peft session. Collective: every rank calls
        it; rank 0 writes."""

    def barrier(self) -> None:
        """Wait for every rank."""

    # --- checkpoints and coordination (sap_dist.run_control.checkpoint) -------------------------------
    checkpoint_format: str
    """Name of the native format `save_checkpoint` writes (`torch.save`, `dcp`, `deepspeed`),
    recorded in the checkpoint's meta.json."""

    def save_checkpoint(self, path: str) -> None:
        """Write the trained weights, the optimizer state and the LR schedule into directory
        `path` in the backend's native format (sharded where the backend shards: every rank
        writes only its own shards, nothing is gathered). Frozen weights are not written.
        Collective: every rank calls it with the same `path` (on a filesystem every rank
        sees). Files are flushed to disk before it returns; an OSError (a full disk) is
        raised, on every rank where the backend's format reports it."""

    def load_checkpoint(self, path: str) -> None:
        """Restore what `save_checkpoint(path)` wrote into this freshly built backend (same
        model, config and world size), so that the next step is the one the saving run
        would have taken. Collective."""

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on at least one rank (an all-reduce max):
        how ranks agree on a stop request at a step boundary. Collective."""

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable `obj`, in rank order, on every rank. Collective."""
