"""`sap-dist plan`: the arithmetic against hand computations (tiny model, Llama 3 70B), the
parameter counts against transformers/peft, model resolution and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sap_dist.tools import plan
from sap_dist.tools.plan import GiB, Setup, load_arch, memory

# ---- hand computations ---------------------------------------------------------------------
# tiny-random-llama: vocab 49152, hidden 64, intermediate 128, 4 layers, 4 heads (2 kv, dim 16),
# tied embeddings.
TINY_LAYER = (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64) + 3 * 64 * 128 + 2 * 64  # attn + mlp + 2 norms = 36992
TINY_P = 49152 * 64 + 4 * TINY_LAYER + 64  # embedding (tied head) + layers + final norm = 3,293,760
TINY_LORA_R4 = 4 * (4 * (64 + 64) + 4 * (64 + 32))  # q_proj 64->64, v_proj 64->32, r=4, 4 layers = 3584

# Llama 3 70B: vocab 128256, hidden 8192, intermediate 28672, 80 layers, 64 heads (8 kv, dim 128).
L70_LAYER = (8192 * 8192 * 2 + 8192 * 1024 * 2) + 3 * 8192 * 28672 + 2 * 8192  # 855,654,400
L70_P = 2 * 128256 * 8192 + 80 * L70_LAYER + 8192  # 70,553,706,496
L70_LORA_R8 = 80 * 8 * ((8192 + 8192) + (8192 + 1024))  # 16,384,000


def test_hand_counts_are_the_known_sizes():
    assert TINY_LAYER == 36_992 and TINY_P == 3_293_760 and TINY_LORA_R4 == 3_584
    assert L70_LAYER == 855_654_400 and L70_P == 70_553_706_496 and L70_LORA_R8 == 16_384_000


def test_parameter_counts_tiny_and_70b():
    tiny, big = load_arch("tiny-random-llama"), load_arch("meta-llama/Llama-3.1-70B-Instruct")
    assert tiny.total_params() == TINY_P
    assert tiny.lora_params(4, ["q_proj", "v_proj"]) == TINY_LORA_R4
    assert big.total_params() == L70_P
    assert big.lora_params(8, ["q_proj", "v_proj"]) == L70_LORA_R8


def test_tiny_lora_zero3_memory_by_hand():
    """fp32 tiny model, LoRA r=4 on q,v, ZeRO-3 over 2 GPUs, 2 task sequences of 64 tokens and
    2 safety pairs (4 sequences) of 64 tokens per GPU, SAP with 2 probe layers."""
    s = Setup(method="lora", backend="zero3", gpus=2, dtype="fp32", lora_r=4, seq_len=64, safety_seq_len=64,
              batch_per_gpu=2, safety_per_gpu=2, probe_layers=2, safety_every=1)
    m = memory(load_arch("tiny-random-llama"), s, reserve_gib=2.0)
    n, T = 2, TINY_LORA_R4
    assert m["weights"] == TINY_P * 4 / n + T * 4 / n  # fp32 base shard + fp32 adapter shard
    assert m["gradients"] == T * 4 / n
    assert m["optimizer"] == T * 12 / n  # fp32 master + Adam m, v
    assert m["sap_copy"] == T * 4 / n + 5 * 2 * 64 * 4  # saved adapter shard + 5 probe-sized fp32 vectors x 2 layers
    assert m["gathered"] == 2 * (49152 * 64) * 4  # the embedding is the largest unit, gathered twice
    per_layer = 64 * (4 * 64 + 2 * 4 * 16 + 2 * 2 * 16 + 4 * 128) * 4 + 2 * 64 * 64 * 4  # + LoRA fp32 inputs
    per_seq = 4 * per_layer + 64 * 49152 * (4 + 8)
    assert per_layer == 278_528 and per_seq == 38_862_848
    assert m["activations"] == max(2 * per_seq, 2 * 2 * per_seq) == 155_451_392  # the safety pass is larger
    assert m["step_transient"] == 4 * (T / n)
    static = TINY_P * 2 + T * 2 + T * 2 + T * 6 + T * 2 + 2560
    assert m["total"] == static + 2 * 49152 * 64 * 4 + 155_451_392 + 2 * GiB == 187_250_304 + 2 * GiB


@pytest.mark.parametrize("offload_optimizer", [False, True])
def test_stored_safety_direction_by_hand(offload_optimizer):
    """sap.safety_every > 1 (the default 4) keeps g/|g| in fp32 between safety passes: T x 4 / N
    more per GPU (full fine-tuning of 70B on 16 GPUs: 16.4 GiB), in CPU memory with the
    gradients under optimizer offload; plain fine-tuning keeps none."""
    import dataclasses

    arch = load_arch("llama-3-70b")
    exact = Setup(method="full", backend="zero3", gpus=16, offload_optimizer=offload_optimizer, safety_every=1)
    assert Setup().safety_every == 4
    stored = memory(arch, dataclasses.replace(exact, safety_every=4))
    exact_m = memory(arch, exact)
    where, other = ("host", "total") if offload_optimizer else ("total", "host")
    assert stored[where] - exact_m[where] == L70_P * 4 / 16
    assert stored[other] == exact_m[other]
    plain = dataclasses.replace(exact, sap=False)
    assert memory(arch, dataclasses.replace(plain, safety_every=4)) == memory(arch, plain)


@pytest.mark.parametrize("offload_optimizer", [False, True])
def test_lisa_and_booster_weight_copy_by_hand(offload_optimizer, tmp_path):
    """A method that keeps a copy of the trained weights (Lisa's proximal centre, Booster's
    restore point: `plan_memory="master_copy"`) costs T x 4 / N more per GPU, in CPU memory
    under optimizer offload; a run config's method decides it."""
    import dataclasses

    import yaml

    from sap_dist.config import load_config, resolve_config_path
    from sap_dist.tools.plan import build_parser, plan_from_args

    arch = load_arch("llama-3-70b")
    plain = Setup(method="full", backend="zero3", gpus=16, offload_optimizer=offload_optimizer, sap=False)
    copied = memory(arch, dataclasses.replace(plain, weight_copy=True))
    where, other = ("host", "total") if offload_optimizer else ("total", "host")
    assert copied[where] - memory(arch, plain)[where] == L70_P * 4 / 16
    assert copied[other] == memory(arch, plain)[other]
    for method, copy in [("lisa", True), ("booster", True), ("sap", False), ("sft", False)]:
        path = tmp_path / f"{method}.yaml"
        path.write_text(yaml.safe_dump({**yaml.safe_load(open(resolve_config_path("tiny"))), "method": method}))
        assert load_config(str(path)).method == method
        args = build_parser().parse_args(["--config", str(path), "--gpus", "2", "--gpu-memory", "4"])
        assert plan_from_args(args).base.weight_copy is copy, method


def test_70b_full_zero3_16_gpus_by_hand():
    s = Setup(method="full", backend="zero3", gpus=16, dtype="bf16", seq_len=256, safety_seq_len=256,
              batch_per_gpu=1, safety_per_gpu=1, safety_every=1)
    m = memory(load_arch("llama-3-70b"), s, reserve_gib=2.0)
    P, n = L70_P, 16
    assert m["weights"] == P * 2 / n == 8_819_213_312
    assert m["gradients"] == P * 2 / n
    assert m["optimizer"] == P * 12 / n == 52_915_279_872
    assert m["sap_copy"] == P * 2 / n + 5 * 2 * 8192 * 4
    embed = 128256 * 8192  # larger than a decoder layer
    assert m["gathered"] == 2 * embed * 2 + embed * 2 == 6_304_038_912
    per_layer = 256 * (4 * 8192 + 2 * 64 * 128 + 2 * 8 * 128 + 4 * 28672) * 2
    per_seq = 80 * per_layer + 256 * 128256 * (2 + 8)
    assert m["activations"] == 2 * per_seq  # one safety pair = 2 sequences > 1 task sequence
    assert m["step_transient"] == 4 * 1e9  # one ZeRO-3 sub-group in fp32
    static = 3 * 8_819_213_312 + 52_915_279_872 + 327_680
    assert m["total"] == static + 6_304_038_912 + 2 * per_seq + 2 * GiB
    assert m["total"] == 102_070_985_728  # 95.06 GiB: does not fit 80 GiB


def test_70b_lora_and_offload_verdicts():
    arch = load_arch("llama-3-70b")
    lora = plan.make_plan(arch, Setup(method="lora", gpus=16), 80)
    assert lora.fits and not lora.chosen.offload_optimizer
    assert lora.chosen.batch_per_gpu * 16 == int(plan.overrides(lora.chosen)[3].split("=")[1])
    full = plan.make_plan(arch, Setup(method="full", gpus=16), 80)
    assert full.fits and full.chosen.offload_optimizer  # only with the optimizer state on the CPU
    small = plan.make_plan(arch, Setup(method="full", backend="fsdp2", gpus=8), 80)
    assert not small.fits and small.min_gpus and small.min_gpus > 8  # FSDP2 in sap-dist has no offload
    bigger = plan.make_plan(arch, Setup(method="full", backend="fsdp2", gpus=small.min_gpus), 80)
    assert bigger.fits


def test_fsdp2_full_finetuning_keeps_fp32_masters():
    """bf16 full fine-tuning on FSDP2 keeps the trained weights in fp32 (bf16 only in compute):
    weights, gradients, Adam's m and v and SAP's copy are all fp32 shards."""
    s = Setup(method="full", backend="fsdp2", gpus=4, dtype="bf16")
    m = memory(load_arch("tiny-random-llama"), s)
    assert m["optimizer"] == TINY_P * 4 * 2 / 4 and m["step_transient"] == 0
    assert m["weights"] == TINY_P * 4 / 4 and m["gradients"] == TINY_P * 4 / 4


def test_qlora_base_is_not_sharded():
    arch = load_arch("tiny-random-llama")
    one = memory(arch, Setup(method="qlora", gpus=1, lora_r=4), 0)
    four = memory(arch, Setup(method="qlora", gpus=4, lora_r=4), 0)
    quantized = 4 * 36_864
    base = quantized * plan.NF4_BYTES + (TINY_P - quantized) * 4
    assert one["weights"] == base + TINY_LORA_R4 * 4
    assert four["weights"] == base + TINY_LORA_R4 * 4 / 4
    offload = memory(arch, Setup(method="qlora", gpus=4, lora_r=4, offload_optimizer=True, offload_params=True), 0)
    assert offload["weights"] == four["weights"] and offload["optimizer"] == 0  # 4-bit weights stay on the GPU


@pytest.mark.parametrize("name", ["tiny-random-llama", "smollm2-135m-instruct", "llama-2-7b", "llama-2-13b",
                                  "llama-2-70b", "llama-3-8b", "llama-3-70b"])
def test_counts_match_transformers_and_peft(name):
    """The closed-form counts equal what transformers builds from the same config.json (on
    the meta device, no memory) and what peft adds for LoRA r=8 on q_proj, v_proj."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    with open(os.path.join(plan.ARCH_DIR, f"{name}.json")) as fh:
        cfg = {k: v for k, v in json.load(fh).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    arch = load_arch(name)
    assert sum(p.numel() for p in model.parameters()) == arch.total_params()
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == arch.lora_params(8, ["q_proj", "v_proj"])


def test_known_sizes_of_shipped_configs():
    sizes = {"llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
             "llama-3-8b": 8_030_261_248, "smollm2-135m-instruct": 134_515_008}
    for name, expected in sizes.items():
        assert load_arch(name).total_params() == expected, name


def test_model_from_local_config_file_and_directory(tmp_path):
    with open(os.path.join(plan.ARCH_DIR, "llama-2-7b.json")) as fh:
        cfg = json.load(fh)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_arch(str(tmp_path)).total_params() == load_arch(str(tmp_path / "config.json")).total_params() == 6_738_415_616
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 4}))
    with pytest.raises(plan.PlanError, match="num_attention_heads"):
        load_arch(str(tmp_path / "bad.json"))
    with pytest.raises(plan.PlanError, match="not linear layers"):
        load_arch("tiny-random-llama").lora_params(4, ["qproj"])


def _cli(*args, env=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "sap_dist.cli", "plan", *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_text_json_and_exit_codes(tmp_path):
    ok = _cli("--model", "meta-llama/Llama-3.1-70B-Instruct", "--gpus", "16", "--gpu-memory", "80")
    assert ok.returncode == 0, ok.stderr
    assert "FITS" in ok.stdout and "70.55 B parameters" in ok.stdout and "dist.backend=zero3" in ok.stdout
    data = json.loads(_cli("--model", "llama-3-70b", "--gpus", "16", "--gpu-memory", "80", "--json").stdout)
    assert data["parameters"] == L70_P and data["trained_parameters"] == L70_LORA_R8 and data["fits"]
    assert data["memory_bytes"]["total"] <= 80 * GiB
    assert "train.batch_size=%d" % (data["recommended"]["batch_per_gpu"] * 16) in data["overrides"]
    no = _cli("--model", "llama-3-70b", "--gpus", "2", "--gpu-memory", "40", "--method", "full", "--backend", "fsdp2")
    assert no.returncode == 1 and "DOES NOT FIT" in no.stdout and "smallest GPU count" in no.stdout
    bad = _cli("--model", "no-such/model-anywhere", "--gpus", "1", "--gpu-memory", "8")
    assert bad.returncode == 2 and "neither a local config.json" in bad.stderr and "llama-3-70b" in bad.stderr


def test_cli_reads_a_run_config():
    data = json.loads(_cli("--config", "tiny", "--gpus", "2", "--gpu-memory", "4", "--json").stdout)
    assert data["model"] == "tiny-random-llama" and data["trained_parameters"] == TINY_LORA_R4
    assert data["recommended"]["dtype"] == "fp32" and data["recommended"]["seq_len"] == 64


def test_recipe_configs_fit_their_scripts():
    """Each Slurm script's header states its plan; the recipe config with that GPU count fits."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for size, gpus in (("7b", 8), ("13b", 8), ("70b", 16)):
        result = _cli("--config", os.path.join(root, "configs", f"sap_{size}.yaml"), "--gpus", str(gpus), "--gpu-memory", "80", "--json")
        assert result.returncode == 0, (size, result.stdout, result.stderr)
        script = open(os.path.join(root, "slurm", f"sap_{size}.sh")).read()
        assert f"sap-dist plan --config configs/sap_{size}.yaml --gpus {gpus} --gpu-memory 80" in script


def test_a_fit_leaves_the_stated_headroom():
    """The search never recommends a setting above 90% of the card (the estimate's accuracy,
    and torch sees less than a card's nominal size), and says so; --headroom 0 lets it."""
    import io
    from contextlib import redirect_stdout

    from sap_dist.tools.plan import main as plan_main

    args = ["--model", "llama-2-7b", "--gpus", "8", "--gpu-memory", "80", "--json"]
    for headroom, limit in ((None, 72.0), ("0", 80.0)):
        buf = io.StringIO()
        with redirect_stdout(buf):
            plan_main(args + (["--headroom", headroom] if headroom else []))
        plan = json.loads(buf.getvalue())
        assert plan["usable_gib"] == pytest.approx(limit)
        assert plan["memory_gib"]["total"] <= limit
    text = io.StringIO()
    with redirect_stdout(text):
        plan_main(args[:-1])
    assert "10% headroom" in text.getvalue() and "72.0 GiB" in text.getvalue()


def _plan_json(*args: str) -> dict:
    import io
    from contextlib import redirect_stdout

    from sap_dist.tools.plan import main as plan_main

    buf = io.StringIO()
    with redirect_stdout(buf):
        plan_main([*args, "--json"])
    return json.loads(buf.getvalue())


def test_offload_plans_report_host_memory_per_node_and_honour_host_memory():
    """Full fine-tuning of 70B with optimizer offload: 20 bytes per parameter on the CPU
    (fp32 master, Adam m, v, fp32 gradient, and the stored fp32 safety direction at the default
    sap.safety_every=4), split over the nodes: ~0.63 TiB per node on 16 GPUs, ~1.25 TiB on 8. A
    --host-memory below that refuses the offload plans."""
    common = ["--model", "llama-2-70b", "--method", "full", "--gpu-memory", "80"]
    on16 = _plan_json(*common, "--gpus", "16")
    on8 = _plan_json(*common, "--gpus", "8")
    for plan, tib in ((on16, 0.625), (on8, 1.25)):
        assert plan["recommended"]["offload_optimizer"], plan["recommended"]
        assert plan["host_per_node_gib"] == pytest.approx(tib * 1024, rel=0.1)
    refused = _plan_json(*common, "--gpus", "8", "--host-memory", "512")
    assert not refused["fits"] and refused["host_memory_gib"] == 512  # every offload plan needs more than 512 GiB


def test_lora_with_a_fixed_batch_prefers_a_smaller_batch_to_offload():
    """LoRA on 8 GPUs with a batch too large per GPU: a smaller train.batch_size, never
    optimizer offload (16M adapter parameters: nothing to save)."""
    plan = _plan_json("--model", "llama-2-70b", "--method", "lora", "--gpus", "8", "--gpu-memory", "80",
                      "--batch-size", "64", "--seq-len", "512")
    chosen = plan["recommended"]
    assert plan["fits"] and not chosen["offload_optimizer"] and not chosen["offload_params"], chosen
    assert chosen["batch_per_gpu"] < 8


@pytest.mark.parametrize("args", [
    ["--model", "meta-llama/Llama-3.1-70B-Instruct", "--gpus", "16", "--batch-size", "16"],  # 8 probe rows for 16 ranks
    ["--model", "llama-3-70b", "--gpus", "32", "--batch-size", "32", "--safety-batch-size", "16"],
    ["--config", "configs/sap_70b.yaml", "--gpus", "32"],
    ["--config", "configs/sap_70b.yaml", "--gpus", "16"],
    ["--config", "configs/sap_7b.yaml", "--gpus", "8"],
    ["--config", "configs/sap_7b.yaml", "--gpus", "16", "--batch-size", "48"],
    ["--model", "llama-2-7b", "--gpus", "8", "--method", "full", "--sft"],
    ["--config", "quick", "--gpus", "8"],
])
def test_plan_recommends_only_what_the_trainer_accepts(args):
    """The recommended overrides, on top of the plan's config, pass the trainer's own checks
    at the plan's GPU count (sap_dist/run_control/preflight.py, what every rank runs first), and the plan
    states the probe rows and safety pairs the trainer will use."""
    from sap_dist.run_control import preflight
    from sap_dist.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [os.path.join(root, a) if a.startswith("configs/") else a for a in args]
    data = _plan_json(*args, "--gpu-memory", "80")
    assert data["fits"], data
    config = args[args.index("--config") + 1] if "--config" in args else None
    gpus = int(args[args.index("--gpus") + 1])
    checked = preflight.check(load_config(config, data["overrides"]), gpus)
    assert checked.batches.record() == data["batches"]
    assert data["batches"]["probe_rows"] is None or data["batches"]["probe_rows"] % gpus == 0


def test_plan_refuses_a_batch_the_trainer_refuses():
    refused = _cli("--model", "llama-3-70b", "--gpus", "16", "--gpu-memory", "80", "--batch-size", "24")
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("sap-dist plan: error: train.batch_size=24 is a global batch size and must divide "
                                      "evenly over the 16 ranks; the nearest that do: 16 or 32 (--gpus 16)")
    # any safety batch: the trainer rounds it up to the GPU count
    assert _cli("--model", "llama-3-70b", "--gpus", "16", "--gpu-memory", "80", "--safety-batch-size", "4").returncode == 0
