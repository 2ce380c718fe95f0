"""`zero2` / `zero3` / `zero3_offload` / `deepspeed`: DeepSpeed ZeRO stage 2 or 3.

What SAP needs from DeepSpeed, and how it is reached (facts measured with deepspeed 0.19.8,
regression-tested in tests/test_backends.py):
- A backward that does not step: `engine.backward` (accelerate's `backward` also steps).
- A zero-grad that clears: under ZeRO-3 `engine.zero_grad()` only drops `param.grad`; the
  reduced partitions keep adding up until `engine.optimizer.zero_grad()` resets them.
- Local gradient shards: ZeRO-3 `optimizer.get_local_fp32_grad_for_param` (what
  `safe_get_local_grad` calls); ZeRO-2 the per-parameter fragment of the reduced partition,
  reached through `param._hp_mapping` (the same path `safe_get_full_grad` uses, minus its
  all-reduce).
- Perturbing what the forward computes with: ZeRO-3 gathers every forward from
  `param.ds_tensor` (the compute-dtype partition), so that is what is edited; the fp32 master
  (`safe_set_full_fp32_param`) is not seen by the forward. Parameters under
  `stage3_param_persistence_threshold` stay gathered and would ignore the edit, hence
  threshold 0 (enforced). ZeRO-2 replicates the compute weights: each rank edits the fragment
  of its own partition and the partitions are all-gathered back into the replicas, exactly as
  DeepSpeed's own step does.
- Lisa's proximal term works on the fp32 masters AdamW steps (the compute copies would make
  W - anchor move in bf16 steps): ZeRO-2 `param._hp_mapping.hp_fragment`, ZeRO-3 the fp32
  partition. With the optimizer offloaded both stages clip with per-parameter gradient norms
  recorded while reducing (`norm_for_param_grads`), before the term is added: ZeRO-3's
  `set_local_grad_for_param` records the new norm, ZeRO-2 has no such call and the backend
  records it the way DeepSpeed does.
- ZeRO-2 with `contiguous_gradients: true` crashes on a backward that gives no gradient to an
  engine-managed parameter: disabled (enforced). DeepSpeed turns it back on when the optimizer
  is offloaded, so there `backward` must reach a trained weight; SAP's passes do (its
  probe-only passes go through `probe_grad`, which never calls engine.backward).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist

from sap_dist.backends.common import OptimizerSpec, add_direction, local_dot, lr_lambda, unit_direction
from sap_dist.backends.ddp import ProcessGroupOps, save_gathered

SAP_REQUIRED_ZERO = {
    2: {"contiguous_gradients": False},
    3: {"stage3_param_persistence_threshold": 0},
}
"""ZeRO settings SAP depends on, per stage (see the module docstring for why)."""

_TRUE = ("1", "true", "yes", "on")


def build_ds_config(
    stage: int | None,
    offload: bool,
    dist_cfg,
    optim: OptimizerSpec,
    world_size: int,
    trained_dtype: torch.dtype,
    env: dict | None = None,
    batch_size: int | None = None,
) -> dict:
    """The DeepSpeed config for this run: the user's file (`dist.deepspeed_config`, else
    accelerate's `ACCELERATE_DEEPSPEED_CONFIG_FILE`) or nothing, then this run's batch,
    clipping and precision, then SAP's required ZeRO settings. The optimizer and scheduler
    come from `OptimizerSpec` (the backend owns them), so sections for them are dropped.

    A file that contradicts this run is refused (ValueError, one line naming the key and both
    values) rather than overridden: a ZeRO stage other than the one the backend name or
    `dist.zero_stage` asks for, and, given the run's global `batch_size` (train.batch_size,
    with `optim` holding its clipping: the trainer's checks pass both), a numeric clipping or
    batch key other than the run's. "auto" or an absent key takes the run's value."""
    env = os.environ if env is None else env
    path = dist_cfg.deepspeed_config or env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    cfg: dict[str, Any] = {}
    if path:
        with open(path) as fh:
            cfg = json.load(fh)
    zero = dict(cfg.get("zero_optimization") or {})

    file_stage = zero.get("stage")
    file_stage = None if file_stage in (None, "auto") else int(file_stage)
    env_stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    asked = stage or dist_cfg.zero_stage
    if file_stage is not None and asked is not None and file_stage != asked:
        who = f"dist.backend={dist_cfg.backend}" if stage else f"dist.zero_stage={dist_cfg.zero_stage}"
        raise ValueError(f"zero_optimization.stage is {file_stage} in the file, but {who} runs ZeRO stage {asked}: "
                         "make them agree, or set dist.backend=deepspeed (and no dist.zero_stage) to let the file "
                         "choose")
    resolved = asked or file_stage or (int(env_stage) if env_stage else None) or 3
    if resolved not in (2, 3):
        raise ValueError(f"ZeRO stage {resolved} is not supported for SAP; use 2 or 3")
    zero["stage"] = resolved

    # Offload: the backend name or dist.* flags, the file, or accelerate's environment.
    off_opt = offload or dist_cfg.offload_optimizer or env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") == "cpu"
    off_par = offload or dist_cfg.offload_params or env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none") == "cpu"
    for key, wanted in (("offload_optimizer", off_opt), ("offload_param", off_par)):
        device = (zero.get(key) or {}).get("device", "none")
        if device == "nvme":
            raise ValueError(f"{key}: nvme is not supported (SAP edits and restores the partitions in place)")
        if wanted or device == "cpu":
            section = {"pin_memory": True, **(zero.get(key) or {}), "device": "cpu"}
            section["pin_memory"] = bool(section["pin_memory"]) and torch.cuda.is_available()  # no pinning without CUDA
            zero[key] = section
    if int(zero.get("zero_hpz_partition_size") or 1) > 1:
        # ZeRO++ keeps a secondary copy of the weights per node that the forward gathers
        # from; SAP edits the primary partitions, so the perturbation would never reach it
        raise ValueError(f"zero_optimization.zero_hpz_partition_size={zero['zero_hpz_partition_size']} (ZeRO++ "
                         "hierarchical partitioning) is not supported for SAP: its secondary weight copy is not "
                         "refreshed after the perturbation; remove it or set it to 1")
    if resolved == 2 and (zero.get("offload_param") or {}).get("device") == "cpu":
        warnings.warn("offload_param needs ZeRO-3; ignored at stage 2")
        zero.pop("offload_param")

    for key, value in SAP_REQUIRED_ZERO[resolved].items():
        if key in zero and zero[key] not in ("auto", value):
            warnings.warn(f"DeepSpeed zero_optimization.{key}={zero[key]!r} breaks SAP; using {value!r}")
        zero[key] = value
    for key in list(zero):
        if zero[key] == "auto":
            zero.pop(key)  # leave DeepSpeed's default
    cfg["zero_optimization"] = zero

    for key in ("optimizer", "scheduler"):
        if key in cfg:
            warnings.warn(f"DeepSpeed config section {key!r} ignored: sap-dist builds AdamW and its schedule from train.*")
            cfg.pop(key)
    if batch_size is not None:
        _refuse_other_batch_or_clipping(cfg, float(optim.max_grad_norm), batch_size, world_size)
    gas = cfg.get("gradient_accumulation_steps", "auto")
    if gas not in ("auto", 1):
        warnings.warn("gradient_accumulation_steps ignored: the trainer feeds each rank its slice of the global batch")
    # The trainer runs its own passes through engine.backward; these only satisfy DeepSpeed's
    # batch bookkeeping (train_batch_size = micro * accumulation * world).
    cfg["train_micro_batch_size_per_gpu"] = 1
    cfg["gradient_accumulation_steps"] = 1
    cfg["train_batch_size"] = world_size
    cfg["gradient_clipping"] = float(optim.max_grad_norm)

    # Precision follows the trained weights unless the file says otherwise: fp32 LoRA over a
    # bf16 base stays fp32 (as in `single`); bf16 full fine-tuning gets fp32 master weights.
    bf16 = cfg.get("bf16") or {}
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = trained_dtype == torch.bfloat16
    cfg["bf16"] = bf16
    if (cfg.get("fp16") or {}).get("enabled") in (True, "true"):
        raise ValueError("fp16 with loss scaling is not supported for SAP (its extra passes skip the scaler); use bf16")
    cfg.pop("fp16", None)

    cfg["zero_allow_untested_optimizer"] = True
    cfg["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on the offloaded partitions is fine
    cfg.setdefault("steps_per_print", 1 << 30)
    return cfg


def _refuse_other_batch_or_clipping(cfg: dict, max_grad_norm: float, batch_size: int, world_size: int) -> None:
    """ValueError for the first numeric clipping or batch key of a user's DeepSpeed config that
    differs from this run's own setting (which is what the run uses: the trainer feeds the
    batches and the backend overwrites these keys)."""
    ours = {
        "gradient_clipping": (max_grad_norm, f"train.max_grad_norm={max_grad_norm:g}"),
        "train_batch_size": (batch_size, f"train.batch_size={batch_size}"),
        "train_micro_batch_size_per_gpu": (batch_size // world_size,
                                           f"train.batch_size={batch_size} is {batch_size // world_size} per rank "
                                           f"at world size {world_size}"),
        "gradient_accumulation_steps": (1, "sap-dist takes one optimizer step per global batch (1)"),
    }
    for key, (value, run_side) in ours.items():
        theirs = cfg.get(key, "auto")
        number = isinstance(theirs, (int, float)) and not isinstance(theirs, bool)
        if theirs != "auto" and not (number and float(theirs) == float(value)):
            raise ValueError(f"{key} is {theirs!r} in the file, but {run_side}: make them agree or set it to \"auto\"")


def _no_prologue() -> None:
    """Stands in for DeepSpeedEngine._backward_prologue during a probe pass."""


class DeepSpeedBackend(ProcessGroupOps):
    """ZeRO-2 or ZeRO-3 through a DeepSpeed engine; SAP touches only local partitions.

    Under ZeRO-3 the model may arrive already partitioned (built under `deepspeed.zero.Init`
    by `prepare_loading`, the trainer's route) or whole; `deepspeed.initialize` partitions
    whatever is not yet (the LoRA adapters added after loading, or everything)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optim: OptimizerSpec,
        device: torch.device,
        dist_cfg,
        stage: int | None = None,
        offload: bool = False,
    ):
        import deepspeed

        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trained parameters (none has requires_grad=True)")
        self._orig_dtype = {id(p): p.dtype for p in self.params}
        self.config = build_ds_config(stage, offload, dist_cfg, optim, self.world_size, self.params[0].dtype)
        self.stage = self.config["zero_optimization"]["stage"]
        # deepspeed.comm wraps the torch process group init_distributed already made.
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        optimizer = torch.optim.AdamW(
            self.params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay
        )
        factor = lr_lambda(optim)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
            config=self.config,
            dist_init_required=False,
        )
        self.model = self.engine
        self._holds_grads = False

    # --- passes -------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        # engine.backward reduces into the partitions and never steps (GAS is 1). ZeRO-3
        # adds to the partitions until zero_grad; ZeRO-2 at GAS 1 overwrites them on every
        # backward, so an earlier gradient is kept aside (one local shard) and added back.
        stash = None
        if self.stage == 2:
            if self._holds_grads:
                stash = [None if g is None else g.clone() for g in self._local_grads()]
            # With the optimizer offloaded, ZeRO-2 accumulates through CPU buffers keyed on a
            # micro-step counter that only its step() resets (not zero_grad): a backward after
            # zero_grad would add the previous gradient back in. Every backward is made a
            # "first" one (copy, not add); accumulation is the stash above.
            from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

            self.optimizer.micro_step_id = INITIAL_MICRO_STEP_ID
        self.engine.backward(loss)
        if stash is not None:
            opt = self.optimizer
            for p, g, old in zip(self._z2_params(), self._local_grads(), stash):
                if g is not None and old is not None:
                    g.add_(old.view_as(g))
                    if opt.cpu_offload:
                        # offloaded ZeRO-2 clips with per-parameter norms recorded when this
                        # backward reduced its own gradient: record the accumulated one's
                        self._record_offload_norm(p, g)
        self._holds_grads = True

    def probe_grad(self, loss: torch.Tensor, probe: list[torch.Tensor]) -> list[torch.Tensor]:
        # engine.forward hooks its outputs so that *any* backward through them counts as a
        # "torch-style" engine backward: a prologue, then ZeRO's reduction epilogue when it
        # ends. A probe pass is not one: the epilogue would reduce empty buckets (an IndexError
        # under ZeRO-2 whenever contiguous gradients are on, which optimizer offload forces)
        # and advance ZeRO-3's accumulation counter. Shadowing the prologue for this call
        # keeps the backward depth at zero, so no epilogue is queued; ZeRO-3's parameter
        # gather hooks (module hooks) still run.
        self.engine._backward_prologue = _no_prologue
        try:
            grads = super().probe_grad(loss, probe)
        finally:
            del self.engine._backward_prologue
        # Under ZeRO-3 the backward prefetches the parameters of the modules it expects next
        # (those below the probe); this backward never reaches them, so they would stay
        # gathered: memory held, and a later forward would compute with that stale copy.
        self._release_gathered()
        return grads

    def zero_grad(self) -> None:
        self._holds_grads = False
        opt = self.optimizer
        # optimizer.zero_grad resets ZeRO-3's micro_step_id (the next reduction copies
        # instead of adding) and drops ZeRO-2's accumulation buffers; engine.zero_grad
        # would only drop param.grad.
        opt.zero_grad()
        if self.stage == 3:
            # Parameters that get no gradient in the next backward would otherwise keep
            # their old partition: clear the buffers themselves.
            if getattr(opt, "grad_partitions_flat_buffer", None) is not None:
                opt.grad_partitions_flat_buffer.zero_()
            for flat in getattr(opt, "fp32_partitioned_groups_flat", []) if opt.offload_optimizer else []:
                if flat.grad is not None:
                    flat.grad.zero_()
        else:
            for i in list(opt.averaged_gradients):
                opt.averaged_gradients[i] = None
            for grads in (getattr(opt, "offload_gradient_dict", None) or {}).values():
                for g in grads or []:
                    g.zero_()
            if opt.cpu_offload:
                for flat in opt.single_partition_of_fp32_groups:
                    if flat.grad is not None:
                        flat.grad.zero_()

    def optimizer_step(self) -> None:
        # engine.step clips (gradient_clipping), steps AdamW on the fp32 partitions, copies
        # them into the compute partitions (all-gathering under ZeRO-2) and steps the schedule.
        self.engine.step()
        self.zero_grad()

    # --- local shards -------------------------------------------------------------------
    def _z3_valid(self, p) -> int:
        """Elements of `p`'s local partition that hold real data (the last ranks' partitions
        are padded, and a small parameter may leave a rank with padding only)."""
        part = p.partition_numel()
        rank = dist.get_rank(group=p.ds_process_group)
        return max(0, min(part, p.ds_numel - rank * part))

    def _z2_params(self) -> list[torch.nn.Parameter]:
        """ZeRO-2: the trained weights with a fragment in this rank's partition."""
        return [p for p in self.params if getattr(p, "_hp_mapping", None) is not None]

    def _local_weights(self) -> list[torch.Tensor]:
        if self.stage == 3:
            return [p.ds_tensor.narrow(0, 0, self._z3_valid(p)) for p in self.params]
        return [p._hp_mapping.lp_fragment for p in self._z2_params()]

    def _local_masters(self) -> list[torch.Tensor]:
        """The fp32 master of each local weight piece, aligned with `_local_weights`: what
        AdamW steps and the compute pieces are copied from (rounded to bf16 in bf16 runs), in
        CPU memory when the optimizer is offloaded."""
        if self.stage == 3:
            # the partition where it lives (the public get_local_fp32_param copies it to the GPU)
            part = self.optimizer._get_fp32_opt_state_partition
            return [part(p, release_swap_buffers=False)[0].narrow(0, 0, self._z3_valid(p)) for p in self.params]
        return [p._hp_mapping.hp_fragment for p in self._z2_params()]

    def _local_grads(self) -> list[torch.Tensor | None]:
        """The reduced (mean) gradient of each local weight piece, aligned with
        `_local_weights`; None where no gradient is held (after zero_grad)."""
        opt = self.optimizer
        out: list[torch.Tensor | None] = []
        if self.stage == 3:
            for p in self.params:
                g = opt.get_local_fp32_grad_for_param(p)
                out.append(None if g is None else g.narrow(0, 0, self._z3_valid(p)))
            return out
        for p in self._z2_params():
            m = p._hp_mapping
            try:
                g = m.get_lp_grad_fragment(p._index_in_param_group)
            except ValueError:  # no backward since the last step / zero_grad
                out.append(None)
                continue
            if g.numel() == p.numel() and g.numel() != m.lp_fragment.numel():
                # some paths keep the whole parameter's gradient: take this rank's fragment
                g = g.reshape(-1).narrow(0, m.lp_fragment_address.start, m.lp_fragment_address.numel)
            out.append(g.reshape(-1))
        return out

    def _release_gathered(self) -> None:
        """ZeRO-3: free every gathered parameter so the next forward gathers again from the
        partitions. A forward without backward (a no-grad evaluation) or a probe-only
        backward can leave some gathered (prefetched, or waiting for a post-backward hook
        that never fires); editing the partition would then not reach the forward. Persistent
        parameters (below stage3_param_persistence_threshold, hence threshold 0) are never
        released, which the final check catches."""
        if self.stage != 3:
            return
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        self.optimizer.parameter_offload.partition_all_parameters()
        for p in self.params:
            if p.ds_status != ZeroParamStatus.NOT_AVAILABLE:
                raise RuntimeError(
                    "a ZeRO-3 parameter stays gathered, so editing its partition would not reach the "
                    "forward; keep zero_optimization.stage3_param_persistence_threshold at 0"
                )

    def _all_gather_replicas(self) -> None:
        """ZeRO-2: copy every rank's (edited) partition into all replicas."""
        from deepspeed.runtime.utils import all_gather_dp_groups

        opt = self.optimizer
        all_gather_dp_groups(
            groups_flat=opt.bit16_groups_flat,
            partitioned_param_groups=opt.parallel_partitioned_bit16_groups,
            dp_process_group=opt.real_dp_process_group,
            start_alignment_factor=opt.nccl_start_alignment_factor,
            allgather_bucket_size=opt.allgather_bucket_size,
        )

    # --- norms --------------------------------------------------------------------------
    def grad_sq_norm(self) -> torch.Tensor:
        return self.global_sq_sum(g for g in self._local_grads() if g is not None)

    def weight_sq_norm(self) -> torch.Tensor:
        return self.global_sq_sum(self._local_weights())

    # --- perturbation -------------------------------------------------------------------
    def save_weights(self) -> list[torch.Tensor]:
        # the local pieces only: the real elements of each ZeRO-3 partition, the fragments
        # of this rank's ZeRO-2 partition (one shard of extra memory)
        return [w.detach().clone() for w in self._local_weights()]

    @torch.no_grad()
    def add_scaled_grad_to_weights(self, scale: float) -> None:
        self._release_gathered()
        for w, g in zip(self._local_weights(), self._local_grads()):
            if g is not None and w.numel():
                w.add_(g.to(device=w.device, dtype=w.dtype).view_as(w), alpha=scale)
        if self.stage == 2:
            self._all_gather_replicas()

    def weight_sq_distance(self, saved: list[torch.Tensor]) -> torch.Tensor:
        return self.global_sq_sum(w.float() - s.to(w.device).float() for w, s in zip(self._local_weights(), saved))

    @torch.no_grad()
    def restore_weights(self, saved: list[torch.Tensor]) -> None:
        self._release_gathered()
        for w, s in zip(self._local_weights(), saved):
            w.copy_(s)
        if self.stage == 2:
            self._all_gather_replicas()

    # --- the stored safety direction (sap.safety_every): local pieces only ---------------
    def save_direction(self):
        return unit_direction(self._local_grads(), self.grad_sq_norm())

    def add_scaled_direction_to_weights(self, direction, scale: float) -> None:
        self._release_gathered()
        add_direction(self._local_weights(), direction, scale)
        if self.stage == 2:
            self._all_gather_replicas()

    def direction_dot(self, a, b) -> float:
        return float(self.all_reduce_sum_(local_dot(a, b, self.device)))

    # --- Lisa's proximal term: on the fp32 masters AdamW steps ---------------------------
    def save_master_weights(self) -> list[torch.Tensor]:
        # the local master pieces, where they live (one shard of fp32, in CPU memory when the
        # optimizer is offloaded); bf16 copies would make rho*(W - anchor) move in bf16 steps
        return [w.detach().clone() for w in self._local_masters()]

    def master_sq_distance(self, saved: list[torch.Tensor]) -> torch.Tensor:
        return self.global_sq_sum((w.float() - s.to(w.device).float()).to(self.device)
                                  for w, s in zip(self._local_masters(), saved))

    @torch.no_grad()
    def add_proximal_grad(self, saved: list[torch.Tensor], rho: float) -> None:
        # saved holds the local master pieces (`save_master_weights`), aligned with `_local_grads`
        masters = self._local_masters()
        opt = self.optimizer
        if self.stage == 3:
            # through set_local_grad_for_param: with the optimizer offloaded, ZeRO-3 clips with
            # per-parameter norms recorded at reduction time, which this call updates
            for p, w, s in zip(self.params, masters, saved):
                g = opt.get_local_fp32_grad_for_param(p)
                g = torch.zeros(p.ds_tensor.numel(), device=self.device) if g is None else g.clone()
                valid = w.numel()
                g[:valid] += (w.float() - s.to(w.device).float()).to(g.device) * rho
                opt.set_local_grad_for_param(g, p)
            return
        for p, w, s, g in zip(self._z2_params(), masters, saved, self._local_grads()):
            if g is None:
                raise RuntimeError("ZeRO-2 holds no gradient to add the proximal term to; call backward first")
            g.add_(((w.float() - s.to(w.device).float()) * rho).to(device=g.device, dtype=g.dtype).view_as(g))
            if opt.cpu_offload:
                # with the optimizer offloaded, ZeRO-2 clips with per-parameter norms recorded
                # when the gradient was reduced (before this term): record the new one, as it does
                self._record_offload_norm(p, g)

    def _record_offload_norm(self, p, g: torch.Tensor) -> None:
        """Offloaded ZeRO-2: the per-parameter gradient norm its clipping reads, set to `g`'s."""
        from deepspeed.runtime.zero.utils import get_norm_dtype

        self.optimizer.norm_for_param_grads[self.optimizer.get_param_id(p)] = g.to(get_norm_dtype()).norm(2)

    def local_shapes(self) -> list[torch.Size]:
        return [w.shape for w in self._local_weights()]

    # --- output -------------------------------------------------------------------------
    def unwrapped_model(self) -> torch.nn.Module:
        return self.engine.module

    def save_model(self, output_dir: str, tokenizer=None) -> None:
        from deepspeed.utils import safe_get_full_fp32_param
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        trained = {id(p) for p in self.params}

        def gather(p):
            if id(p) in trained:
                # the fp32 master, the training's truth (bf16 runs keep only a rounded copy
                # in the compute weights), back in the parameter's original dtype
                return safe_get_full_fp32_param(p).to(self._orig_dtype[id(p)])
            if self.stage == 3:
                with GatheredParameters([p]):
                    return p.data.clone() if self.rank == 0 else None
            return p.data

        save_gathered(self.engine.module, output_dir, tokenizer, gather)

    # --- checkpoints: DeepSpeed's own format (per-rank ZeRO partitions) --------------------
    checkpoint_format = "deepspeed"
    _CHECKPOINT_TAG = "zero"

    def save_checkpoint(self, path: str) -> None:
        from sap_dist.backends.checkpointing import fsync_tree

        # every rank writes its partition of the fp32 master weights and AdamW state; the
        # LR scheduler and the engine's step counters go with them. Frozen (base) weights
        # are rebuilt from the config on resume, so they are left out.
        self.engine.save_checkpoint(path, tag=self._CHECKPOINT_TAG, save_latest=False, exclude_frozen_parameters=True)
        fsync_tree(os.path.join(path, self._CHECKPOINT_TAG))

    def load_checkpoint(self, path: str) -> None:
        # load_module_strict=False: the frozen weights are not in the checkpoint on purpose;
        # the trained ones come back from the fp32 partitions of the optimizer state.
        loaded, _ = self.engine.load_checkpoint(path, tag=self._CHECKPOINT_TAG, load_module_strict=False,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint (tag {self._CHECKPOINT_TAG!r}) under {path}")
        self._holds_grads = False
