"""`sap-dist plan`: per-GPU memory of a SAP run from the model's config alone (no weights).

    sap-dist plan --model meta-llama/Llama-3.1-70B-Instruct --gpus 16 --gpu-memory 80
    sap-dist plan --model path/to/config.json --gpus 8 --gpu-memory 40 --method full --backend fsdp2
    sap-dist plan --config configs/sap_70b.yaml --gpus 16 --gpu-memory 80 --json

`--model` takes a local `config.json` (or a directory holding one), a known architecture
shipped with sap-dist (`sap_dist/archs/*.json`: the Llama 2 7B/13B/70B and Llama 3 8B/70B
configs under their short names and hub ids, SmolLM2-135M, the tiny test model; no hub
needed), or any other hub id (read with `transformers.AutoConfig`, so it needs the hub).

What is counted, per GPU, for N GPUs that all take a data-parallel share (ZeRO-3 and FSDP2
both shard every parameter, gradient and optimizer state over all N):

| part | bytes per GPU |
|---|---|
| weights | base: P x w / N (QLoRA: the 4-bit base is *not* sharded, as bitsandbytes weights are not partitioned by sap-dist's backends: NF4 with double quantization, 0.5159 bytes per quantized weight, embeddings/head/norms in fp32, on every GPU); trained LoRA adapters: T x 4 / N (kept in fp32); FSDP2 full fine-tuning keeps the trained weights as fp32 masters, T x 4 / N in place of T x w / N; 0 under ZeRO-3 parameter offload |
| gradients | T x t / N (t: trained dtype bytes: 4 for LoRA adapters and for FSDP2's fp32 masters, w under ZeRO-3; 0 under ZeRO-3 optimizer offload) |
| optimizer state | ZeRO-3: T x 12 / N (fp32 master + Adam m, v); FSDP2: T x 8 / N (Adam m, v in fp32: the trained weights are fp32 masters, bf16 only in compute); 0 when offloaded |
| optimizer step (transient) | ZeRO-3 only: the fp32 gradient of one sub-group, 4 x min(1e9, T / N) |
| SAP extra copy + probe | the saved copy of the local shard of the trained weights, T x t / N (in CPU memory under parameter offload), the stored safety direction when `sap.safety_every` > 1 (the default 4), T x 4 / N (in CPU memory under optimizer offload), plus the probe: 5 fp32 vectors of the hidden size per probed layer |
| Lisa/Booster weight copy | a method whose `plan_memory` is `master_copy` (Lisa's proximal centre, Booster's restore point): one fp32 copy of the local shard of the trained weights, T x 4 / N (in CPU memory under optimizer offload) |
| gathered weights (transient) | the largest unit (decoder layer, embedding or head) gathered in full, twice (the one computing and the one prefetched): 2 x U x w (QLoRA: two dequantized linear weights); full fine-tuning adds that unit's unsharded gradient, U x t |
| activations | the larger of SAP's task pass (b sequences of s tokens per GPU) and its safety pass (2 x b_safety sequences, safe and harmful, of s_safety tokens); per sequence of s tokens: per layer s x (4h + 2 a d + 2 kv d + 4 I) x w (norm inputs, q/k/v, attention output, gate/up/activation/product), LoRA adds s x in x 4 per adapted module per layer (its fp32 input), and the loss s x V x (w + 8) (logits, their fp32 copy and log-softmax). With activation checkpointing a layer keeps only its input, s x h x w, and one layer is recomputed at a time |
| reserve | 2 GiB for the CUDA context, NCCL buffers and allocator fragmentation (`--reserve-gib`) |

P: all parameters, T: trained parameters (P for full fine-tuning, the LoRA adapters
otherwise), w: bytes per element of the compute dtype (bf16: 2), h hidden size, I
intermediate size, a/kv attention/key-value heads, d head dimension, V vocabulary.
Peak = static parts + max(gathered + activations, optimizer step transient) + reserve.
These are estimates for planning (typically within ~15% of a measured peak), and torch sees
less than a card's nominal size (about 79.2 of an "80 GB" card): a setting fits only when its
estimate stays below the GPU memory less a headroom of 10% (`--headroom`), which the output states.

The recommendation takes the fastest configuration that fits: no offload and no activation
checkpointing at the largest per-GPU batch (up to `--max-batch-per-gpu`), then activation
checkpointing (only if this sap-dist has a config key for it: it has none today, because
SAP's probe passes take `torch.autograd.grad` through the model, see `sap_dist/models.py`),
then ZeRO-3 optimizer offload (full fine-tuning only: LoRA's optimizer state is tiny), then
optimizer and parameter offload (FSDP2 in sap-dist has no offload). With the batch fixed (a
run config, `--batch-size`), LoRA tries a smaller batch per GPU before any offload, and says so. Batch sizes in sap-dist are global: `train.batch_size` = per-GPU batch x N.
The recommended overrides go through the trainer's own checks at N ranks (`sap_dist/run_control/preflight.py`;
a batch that does not divide by N is refused, sap_dist/batching.py), and the plan states the probe
rows and safety pairs the trainer rounds them to.
Exit status: 0 when a configuration fits, 1 when none does (the smallest GPU count that would
fit is printed), 2 for bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from sap_dist.batching import EffectiveBatches, check_task_batch
from sap_dist import PACKAGE_DIR

GiB = 1024**3
ARCH_DIR = os.path.join(PACKAGE_DIR, "archs")
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""Bytes per weight of bitsandbytes NF4 with double quantization: 4 bits, an 8-bit absmax per
block of 64 and an fp32 second-level constant per 256 blocks."""
HEADROOM = 0.10
"""Fraction of the GPU memory a fitting estimate must leave free (the estimate's accuracy)."""
ZERO3_SUB_GROUP = 1_000_000_000
"""DeepSpeed ZeRO-3 `sub_group_size` default: the optimizer steps this many elements at a time."""
PROBE_COPIES = 5
"""fp32 probe-sized vectors alive per probed layer: the vector, its gradient, u_harm, u_here, v_safe."""
BATCHES = (16, 8, 4, 2, 1)
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
CHECKPOINTING_KEYS = ("train.gradient_checkpointing", "train.activation_checkpointing", "model.gradient_checkpointing")
"""Config keys that would switch activation checkpointing on, if this sap-dist has one."""
DEFAULT_SAFETY_BATCH = 8


class PlanError(ValueError):
    """Input the planner cannot use (unknown model, bad config file); the message says why."""


# ------------------------------------------------------------------------------------------
# The architecture


@dataclass
class Arch:
    """The shape of a decoder-only transformer (Llama-style: RMSNorm, gated MLP, GQA)."""

    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    source: str = ""

    @classmethod
    def from_config(cls, cfg: dict, name: str, source: str = "") -> "Arch":
        cfg = cfg.get("text_config") or cfg
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            return cls(
                name=name,
                vocab=int(cfg["vocab_size"]),
                hidden=hidden,
                intermediate=int(cfg["intermediate_size"]),
                layers=int(cfg["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                tied=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                source=source,
            )
        except KeyError as exc:
            raise PlanError(f"{source or name}: the model config has no {exc.args[0]!r} (a decoder-only transformer config is needed)") from None

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear module in one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        lin = self.linears()
        weights = sum(a * b for a, b in lin.values())
        bias = 0
        if self.attention_bias:
            bias += sum(lin[m][1] for m in ("q_proj", "k_proj", "v_proj", "o_proj"))
        if self.mlp_bias:
            bias += sum(lin[m][1] for m in ("gate_proj", "up_proj", "down_proj"))
        return weights + bias + 2 * self.hidden  # + input and post-attention RMSNorm

    def embed_params(self) -> int:
        return self.vocab * self.hidden

    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    def total_params(self) -> int:
        return self.embed_params() + self.head_params() + self.layers * self.layer_params() + self.hidden

    def quantized_params(self) -> int:
        """Weights bitsandbytes stores in 4 bits under QLoRA: the decoder layers' linears."""
        return self.layers * sum(a * b for a, b in self.linears().values())

    def lora_params(self, r: int, targets: list[str]) -> int:
        lin = self.linears()
        unknown = [t for t in targets if t not in lin]
        if unknown:
            raise PlanError(f"LoRA target modules {unknown} are not linear layers of this model ({', '.join(lin)})")
        return self.layers * sum(r * (lin[t][0] + lin[t][1]) for t in targets)

    def describe(self) -> str:
        return (f"{self.layers} layers, hidden {self.hidden}, intermediate {self.intermediate}, "
                f"{self.heads} heads ({self.kv_heads} kv, dim {self.head_dim}), vocab {self.vocab}, "
                f"{'tied' if self.tied else 'untied'} embeddings")


def known_archs() -> dict[str, str]:
    """Every known name (lower case: short name and hub ids) -> its shipped JSON file."""
    names: dict[str, str] = {}
    for file in sorted(os.listdir(ARCH_DIR)):
        if not file.endswith(".json"):
            continue
        path = os.path.join(ARCH_DIR, file)
        with open(path) as fh:
            cfg = json.load(fh)
        for name in [file[:-5], *cfg.get("_aliases", [])]:
            names[name.lower()] = path
            names[name.lower().rsplit("/", 1)[-1]] = path
    return names


def load_arch(model: str) -> Arch:
    """The architecture of `model`: a local config.json or directory, a known name, or a hub id."""
    if os.path.isdir(model):
        path = os.path.join(model, "config.json")
        if not os.path.exists(path):
            raise PlanError(f"{model}: a directory without config.json")
        return _arch_from_file(path, model)
    if os.path.isfile(model):
        return _arch_from_file(model, model)
    known = known_archs()
    if model.lower() in known:
        path = known[model.lower()]
        return _arch_from_file(path, model, f"shipped config {os.path.basename(path)}")
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model).to_dict()
    except Exception as exc:  # noqa: BLE001 - any hub failure is the same answer for the user
        short = sorted({os.path.basename(p)[:-5] for p in known.values()})
        raise PlanError(
            f"model {model!r} is neither a local config.json / directory nor a known architecture "
            f"({', '.join(short)}), and the hub lookup failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    return Arch.from_config(cfg, model, "hub config (AutoConfig)")


def _arch_from_file(path: str, name: str, source: str | None = None) -> Arch:
    try:
        with open(path) as fh:
            cfg = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError(f"{path}: cannot read the model config: {exc}") from None
    if not isinstance(cfg, dict):
        raise PlanError(f"{path}: expected a JSON object")
    return Arch.from_config(cfg, name, source or path)


# ------------------------------------------------------------------------------------------
# The run and its memory


@dataclass
class Setup:
    """One candidate configuration of a run."""

    method: str = "lora"
    backend: str = "zero3"
    gpus: int = 8
    dtype: str = "bf16"
    lora_r: int = 8
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    seq_len: int = 256
    safety_seq_len: int = 256
    batch_per_gpu: int = 1
    safety_per_gpu: int = 1
    probe_layers: int = 2
    sap: bool = True
    run_method: str = "sap"
    """The run's `method` key (a config's, or `sft` for --sft), kept in the printed overrides."""
    safety_every: int = 4
    """sap.safety_every: above 1, SAP keeps g/|g| between safety passes (T x 4 / N more)."""
    weight_copy: bool = False
    """The method keeps one fp32 copy of each rank's shard of the trained weights (Lisa's
    proximal centre, Booster's restore point: its `plan_memory` is `master_copy`)."""
    activation_checkpointing: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False


def trained_params(arch: Arch, s: Setup) -> int:
    return arch.total_params() if s.method == "full" else arch.lora_params(s.lora_r, s.target_modules)


def _activations_per_sequence(arch: Arch, s: Setup, tokens: int) -> int:
    w = DTYPE_BYTES[s.dtype]
    h, d = arch.hidden, arch.head_dim
    full_layer = tokens * (4 * h + 2 * arch.heads * d + 2 * arch.kv_heads * d + 4 * arch.intermediate) * w
    if s.method in ("lora", "qlora"):
        lin = arch.linears()
        full_layer += sum(tokens * lin[t][0] * 4 for t in s.target_modules)
    loss = tokens * arch.vocab * (w + 8)
    if s.activation_checkpointing:
        return arch.layers * tokens * h * w + full_layer + loss
    return arch.layers * full_layer + loss


def memory(arch: Arch, s: Setup, reserve_gib: float = 2.0) -> dict[str, float]:
    """Bytes per GPU of each part (see the module docstring for every formula), and `total`."""
    n = s.gpus
    w = DTYPE_BYTES[s.dtype]
    full = s.method == "full"
    P, T = arch.total_params(), trained_params(arch, s)
    zero3 = s.backend == "zero3"
    # LoRA adapters are kept in fp32, and so are FSDP2's full fine-tuning weights (fp32 masters,
    # bf16 only in compute); ZeRO-3 keeps bf16 weights and its fp32 master in the optimizer
    t = w if (full and zero3) else 4
    off_opt = zero3 and s.offload_optimizer
    off_par = zero3 and s.offload_params and s.method != "qlora"  # 4-bit weights are not offloaded

    out: dict[str, float] = {}
    if s.method == "qlora":
        unquantized = P - arch.quantized_params()
        base = arch.quantized_params() * NF4_BYTES + unquantized * 4
    else:
        base = P * w / n if not (full and not zero3) else ((P - T) * w + T * 4) / n
    # under ZeRO-3 parameter offload every parameter partition (base and adapters) is on the CPU
    out["weights"] = 0.0 if off_par else base + (0 if full else T * t / n)
    out["gradients"] = 0.0 if off_opt else T * t / n
    out["optimizer"] = 0.0 if off_opt else T * (12 if zero3 else 2 * t) / n
    probe = PROBE_COPIES * s.probe_layers * arch.hidden * 4 if s.sap else 0
    # with safety_every > 1 the stored direction g/|g|: fp32, beside the gradient it came from
    # (in CPU memory with the gradients under optimizer offload)
    direction = T * 4 / n if s.sap and s.safety_every > 1 else 0.0
    out["sap_copy"] = (0.0 if off_par else T * t / n) + (0.0 if off_opt else direction) + probe if s.sap else 0.0
    # next to the optimizer's fp32 masters it copies (on the CPU when those are offloaded)
    copy = T * 4 / n if s.weight_copy else 0.0
    out["method_copy"] = 0.0 if off_opt else copy
    if s.method == "qlora":
        largest = max(a * b for a, b in arch.linears().values())
        out["gathered"] = 2 * largest * w
    else:
        unit = max(arch.layer_params(), arch.embed_params(), arch.head_params())
        out["gathered"] = 2 * unit * w + (unit * t if full else 0)
    task = s.batch_per_gpu * _activations_per_sequence(arch, s, s.seq_len)
    safety = 2 * s.safety_per_gpu * _activations_per_sequence(arch, s, s.safety_seq_len) if s.sap else 0
    out["activations"] = max(task, safety)
    out["step_transient"] = 4 * min(ZERO3_SUB_GROUP, T / n) if zero3 and not off_opt else 0.0
    out["reserve"] = reserve_gib * GiB
    # CPU memory this GPU's offloaded partitions take (not part of `total`): the optimizer's fp32
    # master, Adam m and v and the fp32 gradient (16 bytes per trained parameter), and SAP's
    # stored safety direction with safety_every > 1 (4 more); the parameters (and SAP's copy of
    # the trained ones) under parameter offload
    out["host"] = ((T * 16 / n + direction + copy if off_opt else 0.0)
                   + (base + (0 if full else T * t / n) + (T * t / n if s.sap else 0) if off_par else 0.0))
    static = out["weights"] + out["gradients"] + out["optimizer"] + out["sap_copy"] + out["method_copy"]
    out["total"] = static + max(out["gathered"] + out["activations"], out["step_transient"]) + out["reserve"]
    return out


@functools.lru_cache(maxsize=1)
def checkpointing_key() -> Optional[str]:
    """The config key that turns activation checkpointing on, or None if sap-dist has none."""
    from sap_dist.config import all_keys

    keys = set(all_keys())
    return next((k for k in CHECKPOINTING_KEYS if k in keys), None)


def levels(backend: str, method: str) -> list[dict]:
    """Memory-saving settings in the order they cost speed."""
    out = [{}]
    if checkpointing_key():
        out.append({"activation_checkpointing": True})
    if backend == "zero3":
        ck = {"activation_checkpointing": True} if checkpointing_key() else {}
        if method == "full":  # LoRA's optimizer state is a few MB: offloading it saves nothing
            out.append(ck | {"offload_optimizer": True})
        if method != "qlora":
            out.append(ck | {"offload_optimizer": True, "offload_params": True})
    return out


@dataclass
class Plan:
    arch: Arch
    base: Setup
    gpu_memory_gib: float
    reserve_gib: float
    chosen: Optional[Setup]
    chosen_memory: Optional[dict]
    alternatives: list[tuple[Setup, dict]]
    min_gpus: Optional[int]
    headroom: float = HEADROOM
    gpus_per_node: int = 8
    host_memory_gib: Optional[float] = None
    batch_size: Optional[int] = None
    """The global batch the plan was asked to keep (None: searched)."""
    batches: Optional[EffectiveBatches] = None
    """The batches the trainer runs the recommended setting with (probe rows and safety pairs
    rounded to the GPU count, sap_dist/batching.py); None when nothing fits."""

    @property
    def usable_gib(self) -> float:
        """The memory an estimate must stay below: the GPU's less the headroom."""
        return self.gpu_memory_gib * (1 - self.headroom)

    @property
    def fits(self) -> bool:
        return self.chosen is not None


def _safety_per_gpu(gpus: int, batch_per_gpu: int, global_safety: Optional[int]) -> int:
    if global_safety is not None:
        return max(1, math.ceil(global_safety / gpus))
    return max(1, min(batch_per_gpu, math.ceil(DEFAULT_SAFETY_BATCH / gpus)))


def host_per_node(m: dict, gpus: int, gpus_per_node: int) -> float:
    """Bytes of CPU memory the offloaded partitions take on one node."""
    return m["host"] * min(gpus, gpus_per_node)


def search(arch: Arch, base: Setup, gpu_memory_gib: float, reserve_gib: float = 2.0, max_batch_per_gpu: int = 8,
           batch_size: Optional[int] = None, safety_batch_size: Optional[int] = None,
           headroom: float = HEADROOM, gpus_per_node: int = 8,
           host_memory_gib: Optional[float] = None) -> tuple[Optional[Setup], Optional[dict]]:
    """The fastest setting that fits (see the module docstring), or (None, None). With
    `host_memory_gib` (per node), offload settings needing more CPU memory are refused."""
    limit = gpu_memory_gib * GiB * (1 - headroom)
    if batch_size is not None:
        batches = [max(1, math.ceil(batch_size / base.gpus))]
        if base.method != "full":
            # LoRA: a smaller batch per GPU (train.batch_size lowered) before any offload,
            # which would slow every step to save almost nothing
            batches = list(range(batches[0], 0, -1))
    else:
        batches = [b for b in BATCHES if b <= max_batch_per_gpu] or [1]
    for level in levels(base.backend, base.method):
        for b in batches:
            s = dataclasses.replace(base, batch_per_gpu=b, safety_per_gpu=_safety_per_gpu(base.gpus, b, safety_batch_size), **level)
            m = memory(arch, s, reserve_gib)
            if host_memory_gib is not None and host_per_node(m, s.gpus, gpus_per_node) > host_memory_gib * GiB:
                continue
            if m["total"] <= limit:
                return s, m
    return None, None


def make_plan(arch: Arch, base: Setup, gpu_memory_gib: float, reserve_gib: float = 2.0, max_batch_per_gpu: int = 8,
              batch_size: Optional[int] = None, safety_batch_size: Optional[int] = None, headroom: float = HEADROOM,
              gpus_per_node: int = 8, host_memory_gib: Optional[float] = None) -> Plan:
    chosen, mem = search(arch, base, gpu_memory_gib, reserve_gib, max_batch_per_gpu, batch_size, safety_batch_size, headroom,
                         gpus_per_node, host_memory_gib)
    alternatives = []
    b = chosen.batch_per_gpu if chosen else (max(1, math.ceil(batch_size / base.gpus)) if batch_size else 1)
    for level in [{}, {"activation_checkpointing": True}, {"offload_optimizer": True},
                  {"activation_checkpointing": True, "offload_optimizer": True, "offload_params": True}]:
        if base.backend != "zero3" and "offload_optimizer" in level:
            continue
        if base.method == "qlora" and "offload_params" in level:
            level = {k: v for k, v in level.items() if k != "offload_params"}
        s = dataclasses.replace(base, batch_per_gpu=b, safety_per_gpu=_safety_per_gpu(base.gpus, b, safety_batch_size), **level)
        alternatives.append((s, memory(arch, s, reserve_gib)))
    min_gpus = None
    if chosen is None:
        for n in range(base.gpus + 1, 4097):
            if search(arch, dataclasses.replace(base, gpus=n), gpu_memory_gib, reserve_gib, 1, None, safety_batch_size, headroom,
                      gpus_per_node, host_memory_gib)[0]:
                min_gpus = n
                break
    return Plan(arch, base, gpu_memory_gib, reserve_gib, chosen, mem, alternatives, min_gpus, headroom,
                gpus_per_node, host_memory_gib, batch_size)


def overrides(s: Setup) -> list[str]:
    """sap-dist config overrides that realise setup `s`."""
    out = [f"weights.method={s.method}", f"dist.backend={s.backend}", f"model.dtype={s.dtype}",
           f"train.batch_size={s.batch_per_gpu * s.gpus}"]
    if s.sap:
        out.append(f"sap.safety_batch_size={s.safety_per_gpu * s.gpus}")
    if s.backend == "zero3":
        out += [f"dist.offload_optimizer={str(s.offload_optimizer).lower()}",
                f"dist.offload_params={str(s.offload_params).lower()}"]
    key = checkpointing_key()
    if key:
        out.append(f"{key}={str(s.activation_checkpointing).lower()}")
    if s.run_method != "sap":
        out.append(f"method={s.run_method}")
    return out


def trainer_batches(config: Optional[str], s: Setup) -> EffectiveBatches:
    """What the trainer makes of setup `s` on top of the run config `config` (None: the
    defaults) at `s.gpus` ranks: the trainer's own checks (sap_dist/run_control/preflight.py), bar the
    one that the backend's packages are installed here. PlanError with the trainer's refusal."""
    from sap_dist.run_control import preflight
    from sap_dist.config import ConfigError, load_config

    try:
        return preflight.check(load_config(config, overrides(s)), s.gpus, env={}, installed=False).batches
    except ConfigError as exc:
        raise PlanError(f"the trainer would refuse the recommended overrides: {exc}") from None


# ------------------------------------------------------------------------------------------
# Output


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def _gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def _variant_name(s: Setup) -> str:
    parts = []
    if s.activation_checkpointing:
        parts.append("activation checkpointing")
    if s.offload_optimizer:
        parts.append("optimizer offload")
    if s.offload_params:
        parts.append("parameter offload")
    return " + ".join(parts) or "no offload, no checkpointing"


ROWS = [("weights", "weights"), ("gradients", "gradients"), ("optimizer", "optimizer state"),
        ("sap_copy", "SAP extra copy + probe"), ("method_copy", "Lisa/Booster weight copy"),
        ("gathered", "gathered weights (transient)"),
        ("activations", "activations"), ("step_transient", "optimizer step (transient)"),
        ("reserve", "reserve (CUDA, NCCL, fragmentation)"), ("total", "peak per GPU")]


def render(plan: Plan) -> str:
    a, b = plan.arch, plan.base
    P, T = a.total_params(), trained_params(a, b)
    trained = ("all weights" if b.method == "full"
               else f"LoRA r={b.lora_r} on {','.join(b.target_modules)}" + (" over a 4-bit NF4 base" if b.method == "qlora" else ""))
    lines = [
        f"model: {a.name} ({a.source}): {_count(P)} parameters",
        f"  {a.describe()}",
        f"run: {b.method} ({trained}: {_count(T)} trained), backend {b.backend}, {b.gpus} GPUs x "
        f"{plan.gpu_memory_gib:g} GiB, {b.dtype}, {'SAP' if b.sap else 'SFT'}; task {b.seq_len} tokens, safety pairs {b.safety_seq_len} tokens",
    ]
    if b.method == "qlora":
        lines.append("  QLoRA: the 4-bit base is on every GPU (not sharded); only the adapters and their state are")
    lines.append("")
    shown = plan.chosen or plan.alternatives[0][0]
    mem = plan.chosen_memory or plan.alternatives[0][1]
    header = "recommended" if plan.chosen else "batch 1, no offload"
    lines.append(f"per-GPU memory, GiB          {header:>12}")
    for key, label in ROWS:
        extra = ""
        if key == "activations":
            extra = f"  ({shown.batch_per_gpu} x {shown.seq_len} task, {2 * shown.safety_per_gpu} x {shown.safety_seq_len} safety)" if b.sap else f"  ({shown.batch_per_gpu} x {shown.seq_len})"
        lines.append(f"  {label:<36}{_gib(mem[key])}{extra}")
    lines.append(f"  {'of':<36}{plan.gpu_memory_gib:8.2f}")
    lines.append(f"  {'usable (less {:.0%} headroom)'.format(plan.headroom):<36}{plan.usable_gib:8.2f}")
    lines.append("")
    lines.append(f"at {shown.batch_per_gpu} sequence(s) per GPU:")
    for s, m in plan.alternatives:
        note = ""
        if s.activation_checkpointing and not checkpointing_key():
            note = "  (no activation checkpointing in sap-dist yet)"
        verdict = "fits" if m["total"] <= plan.usable_gib * GiB else "does not fit"
        host = host_per_node(m, s.gpus, plan.gpus_per_node)
        if host:
            note += f"  (host memory per node: {host / GiB:.0f} GiB"
            if plan.host_memory_gib is not None and host > plan.host_memory_gib * GiB:
                note += f", more than --host-memory {plan.host_memory_gib:g}: refused"
            note += ")"
        lines.append(f"  {_variant_name(s):<66}{_gib(m['total'])} GiB  {verdict}{note}")
    lines.append("")
    if plan.fits:
        c = plan.chosen
        lines.append(f"FITS: {_variant_name(c)}, {c.batch_per_gpu} sequence(s) per GPU "
                     f"({plan.chosen_memory['total'] / GiB:.1f} of {plan.gpu_memory_gib:g} GiB; fits are judged against "
                     f"{plan.usable_gib:.1f} GiB, {plan.headroom:.0%} headroom for the estimate's accuracy)")
        if plan.batch_size and c.batch_per_gpu * c.gpus < plan.batch_size:
            lines.append(f"the batch does not fit as given: train.batch_size {plan.batch_size} -> {c.batch_per_gpu * c.gpus} "
                         "(smaller batch per GPU rather than offload)")
        host = host_per_node(plan.chosen_memory, c.gpus, plan.gpus_per_node)
        if host:
            lines.append(f"host memory per node for the offloaded state: {host / GiB:.0f} GiB "
                         f"({min(c.gpus, plan.gpus_per_node)} GPUs per node; --host-memory refuses more)")
        lines.append("recommended overrides: " + " ".join(overrides(c)))
        if plan.batches:
            lines.append(f"the trainer runs them {plan.batches.describe()}")
            lines += [f"  rounded: {note}" for note in plan.batches.rounded()]
    else:
        lines.append(f"DOES NOT FIT on {b.gpus} x {plan.gpu_memory_gib:g} GiB"
                     + (f"; the smallest GPU count that fits is {plan.min_gpus}" if plan.min_gpus else
                        "; no GPU count up to 4096 fits (QLoRA does not shard its base)" if b.method == "qlora" else "; nothing up to 4096 GPUs fits"))
    return "\n".join(lines)


def to_json(plan: Plan) -> dict:
    a, b = plan.arch, plan.base
    return {
        "model": a.name,
        "source": a.source,
        "architecture": dataclasses.asdict(a),
        "parameters": a.total_params(),
        "trained_parameters": trained_params(a, b),
        "gpus": b.gpus,
        "gpu_memory_gib": plan.gpu_memory_gib,
        "headroom": plan.headroom,
        "usable_gib": plan.usable_gib,
        "gpus_per_node": plan.gpus_per_node,
        "host_memory_gib": plan.host_memory_gib,
        "host_per_node_gib": (host_per_node(plan.chosen_memory, plan.chosen.gpus, plan.gpus_per_node) / GiB
                              if plan.chosen_memory else None),
        "fits": plan.fits,
        "recommended": dataclasses.asdict(plan.chosen) if plan.chosen else None,
        "memory_bytes": plan.chosen_memory,
        "memory_gib": {k: v / GiB for k, v in plan.chosen_memory.items()} if plan.chosen_memory else None,
        "overrides": overrides(plan.chosen) if plan.chosen else None,
        "batches": plan.batches.record() if plan.batches else None,
        "batches_rounded": plan.batches.rounded() if plan.batches else None,
        "alternatives": [{"setup": dataclasses.asdict(s), "memory_bytes": m} for s, m in plan.alternatives],
        "min_gpus": plan.min_gpus,
        "activation_checkpointing_key": checkpointing_key(),
    }


# ------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    from sap_dist.help_format import DefaultsHelpFormatter

    p = argparse.ArgumentParser(prog="sap-dist plan", description=__doc__.split("\n\n")[0] if __doc__ else None,
                                formatter_class=DefaultsHelpFormatter,
                                epilog="Every formula is in the docstring of sap_dist/tools/plan.py.")
    p.add_argument("--model", help="config.json, a directory holding one, a known architecture (e.g. llama-3-70b, "
                   "meta-llama/Llama-2-7b-chat-hf) or a hub id; default: the --config's model.name_or_path")
    p.add_argument("--config", help="a sap-dist run config (YAML or preset): model, method, LoRA, sequence lengths, "
                   "batch sizes and backend are taken from it unless given here")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the run (all nodes)")
    p.add_argument("--gpu-memory", type=float, required=True, help="memory per GPU in GiB (80 for A100/H100 80GB)")
    p.add_argument("--method", choices=["lora", "full", "qlora"])
    p.add_argument("--backend", choices=["zero3", "fsdp2"])
    p.add_argument("--dtype", choices=["bf16", "fp32"])
    p.add_argument("--lora-r", type=int)
    p.add_argument("--target-modules", help="comma-separated LoRA target modules")
    p.add_argument("--seq-len", type=int, help="task tokens per example (data.max_length)")
    p.add_argument("--safety-seq-len", type=int, help="tokens per safety sequence (data.safety_max_length)")
    p.add_argument("--batch-size", type=int, help="global task batch (train.batch_size); default: search")
    p.add_argument("--safety-batch-size", type=int, help="global safety pairs per step (sap.safety_batch_size)")
    p.add_argument("--max-batch-per-gpu", type=int, default=8, help="largest per-GPU batch the search tries (default 8)")
    p.add_argument("--sft", action="store_true", help="plain fine-tuning (no SAP copy, no safety pass)")
    p.add_argument("--reserve-gib", type=float, default=2.0, help="per-GPU memory kept free (default 2)")
    p.add_argument("--headroom", type=float, default=HEADROOM,
                   help="fraction of the GPU memory a fitting estimate leaves free (default 0.10: the estimate's accuracy)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, for the host memory per node (default 8)")
    p.add_argument("--host-memory", type=float, help="CPU memory per node in GiB: offload settings needing more are refused")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = plan_from_args(args)
    except PlanError as exc:
        print(f"sap-dist plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(to_json(plan), indent=2) if args.json else render(plan))
    return 0 if plan.fits else 1


def plan_from_args(args: argparse.Namespace) -> Plan:
    base = Setup()
    model = None
    batch_size = args.batch_size
    safety_batch_size = args.safety_batch_size
    if args.config:
        from sap_dist import methods as registry
        from sap_dist.config import ConfigError, load_config

        try:
            cfg = load_config(args.config)
        except ConfigError as exc:
            raise PlanError(str(exc)) from None
        model = cfg.model.name_or_path
        base = dataclasses.replace(
            base, method=cfg.weights.method, dtype=cfg.model.dtype, lora_r=cfg.weights.lora_r,
            target_modules=list(cfg.weights.target_modules), seq_len=cfg.data.max_length,
            safety_seq_len=cfg.data.safety_max_length,
            sap=registry.select(cfg.method).method.plan_memory == "probe", run_method=cfg.method,
            weight_copy=registry.select(cfg.method).method.plan_memory == "master_copy",
            probe_layers=len(cfg.sap.probe_layers) if cfg.sap.probe_layers else 2,
            safety_every=cfg.sap.safety_every,
            backend=cfg.dist.backend if cfg.dist.backend in ("zero3", "fsdp2") else base.backend,
        )
        # a run config's batch sizes are what it will run with: check those, do not search
        batch_size = cfg.train.batch_size if batch_size is None else batch_size
        safety_batch_size = cfg.sap.safety_batch_size if safety_batch_size is None else safety_batch_size
    model = args.model or model
    if not model:
        raise PlanError("give --model (or --config with model.name_or_path)")
    if args.gpus < 1 or args.gpu_memory <= 0:
        raise PlanError("--gpus must be at least 1 and --gpu-memory positive")
    changes: dict[str, Any] = {"gpus": args.gpus}
    for key in ("method", "backend", "dtype", "lora_r", "seq_len", "safety_seq_len"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    if args.target_modules:
        changes["target_modules"] = [m.strip() for m in args.target_modules.split(",") if m.strip()]
    if args.sft:
        changes["sap"] = False
        changes["run_method"] = "sft"
    base = dataclasses.replace(base, **changes)
    if batch_size is not None:
        try:
            check_task_batch(batch_size, base.gpus)  # the trainer's rule (sap_dist/batching.py)
        except ValueError as exc:
            raise PlanError(f"{exc} (--gpus {base.gpus})") from None
    if safety_batch_size is not None and safety_batch_size < 1:
        raise PlanError(f"sap.safety_batch_size (--safety-batch-size)={safety_batch_size} must be at least 1")
    arch = load_arch(model)
    trained_params(arch, base)  # validates the LoRA targets
    if not 0 <= args.headroom < 1:
        raise PlanError(f"--headroom {args.headroom} must be a fraction in [0, 1)")
    if args.gpus_per_node < 1 or (args.host_memory is not None and args.host_memory <= 0):
        raise PlanError("--gpus-per-node must be at least 1 and --host-memory positive")
    made = make_plan(arch, base, args.gpu_memory, args.reserve_gib, args.max_batch_per_gpu, batch_size, safety_batch_size,
                     args.headroom, args.gpus_per_node, args.host_memory)
    if made.chosen:  # only settings the trainer accepts are printed
        made.batches = trainer_batches(args.config, made.chosen)
    return made


if __name__ == "__main__":
    sys.exit(main())
