"""`sap-dist bench`: what SAP costs over plain fine-tuning, measured side by side.

Every method trains the same model (one backend, one optimizer) on the same global batches;
methods take turns block by block in a rotating order, after a warm-up block, and each
figure is the median over repeats. A block is `cycle` steps, the longest `probe_every` of
the methods, so a method that refreshes its probe every k steps is charged for the refresh.
Lisa's alignment steps run once per `lisa.task_steps` task steps: each of its task steps is
charged 1/task_steps of the last measured alignment phase (amortized, as a whole run pays it).
Every registered method and term (`sap_dist.methods`) is measured, each term alone and with
each method.
Peak memory is measured per block: the process's peak resident set on CPU (reset through
/proc/self/clear_refs), peak allocated memory on CUDA.
Candidates (`--candidate NAME 'key=value ...'`) are further settings measured in the same
rotation: SAP's own (`sap.safety_every=4`), or another method with its own (`method=anchor
anchor.loss=kl`), each SAP candidate with its own probe where its layers differ, so a cheaper
setting's ratio comes from the same run, batches and machine state as plain fine-tuning's.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, replace

import torch

from sap_dist import methods as registry
from sap_dist.config import Config, ConfigError, apply_overrides, load_config, validate
from sap_dist.methods import RunSetup

PRESETS = {
    # the tiny config is exact at every step (for backend checks): probe every 2 steps on half the batch here
    "tiny": {"config": "tiny", "repeats": 2, "overrides": ["sap.probe_every=2", "sap.probe_batch_fraction=0.5"]},
    "quick": {"config": "quick", "repeats": 8, "overrides": []},
    "full": {"config": "quick", "repeats": 10, "overrides": ["train.batch_size=16", "data.max_length=256"]},
    "gpu": {"config": None, "repeats": 10, "overrides": []},
}
"""Bench presets: the training config each measures and how many repeats."""

GPU_SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
}
"""Real Llama 3 shapes, random-initialised (no weights are downloaded), for the GPU preset."""

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
"""Dense bf16 peak of common cards, for model FLOP utilisation."""


def methods_for(cfg: Config, candidates: dict[str, Config] | None = None) -> dict[str, Config]:
    """The configurations compared, each `cfg` with another `method`: plain fine-tuning, SAP as
    configured (the default), both exact SAP variants (every step, whole batch), every other
    registered method and each term alone and with each method (`sap_dist.methods`), then the
    `candidates` (methods with their own settings, by name)."""
    exact = dict(probe_every=1, probe_batch_fraction=1.0, safety_every=1)
    sap = replace(cfg, method="sap")
    out = {
        "sft": replace(cfg, method="sft"),
        "sap_default": sap,
        "sap_paper_exact": replace(sap, sap=replace(cfg.sap, variant="paper", **exact)),
        "sap_reference_exact": replace(sap, sap=replace(cfg.sap, variant="reference", **exact)),
    }
    out |= {name: replace(cfg, method=name) for name in registry.names() if name not in ("sft", "sap")}
    taken = [name for name in candidates or {} if name in out]
    if taken:
        raise ConfigError(f"--candidate {taken[0]}: the name of a method the bench always measures; choose another")
    return out | dict(candidates or {})


def block_steps(methods: dict[str, Config]) -> int:
    """Steps per measured block: whole refresh cycles of every method (SAP: the probe every
    probe_every steps, the safety pass every probe_every * safety_every), so each method is
    charged its share of its refreshes in every block; the least common multiple, since with
    intervals 2 and 3 a block of 3 would hold one or two passes of the first by turns. A method
    whose recurring pass is amortised instead (Lisa's alignment phase) does not lengthen it."""
    cycles = []
    for m in methods.values():
        selection = registry.select(m.method)
        if selection.method.bench_amortized_pass is None:
            cycles.append(selection.method.bench_cycle(selection.section(m)))
    return math.lcm(*cycles)


def candidate_config(cfg: Config, name: str, overrides: str) -> Config:
    """Candidate `name`: a method with its own settings on top of `cfg` ('key=value ...',
    whitespace-separated): `method=NAME` (any registered method or combination, default `sap`)
    and keys of the methods' own sections (`sap.`, `lisa.`, `anchor.`, ...), validated with the
    rest of `cfg`. Nothing else: it would change the model, data or batches the candidate is
    compared on."""
    items = overrides.split()
    if not items:
        raise ConfigError(f"--candidate {name}: no settings given (e.g. 'sap.safety_every=4')")
    sections = sorted({section for section, _, _ in registry.sections()})
    method = "sap"
    for item in items:
        key, _, value = item.partition("=")
        if key == "method" and value:
            method = value
        elif "=" not in item or key.split(".", 1)[0] not in sections or "." not in key:
            raise ConfigError(f"--candidate {name}: {item!r} is neither method=NAME nor a setting of a method's own "
                              f"section ({', '.join(s + '.key=value' for s in sections)}); only those can differ "
                              "between the methods of one bench")
    changed = copy.deepcopy(cfg)  # overrides are set in place: cfg itself stays as it is
    apply_overrides(changed, [i for i in items if not i.startswith("method=")], f"--candidate {name}")
    changed.method = method
    registry.select(method)  # an unknown method stops here, with the names there are
    validate(changed)
    return changed


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current resident set


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/status") as fh:
        return int(re.search(r"VmHWM:\s+(\d+)", fh.read()).group(1)) / 1024


def bench_setup(cfg: Config):
    """What a measurement trains with: (tokenizer, task rows, safety pairs, model, backend, probe,
    probe layers), built as SAP's trainer builds them (also used by scripts/probe_rows_bench.py)."""
    from sap_dist.backends import OptimizerSpec, prepare_loading
    from sap_dist.models import load_model, load_tokenizer
    from sap_dist.batching import effective_batches
    from sap_dist.train import _setup_data, _setup_probe

    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    sap_cfg = replace(cfg, method="sap")
    task, _, safety, _ = _setup_data(sap_cfg, tokenizer, effective_batches(sap_cfg, 1))
    loading = prepare_loading(cfg.dist.backend, cfg.dist)
    model = load_model(cfg.model, cfg.weights, seed=cfg.train.seed, loading=loading)
    backend = loading.wrap(model, OptimizerSpec(lr=cfg.train.learning_rate, max_grad_norm=cfg.train.max_grad_norm))
    probe, layers = _setup_probe(sap_cfg, backend)
    return tokenizer, task, safety, model, backend, probe, layers


def run_bench(cfg: Config, repeats: int, warmup: int = 1, candidates: dict[str, Config] | None = None) -> dict:
    """Measure every method of `methods_for(cfg, candidates)`; returns the bench.json content."""
    from sap_dist.batching import safety_key, safety_pair_count
    from sap_dist.methods.common import StepInputs
    from sap_dist.models import decoder_layers
    from sap_dist.probe import check_probe_layers
    from sap_dist.train import (Batches, _alignment_batch, _collate_safety, _collate_task, _probe_rows, _response_tokens,
                                _setup_probe)

    tokenizer, task, safety, model, backend, default_probe, layers = bench_setup(cfg)
    methods = methods_for(cfg, candidates)
    selections = {name: registry.select(m.method) for name, m in methods.items()}
    pad = tokenizer.pad_token_id
    dev = backend.device
    # one probe per set of probed layers (a probe that is not enabled leaves its layers' outputs as they are)
    by_layers = {tuple(layers): default_probe}
    probes, states, terms = {}, {}, {}
    for name, m in methods.items():
        selection = selections[name]
        if selection.method.uses_probe:
            wanted = selection.section(m).probe_layers
            ids = (tuple(check_probe_layers(wanted, len(decoder_layers(backend.unwrapped_model()))))
                   if wanted is not None else tuple(layers))
            if ids not in by_layers:
                by_layers[ids] = _setup_probe(replace(m, sap=replace(m.sap, probe_layers=list(ids))), backend)[0]
            probes[name] = by_layers[ids]
        else:
            probes[name] = None
        states[name], terms[name] = registry.start(selection, m, RunSetup(backend, probes[name], safety, pad,
                                                                          cfg.train.seed))
    cycle = block_steps(methods)
    task_batches = Batches(task, cfg.train.batch_size, cfg.train.seed, backend.rank, backend.world_size)
    pair_batches = {}
    for name, m in methods.items():
        declared = safety_key(m)
        if declared is not None:
            size = safety_pair_count(declared[1], backend.world_size)
            pair_batches.setdefault(size, Batches(safety, size, cfg.train.seed + 1, backend.rank, backend.world_size))
    last_amortized = {name: 0.0 for name in methods}  # the last measured time of a once-per-cycle pass

    def one_step(name: str, index: int) -> tuple[float, dict, int]:
        m, selection = methods[name], selections[name]
        rows = task_batches.global_batch(index)
        batch = _collate_task(task_batches.local(rows), pad, dev)
        inputs = StepInputs(backend, batch, float(_response_tokens(rows)), probe=probes[name], before_step=terms[name])
        declared = safety_key(m)
        if declared is not None:
            pairs = pair_batches[safety_pair_count(declared[1], backend.world_size)]
            inputs.safety_batch = lambda: _collate_safety(pairs.local(pairs.global_batch(index)), pad, dev)
            inputs.alignment_batch = lambda i: _alignment_batch(pairs, i, pad, dev)
        if selection.method.probe_fraction is not None:
            probe_rows, inputs.probe_rows = _probe_rows(rows, selection.method.probe_fraction(m), backend.world_size)
            inputs.probe_tokens = float(_response_tokens(probe_rows))
        t0 = time.perf_counter()
        metrics = selection.method.step(inputs, selection.section(m), states[name].method)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        amortized = selection.method.bench_amortized_pass
        if amortized is not None:  # charge the once-per-cycle pass amortized over its cycle's steps
            key, every = f"time_{amortized}", selection.method.bench_cycle(selection.section(m))
            if key in metrics:
                last_amortized[name] = metrics[key]
            dt += last_amortized[name] / every - metrics.get(key, 0.0)
            metrics[key] = last_amortized[name] / every
        return dt, metrics, sum(len(r["input_ids"]) for r in rows)

    samples: dict[str, dict[str, list]] = {n: {"time": [], "mem": [], "tokens": [], "passes": []} for n in methods}
    names = list(methods)
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no method always first
        for name in order:
            _reset_peak(dev)
            times, tokens, passes = [], 0, {}
            for j in range(cycle):
                dt, metrics, n_tokens = one_step(name, r * cycle + j)
                times.append(dt)
                tokens += n_tokens
                for key, value in metrics.items():
                    if key.startswith("time_"):
                        passes[key[5:]] = passes.get(key[5:], 0.0) + value / cycle
            print(f"bench: {'warm-up' if r < warmup else f'repeat {r - warmup + 1}/{repeats}'}, {name}: "
                  f"{sum(times) / cycle:.3f} s/step", file=sys.stderr, flush=True)
            if r >= warmup:
                s = samples[name]
                s["time"].append(sum(times) / cycle)
                s["mem"].append(_peak_mb(dev))
                s["tokens"].append(tokens / sum(times))
                s["passes"].append(passes)

    result = {"machine": _machine(dev), "config": {"model": cfg.model.name_or_path, "dtype": cfg.model.dtype,
              "weights": cfg.weights.method, "batch_size": cfg.train.batch_size, "max_length": cfg.data.max_length,
              "safety_batch_size": cfg.sap.safety_batch_size, "probe_layers": layers, "backend": type(backend).__name__},
              "repeats": repeats, "steps_per_block": cycle, "methods": {}}
    base_time = statistics.median(samples["sft"]["time"])
    base_mem = statistics.median(samples["sft"]["mem"])
    for name, s in samples.items():
        passes = {k: statistics.median(p.get(k, 0.0) for p in s["passes"]) for k in sorted({k for p in s["passes"] for k in p})}
        step_time = statistics.median(s["time"])
        m, selection = methods[name], selections[name]
        result["methods"][name] = {
            "settings": {"method": selection.name}
                        | {section: asdict(getattr(m, section)) for section in
                           ([selection.method.section] if selection.method.section else []) + [t.section for t in selection.terms]}
                        | ({"probe_layers": probes[name].layer_ids} if probes[name] is not None else {}),
            "step_time_s": step_time, "tokens_per_s": statistics.median(s["tokens"]),
            "peak_memory_mb": statistics.median(s["mem"]), "time_ratio": step_time / base_time,
            "peak_memory_ratio": statistics.median(s["mem"]) / base_mem, "passes_s": passes,
            "mfu": _mfu(model, statistics.median(s["tokens"]), dev),
        }
    result["sap_over_sft_time"] = result["methods"]["sap_default"]["time_ratio"]
    result["sap_over_sft_peak_memory"] = result["methods"]["sap_default"]["peak_memory_ratio"]
    result["lisa_over_sft_time"] = result["methods"]["lisa"]["time_ratio"]
    return result


def _machine(dev: torch.device) -> dict:
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__, "device": str(dev),
            "torch_threads": torch.get_num_threads()}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def _mfu(model, tokens_per_s: float, dev: torch.device) -> float | None:
    """Model FLOP utilisation on a GPU: ~6 N FLOPs per token for full training, ~4 N for
    LoRA (no weight gradients of the base), over the card's dense bf16 peak."""
    if dev.type != "cuda":
        return None
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name(dev)), None)
    if peak is None:
        return None
    n = sum(p.numel() for p in model.parameters())
    full = all(p.requires_grad for p in model.parameters())
    return (6 if full else 4) * n * tokens_per_s / (peak * 1e12)


def format_table(result: dict) -> str:
    lines = [f"{'method':<22}{'s/step':>9}{'x sft':>8}{'tokens/s':>10}{'peak MB':>10}{'x sft':>8}  passes (s)"]
    for name, m in result["methods"].items():
        passes = " ".join(f"{k}={v:.3f}" for k, v in m["passes_s"].items())
        lines.append(f"{name:<22}{m['step_time_s']:>9.3f}{m['time_ratio']:>8.2f}{m['tokens_per_s']:>10.0f}"
                     f"{m['peak_memory_mb']:>10.0f}{m['peak_memory_ratio']:>8.2f}  {passes}")
    lines.append(f"sap_over_sft_time={result['sap_over_sft_time']:.3f}  "
                 f"sap_over_sft_peak_memory={result['sap_over_sft_peak_memory']:.3f}  ({result['machine']['device']}, "
                 f"{result['machine'].get('gpu', str(result['machine']['cpus']) + ' CPUs')}, median of {result['repeats']})")
    return "\n".join(lines)


def _gpu_config(shape: str, overrides: list[str]) -> Config:
    """A config training a random-initialised model of a real Llama shape on the GPU."""
    import tempfile

    from transformers import LlamaConfig

    if not torch.cuda.is_available():
        raise SystemExit("sap-dist bench: the gpu preset needs a CUDA GPU")
    directory = tempfile.mkdtemp(prefix=f"sap-bench-{shape}-")
    LlamaConfig(**GPU_SHAPES[shape], max_position_embeddings=8192).save_pretrained(directory)
    # the embedded tokenizer stands in: token ids only need to be within the vocabulary
    return load_config("quick", [f"model.name_or_path={directory}", "model.dtype=bf16",
                                 "model.attn_implementation=" + ("flash_attention_2" if _has_flash() else "sdpa"),
                                 "train.batch_size=8", "data.max_length=512", "train.tensorboard=false", *overrides])


def _has_flash() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    from sap_dist.help_format import DefaultsHelpFormatter

    parser = argparse.ArgumentParser(prog="sap-dist bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--model", help="model.name_or_path to measure instead of the preset's")
    parser.add_argument("--backend", help="dist.backend (default: the preset's)")
    parser.add_argument("--repeats", type=int, help="measured blocks per method (default: the preset's)")
    parser.add_argument("--out", default="bench.json", help="where to write the results (JSON)")
    parser.add_argument("--candidate", nargs=2, action="append", default=[], metavar=("NAME", "SETTINGS"),
                        help="also measure SETTINGS on top of the config, as NAME (repeatable), in the same "
                             "rotation: SAP's own keys ('sap.key=value ...'), or another method with its own "
                             "('method=anchor anchor.loss=kl')")
    args, overrides = parser.parse_known_args(argv)
    preset = PRESETS[args.preset]
    overrides = preset["overrides"] + [o[2:] if o.startswith("--") else o for o in overrides]
    if args.model:
        overrides.append(f"model.name_or_path={args.model}")
    if args.backend:
        overrides.append(f"dist.backend={args.backend}")

    def configs(cfg: Config) -> dict[str, Config]:
        names = [name for name, _ in args.candidate]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ConfigError(f"--candidate {repeated[0]}: given more than once")
        found = {name: candidate_config(cfg, name, settings) for name, settings in args.candidate}
        methods_for(cfg, found)  # refuses a name the bench already uses
        return found

    results = {}
    try:
        if args.preset == "gpu":
            for shape in GPU_SHAPES:
                cfg = _gpu_config(shape, overrides)
                results[shape] = run_bench(cfg, args.repeats or preset["repeats"], candidates=configs(cfg))
                print(f"[{shape}]\n{format_table(results[shape])}")
            output = {"preset": "gpu", "shapes": results}
        else:
            cfg = load_config(preset["config"], overrides)
            output = {"preset": args.preset} | run_bench(cfg, args.repeats or preset["repeats"], candidates=configs(cfg))
            print(format_table(output))
    except ConfigError as exc:
        print(f"sap-dist bench: error: {exc}", file=sys.stderr)
        return 2
    with open(args.out, "w") as fh:
        json.dump(output, fh, indent=2)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
