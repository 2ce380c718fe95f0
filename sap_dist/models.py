"""Loading the model to fine-tune, choosing its trained weights, and saving/reloading them.

Sources (`ModelConfig.name_or_path`): the embedded SmolLM2 (`sap_dist.embedded`), a `.gguf`
file, a local transformers directory, a hub id, or the seeded tiny random Llama for tests.
Trained weights (`WeightsConfig.method`): LoRA adapters (always fp32, see docs/pilot.md:
SAP's perturbation must be representable), every weight, or LoRA over a 4-bit NF4 base.

Loading is single-process unless a `sap_dist.backends.Loading` is passed: then the base is
built the way the backend that wraps it needs (partitioned over the ranks while constructed, or
on the meta device with the real weights streamed in by the wrap), so no rank has to hold the
whole model. The backend wraps/shards the returned module afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
import warnings
import zlib
from typing import TYPE_CHECKING, Any, Callable

import torch

from sap_dist import embedded
from sap_dist.config import EMBEDDED_MODEL, TINY_MODEL, ModelConfig, WeightsConfig

if TYPE_CHECKING:  # transformers is imported lazily: importing this module stays cheap
    from transformers import PreTrainedTokenizerBase

INFO_FILE = "sap_dist_model.json"
"""Written beside a saved adapter/model: how it was trained, so `load_trained` rebuilds the
same base (4-bit for QLoRA, the tiny model's seed)."""

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Where the decoder layers live, per architecture family (first match wins).
_LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.blocks")


class ModelLoadError(RuntimeError):
    """The model, tokenizer or trained weights could not be loaded; the message names what."""


# ------------------------------------------------------------------------------------------
# Sources


def resolve_model(cfg: ModelConfig) -> tuple[str, str | None]:
    """`(path or hub id, gguf file name or None)` to hand to `from_pretrained`.

    The embedded model is fetched/converted on first use (may raise
    `embedded.EmbeddedModelError`). The tiny model has no files: it resolves to the embedded
    checkpoint, whose tokenizer it uses. Anything that is neither a local path nor the two
    built-in names is returned unchanged as a hub id (not contacted here)."""
    name = cfg.name_or_path
    if name in (EMBEDDED_MODEL, TINY_MODEL):
        return embedded.converted_dir(cfg.cache_dir), None
    path = os.path.expanduser(name)
    if path.lower().endswith(".gguf"):
        if not os.path.isfile(path):
            raise ModelLoadError(f"model.name_or_path {name!r}: GGUF file not found")
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if os.path.isdir(path):
        return path, None
    return name, None


def _hub_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision is not None:
        kwargs["revision"] = cfg.revision
    return kwargs


def _from_source(loader: Any, cfg: ModelConfig, what: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained` on the resolved source, turning a hub miss into a clear error."""
    from huggingface_hub.errors import HFValidationError

    path, gguf_file = resolve_model(cfg)
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    is_hub_id = path == cfg.name_or_path and not os.path.isdir(os.path.expanduser(path))
    try:
        return loader.from_pretrained(path, **_hub_kwargs(cfg), **kwargs)
    except (struct.error, ValueError, KeyError) as exc:
        if gguf_file is None:
            raise
        # the gguf reader's errors (a truncated file, no magic bytes) do not name the file
        raise ModelLoadError(f"model.name_or_path {cfg.name_or_path!r}: not a readable GGUF file "
                             f"(truncated or another format): {exc}") from None
    except (OSError, HFValidationError) as exc:
        if not is_hub_id:
            raise ModelLoadError(f"could not load the {what} from {path!r}: {exc}") from exc
        raise ModelLoadError(
            f"model.name_or_path {cfg.name_or_path!r} is neither a local path (directory or .gguf "
            f"file) nor reachable on the Hugging Face hub"
            f"{' (revision ' + repr(cfg.revision) + ')' if cfg.revision else ''}: {exc}"
        ) from exc


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer with a pad token (eos when it has none) and right padding,
    which the loss masks assume."""
    from transformers import AutoTokenizer

    tokenizer = _from_source(AutoTokenizer, cfg, "tokenizer")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer of {cfg.name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


# ------------------------------------------------------------------------------------------
# Base models


def _tiny_config(cfg: ModelConfig) -> Any:
    from transformers import LlamaConfig

    tokenizer = load_tokenizer(cfg)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if cfg.attn_implementation is not None:
        config._attn_implementation = cfg.attn_implementation
    return config


def _tiny_value(seed: int, name: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
    """The tiny model's weight `name` (fp32): ones for a 1-D weight (the RMSNorms), else
    N(0, std^2) from a generator seeded by `seed` and `name` only. Independent of the order
    the model is built in and of how it is sharded, so every loading route builds the same
    model, and a rank can produce one weight without building the others."""
    if len(shape) == 1:
        return torch.ones(shape)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g).mul_(std)


def _base_key(name: str) -> str:
    """The base model's name for a parameter named `name` in a peft (LoRA) model."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name.replace(".base_layer.", ".")


def tiny_model(cfg: ModelConfig, seed: int = 0, loading: Any = None) -> torch.nn.Module:
    """The 4-layer random Llama with the embedded tokenizer's vocabulary, in `cfg.dtype`.

    Its weights depend on `seed` only (`_tiny_value`); the caller's RNG state is left
    untouched. With a `loading` (see `load_base`) it is built partitioned or on the meta
    device, and no process ever holds all of it."""
    from transformers import LlamaForCausalLM

    config = _tiny_config(cfg)
    dtype = _DTYPES[cfg.dtype]
    build = loading.init_context(dtype) if loading is not None else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), build:
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    std = config.initializer_range
    if loading is not None and loading.meta:
        model.tie_weights()  # accelerate's empty-weights context re-creates the tied parameter
        if loading.provides_weights:
            shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
            loading.set_weight_source(lambda n: _tiny_value(seed, _base_key(n), shapes[_base_key(n)], std))
        return model
    with torch.no_grad():
        for name, p in model.named_parameters():  # one (gathered) parameter at a time
            with loading.writable([p]) if loading is not None else contextlib.nullcontext(True) as write:
                if write:
                    p.data.copy_(_tiny_value(seed, name, tuple(p.shape), std))
    return model


def _clear_gguf_quantizer(model: torch.nn.Module) -> None:
    """GGUF weights arrive dequantized; drop the quantizer marks that would make peft and
    save_pretrained treat the model as quantized (same as `embedded.converted_dir`)."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _bnb_4bit_config(cfg: ModelConfig) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError(
            "weights.method 'qlora' needs bitsandbytes: pip install bitsandbytes (or sap-dist[qlora])"
        ) from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=_DTYPES[cfg.dtype],
    )


def _qlora_device_map() -> dict[str, Any]:
    """bitsandbytes quantizes while loading onto the target device, so a QLoRA base is loaded
    straight onto this process's GPU (LOCAL_RANK under a launcher), else the CPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    return {"": "cpu"}


def _keep_cpu_4bit_trainable(model: torch.nn.Module) -> None:
    """bitsandbytes (0.50) repacks a CPU Linear4bit's weight for its AVX512-BF16 kernel on the
    first eval-mode no-grad forward, and keeps it so: every later forward, training included,
    goes through that inference-only kernel, which has no autograd, so LoRA silently gets no
    gradient after any evaluation pass. Turning the repack off keeps QLoRA on CPU correct
    (and slower; QLoRA is meant for GPUs)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _checkpoint_source(cfg: ModelConfig, model: torch.nn.Module, seed: int) -> Callable[[str], torch.Tensor]:
    """`source(name) -> tensor` for meta loading: each weight read on its own from the
    checkpoint's safetensors files when every parameter of `model` is found there under its
    own name (the usual transformers directory); otherwise (GGUF, a hub id, renamed keys)
    the whole model is loaded here once and its weights handed out."""
    path, gguf_file = resolve_model(cfg)
    names = [_base_key(n) for n, _ in model.named_parameters()]
    files: dict[str, str] = {}
    if gguf_file is None and os.path.isdir(path):
        from safetensors import safe_open

        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as fh:
                files = {k: os.path.join(path, f) for k, f in json.load(fh)["weight_map"].items()}
        elif os.path.exists(os.path.join(path, "model.safetensors")):
            with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as fh:
                files = {k: os.path.join(path, "model.safetensors") for k in fh.keys()}
        if files and all(n in files for n in names):
            handles: dict[str, Any] = {}

            def source(name: str) -> torch.Tensor:
                key = _base_key(name)
                if files[key] not in handles:
                    handles[files[key]] = safe_open(files[key], framework="pt")
                return handles[files[key]].get_tensor(key)

            return source
    warnings.warn(f"{cfg.name_or_path}: weights cannot be read one by one (not a safetensors directory "
                  f"with the model's own names); the first rank loads the whole model once to hand them out")
    params = dict(load_base(cfg, seed).named_parameters())
    return lambda name: params[_base_key(name)].detach()


def load_base(cfg: ModelConfig, seed: int = 0, quantize_4bit: bool = False, loading: Any = None) -> torch.nn.Module:
    """The base causal LM in `cfg.dtype` (or 4-bit NF4), untouched otherwise.

    `loading` (a `sap_dist.backends.Loading`, from `prepare_loading`) makes it built for the
    backend that will wrap it: partitioned over the ranks while constructed and loaded
    (`loading.partitioned`), or on the meta device with a weight source for the wrap
    (`loading.meta`). None: the whole model, in this process."""
    from transformers import AutoModelForCausalLM

    if loading is not None and quantize_4bit:
        raise ModelLoadError("a 4-bit (qlora) base is loaded whole on each rank; call load_base without loading")

    kwargs: dict[str, Any] = {"dtype": _DTYPES[cfg.dtype]}
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quantize_4bit:
        if cfg.name_or_path != TINY_MODEL and resolve_model(cfg)[1] is not None:
            # transformers cannot re-quantize GGUF weights while loading them
            raise ModelLoadError(
                f"weights.method 'qlora' cannot load the GGUF file {cfg.name_or_path!r} in 4 bits; use a "
                f"transformers directory or hub id (the embedded model's is {EMBEDDED_MODEL!r}), or lora"
            )
        kwargs["quantization_config"] = _bnb_4bit_config(cfg)
        kwargs["device_map"] = _qlora_device_map()
    if cfg.name_or_path == TINY_MODEL:
        model = tiny_model(cfg, seed, loading)
        if not quantize_4bit:
            return model
        # Quantization happens inside from_pretrained, so go through a checkpoint on disk.
        from transformers import LlamaForCausalLM

        with tempfile.TemporaryDirectory(prefix="sapd-tiny-") as tmp:
            model.save_pretrained(tmp)
            model = LlamaForCausalLM.from_pretrained(tmp, **kwargs)
        # Like a from-config model: no source path (peft would look the deleted one up on save).
        model.name_or_path = model.config._name_or_path = ""
    elif loading is not None and loading.meta:
        from transformers import AutoConfig

        config = _from_source(AutoConfig, cfg, "model config")
        with loading.init_context(kwargs["dtype"]):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code, **kwargs)
        model.tie_weights()  # accelerate's empty-weights context re-creates the tied parameter
        if loading.provides_weights:
            loading.set_weight_source(_checkpoint_source(cfg, model, seed))
    else:
        build = loading.init_context(kwargs["dtype"]) if loading is not None else contextlib.nullcontext()
        with build:
            model = _from_source(AutoModelForCausalLM, cfg, "model", **kwargs)
        if resolve_model(cfg)[1] is not None:
            _clear_gguf_quantizer(model)
    if quantize_4bit:
        _keep_cpu_4bit_trainable(model)
    return model


# ------------------------------------------------------------------------------------------
# Trained weights


def _qlora_base(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """4-bit base prepared by peft (frozen; norms, embeddings and head upcast to fp32), the
    same for training and for reloading, so a reloaded adapter computes the same numbers."""
    from peft import prepare_model_for_kbit_training

    # No gradient checkpointing: SAP's probe passes take torch.autograd.grad, which the
    # reentrant checkpoint does not support, and lora/full do not checkpoint either.
    return prepare_model_for_kbit_training(load_base(cfg, seed, quantize_4bit=True), use_gradient_checkpointing=False)


def _lora_config(weights: WeightsConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=weights.lora_r,
        lora_alpha=weights.lora_alpha,
        lora_dropout=weights.lora_dropout,
        target_modules=list(weights.target_modules),
        task_type="CAUSAL_LM",
    )


def _init_adapters(model: torch.nn.Module, seed: int) -> None:
    """(Re)initialise the LoRA adapters the way peft does by default (A: kaiming-uniform with
    a=sqrt(5), i.e. U(+-1/sqrt(fan_in)); B: zeros), each A from a generator seeded by `seed`
    and its name: the same adapters on every rank and whatever device the base is on. peft
    leaves adapters on the meta device when their base layer is there; they get CPU storage
    here (the backend moves them)."""
    import math

    with torch.no_grad():
        for mod_name, module in model.named_modules():
            for attr, p in list(module.named_parameters(recurse=False)):
                name = f"{mod_name}.{attr}"
                is_a, is_b = ".lora_A." in name, ".lora_B." in name
                if not (is_a or is_b):
                    if p.is_meta and p.requires_grad:
                        raise ModelLoadError(f"trained weight {name} cannot be initialised off the meta device")
                    continue
                if p.is_meta:
                    p = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
                    setattr(module, attr, p)
                if is_b:
                    p.zero_()
                else:
                    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                    bound = 1.0 / math.sqrt(p.shape[1])
                    p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=g))


def _add_lora(model: torch.nn.Module, weights: WeightsConfig, seed: int) -> torch.nn.Module:
    from peft import get_peft_model

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # autocast_adapter_dtype keeps adapters fp32 over a bf16 base (docs/pilot.md).
            model = get_peft_model(model, _lora_config(weights), autocast_adapter_dtype=True)
    except ValueError as exc:
        if "target" in str(exc).lower():
            raise ModelLoadError(f"weights.target_modules {weights.target_modules}: {exc}") from exc
        raise
    # Seeded like the tiny model: lora_A is random, and every rank must start equal.
    _init_adapters(model, seed)
    return model


def load_model(cfg: ModelConfig, weights: WeightsConfig, seed: int = 0, loading: Any = None) -> torch.nn.Module:
    """The model ready to train: only the weights named by `weights.method` require grad.

    `seed` fixes the tiny model's weights and the LoRA adapters' initialisation, identically
    in every process. `use_cache` is off (training never reuses past key/values). `loading`
    (from `sap_dist.backends.prepare_loading`) builds the base for the backend that will wrap
    it (see `load_base`); LoRA adapters are always whole and the same on every rank. A QLoRA
    base is always loaded whole."""
    method = weights.method
    if method == "lora":
        model = _add_lora(load_base(cfg, seed, loading=loading), weights, seed)
    elif method == "full":
        model = load_base(cfg, seed, loading=loading)
        for param in model.parameters():
            param.requires_grad_(True)
    elif method == "qlora":
        model = _add_lora(_qlora_base(cfg, seed), weights, seed)
    else:
        raise ModelLoadError(f"weights.method {method!r} is not one of lora, full, qlora")
    model.config.use_cache = False
    # Remembered for save_trained, so load_trained can rebuild the same base.
    model.sap_dist_info = {"name_or_path": cfg.name_or_path, "method": method, "seed": seed}
    return model


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM, through peft and DDP/DeepSpeed-style wrappers."""
    from peft import PeftModel

    inner = model
    while True:
        if isinstance(inner, PeftModel):
            inner = inner.get_base_model()
        elif hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
            inner = inner.module  # DistributedDataParallel, DeepSpeedEngine, ...
        else:
            break
    for dotted in _LAYER_PATHS:
        obj: Any = inner
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ModelLoadError(
        f"cannot find the decoder layers of {type(inner).__name__} (looked for {', '.join(_LAYER_PATHS)})"
    )


def trained_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Named parameters that require grad (the weights SAP perturbs and the optimizer steps)."""
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


# ------------------------------------------------------------------------------------------
# Saving and reloading


def save_trained(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None, output_dir: str) -> None:
    """Write the adapter (peft) or the full model, the tokenizer, and `INFO_FILE`.
    Single process: call it on rank 0 with the unwrapped model."""
    from peft import PeftModel

    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    info = dict(getattr(model, "sap_dist_info", {}))
    if not info:  # a model that did not come from load_model: record what can be seen
        quantized = getattr(model.get_base_model(), "is_loaded_in_4bit", False) if isinstance(model, PeftModel) else False
        info = {"method": "qlora" if quantized else "lora" if isinstance(model, PeftModel) else "full"}
    with open(os.path.join(output_dir, INFO_FILE), "w") as fh:
        json.dump(info, fh, indent=2)


HUB_IDS = {EMBEDDED_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""Hub ids of sap-dist's built-in model names (the embedded model is that model's Q4_1 GGUF,
dequantized: the hub weights are the unquantized original)."""


def portable_base(name_or_path: str) -> str | None:
    """The base model as other programs can find it: a hub id where one exists, else the local
    path made absolute; None for the tiny model (random weights, nothing to download)."""
    if name_or_path in HUB_IDS:
        return HUB_IDS[name_or_path]
    if name_or_path == TINY_MODEL:
        return None
    path = os.path.expanduser(name_or_path)
    return os.path.abspath(path) if os.path.exists(path) else name_or_path


def record_base(output_dir: str, cfg: ModelConfig) -> None:
    """After saving (rank 0): point the adapter's `base_model_name_or_path` at `portable_base`
    (peft wrote null or a machine-local cache path) so `AutoPeftModelForCausalLM` loads it
    anywhere, and keep sap-dist's own name in `INFO_FILE`."""
    base = portable_base(cfg.name_or_path)
    adapter_config = os.path.join(output_dir, "adapter_config.json")
    if os.path.exists(adapter_config):
        with open(adapter_config) as fh:
            adapter = json.load(fh)
        adapter["base_model_name_or_path"] = base
        with open(adapter_config, "w") as fh:
            json.dump(adapter, fh, indent=2, sort_keys=True)
    info_path = os.path.join(output_dir, INFO_FILE)
    info: dict[str, Any] = {}
    if os.path.exists(info_path):
        with open(info_path) as fh:
            info = json.load(fh)
    info.update(name_or_path=cfg.name_or_path, base_model_name_or_path=base)
    with open(info_path, "w") as fh:
        json.dump(info, fh, indent=2)


def load_trained(output_dir: str, cfg: ModelConfig) -> torch.nn.Module:
    """Reload `save_trained`'s output for evaluation (eval mode, cache on): `cfg`'s base plus
    the adapter, or the saved full weights in `cfg.dtype`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    info_path = os.path.join(output_dir, INFO_FILE)
    info: dict[str, Any] = {}
    if os.path.exists(info_path):
        with open(info_path) as fh:
            info = json.load(fh)
    if os.path.exists(os.path.join(output_dir, "adapter_config.json")):
        if cfg.name_or_path == TINY_MODEL and "seed" not in info:
            raise ModelLoadError(f"{output_dir}: an adapter on {TINY_MODEL} needs the base's seed from {INFO_FILE}")
        seed = int(info.get("seed", 0))
        base = _qlora_base(cfg, seed) if info.get("method") == "qlora" else load_base(cfg, seed)
        model = PeftModel.from_pretrained(base, output_dir, is_trainable=False, autocast_adapter_dtype=True)
    elif os.path.exists(os.path.join(output_dir, "config.json")):
        kwargs: dict[str, Any] = {"dtype": _DTYPES[cfg.dtype]}
        if cfg.attn_implementation is not None:
            kwargs["attn_implementation"] = cfg.attn_implementation
        model = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=cfg.trust_remote_code, **kwargs)
    else:
        raise ModelLoadError(f"{output_dir} holds neither an adapter (adapter_config.json) nor a model (config.json)")
    model.config.use_cache = True
    model.eval()
    return model
