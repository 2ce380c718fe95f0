"""The method registry (`sap_dist/methods/`): every registered method and term is found by the
config, the trainer, the bench, check-equivalence and the experiment, trains on every backend
as one process does, and resumes mid-run exactly. Plus the safety anchor's own mathematics."""

from __future__ import annotations

import math
import os
import pkgutil
import shutil
import subprocess
import sys

import pytest
import torch

from sap_dist import methods as registry
from sap_dist.config import ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ["single", "ddp", "zero2", "zero3", "fsdp2"]


def every_method() -> list[str]:
    """Each method alone and each term with each method (plain fine-tuning's is the term alone)."""
    return list(registry.methods()) + [f"{m}+{t}" if m != "sft" else t
                                       for t in registry.terms() for m in registry.methods()]


def covering_cases() -> list[tuple[str, list[str]]]:
    """The fewest runs that take every registered method's step and every term's through a
    run, with their extra overrides: each method once, every method but plain fine-tuning with
    every term attached (a term alone is plain fine-tuning's step plus the term, both covered
    here). The last case with terms runs the anchor's KL variant, so both of its losses are covered."""
    terms = "+".join(registry.terms())
    cases = [(m if m == "sft" else f"{m}+{terms}", []) for m in registry.methods()]
    [with_terms for with_terms in cases if "+" in with_terms[0]][-1][1].append("anchor.loss=kl")
    return cases


def test_every_module_declares_a_method_or_a_term():
    package = os.path.join(REPO, "sap_dist", "methods")
    modules = [m.name for m in pkgutil.iter_modules([package]) if m.name != "common"]
    declared = {m: getattr(__import__(f"sap_dist.methods.{m}", fromlist=["_"]), "METHOD", None) or
                getattr(__import__(f"sap_dist.methods.{m}", fromlist=["_"]), "TERM", None) for m in modules}
    assert all(declared.values()), declared
    assert set(registry.methods()) | set(registry.terms()) == {d.name for d in declared.values()}
    assert {"sft", "sap", "lisa"} <= set(registry.methods()) and "anchor" in registry.terms()


def test_the_method_key_selects_from_the_registry():
    assert load_config("tiny").method == "sap"
    for name in every_method():
        assert load_config("tiny", [f"method={name}"]).method == (name if "+" in name or name in registry.methods()
                                                                 else f"sft+{name}")
    selection = registry.select("lisa+anchor")
    assert selection.method.name == "lisa" and [t.name for t in selection.terms] == ["anchor"]
    with pytest.raises(ConfigError, match=r"sap\.method in command line: replaced by the top-level key `method`"):
        load_config("tiny", ["sap.method=lisa"])
    with pytest.raises(ConfigError, match="choose a method"):
        load_config("tiny", ["method=sap+sap"])
    with pytest.raises(ConfigError, match="anchor.prompts must be at least 1"):
        load_config("tiny", ["method=anchor", "anchor.prompts=0"])
    # each method's and term's section is a config section of its own
    cfg = load_config("tiny")
    for section, cls, _ in registry.sections():
        assert isinstance(getattr(cfg, section), cls)


def test_bench_equivalence_and_experiment_read_the_registry():
    from sap_dist.tools.bench import methods_for
    from sap_dist.tools.equivalence import cases_of
    from sap_dist.experiment import METHOD_LABELS, METHODS

    cfg = load_config("tiny")
    benched = {m.method for m in methods_for(cfg).values()}
    assert set(every_method()) <= benched
    for entry in list(registry.methods().values()) + list(registry.terms().values()):
        for name, (label, overrides) in entry.experiment.items():
            assert METHODS[name] == overrides and METHOD_LABELS[name] == label
            assert registry.select(overrides["method"])  # each experiment method names a registered one
    assert cases_of(["sap", "sap+anchor", "lisa"], ["paper", "reference"]) == [
        "paper", "reference", "sap+anchor/paper", "sap+anchor/reference", "lisa"]


def test_every_method_matches_one_process_on_every_backend(tmp_path):
    """Every registered method and term (`covering_cases`), one process on each of the five
    backends (their own code paths: DDP's reducer, ZeRO's partitioned gradients, FSDP2's sharded
    parameters), trains what the plain one-process run trains: at every step the same task
    loss, global gradient norm and anchor loss, within 1e-5 relative (fp32 sums of a few hundred
    terms in another order: 1e-7 seen). The gradient norm is the one the optimizer clips: a
    backend that dropped or doubled a term's backward would show it at once (at
    anchor.weight=300 the anchor takes step 2's norm from 2.8 to 641). The weights themselves
    are compared element by element in tests/test_equivalence.py; here, Adam's per-element
    normalisation turns near-cancelling LoRA-A gradients' rounding into differences of up to
    1.6e-4 of the weights' scale on ZeRO-3 (Lisa at its defaults), in every step's direction
    alike."""
    import json

    from sap_dist.tools.equivalence import cases_of, main

    compared = ("task_loss", "grad_norm", "anchor_mse", "anchor_kl", "align_loss", "safety_loss")
    # KL(p_start || p) = sum p_start log p_start - sum p_start log p: two sums of the entropy's size
    # (at most log V) that cancel to a small KL, so its fp32 rounding is absolute, ~log V * 2^-24 each
    floor = {"anchor_kl": math.log(49152) * 2 ** -23}  # V: the embedded tokenizer's vocabulary
    for case, extra in covering_cases():
        work = tmp_path / case.replace("+", "-")
        assert main(["--backends", ",".join(BACKENDS), "--methods", case, "--variants", "paper",
                     "--settings", "exact", "--nproc", "1", "--steps", "3", "--no-noise-floor",
                     "--work-dir", str(work), "anchor.weight=300", *extra]) in (0, 1)
        folder = cases_of([case], ["paper"])[0].replace("/", "-")  # as check-equivalence names the runs
        rows = {}
        for backend in BACKENDS:
            path = work / f"{backend}-{folder}" / "metrics.jsonl"
            assert path.exists(), (case, backend, (work / f"{backend}-{folder}.log").read_text()[-3000:])
            rows[backend] = [json.loads(line) for line in path.read_text().splitlines()]
        want = rows["single"]
        anchor_key = "anchor_kl" if "anchor.loss=kl" in extra else "anchor_mse"
        assert len(want) == 3 and ("anchor" not in case or want[1][anchor_key] > 0)
        for backend in BACKENDS[1:]:
            got = rows[backend]
            assert len(got) == len(want), (case, backend)
            for g, w in zip(got, want):
                for key in (k for k in compared if k in w):
                    scale = max(abs(r[key]) for r in want if key in r)  # the anchor loss is 0 at step 1
                    assert abs(g[key] - w[key]) <= 1e-5 * scale + floor.get(key, 0.0), (
                        case, backend, w["step"], key, g[key], w[key])


COMMON = ["--config", "tiny", "train.progress_bar=false", "train.tensorboard=false", "weights.lora_dropout=0.1",
          "train.max_steps=4", "checkpoint.every_steps=2", "lisa.align_steps=1", "lisa.task_steps=3",
          "sap.safety_every=3", "anchor.weight=30"]


def _train(out, method: str, *extra: str) -> None:
    cmd = [sys.executable, "-m", "sap_dist.train", *COMMON, f"method={method}", f"train.output_dir={out}", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": REPO},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("method,extra", covering_cases(), ids=[c for c, _ in covering_cases()])
def test_every_method_resumes_mid_run_exactly(method, extra, tmp_path):
    """Stopped after step 2 (mid-cycle for Lisa and SAP's stored direction, with a term's
    targets in the checkpoint) and resumed, every method and term (`covering_cases`) ends
    bitwise equal to the run that was never stopped, its metrics rows included (dropout on: the
    RNG state is restored too)."""
    from safetensors.torch import load_file

    ref = tmp_path / "ref"
    _train(ref, method, *extra)
    out = tmp_path / "resumed"
    shutil.copytree(ref, out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    for name in ("adapter_model.safetensors", "summary.json"):
        os.remove(out / name)
    _train(out, method, *extra, "checkpoint.resume_from=auto")
    got, want = load_file(out / "adapter_model.safetensors"), load_file(ref / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("time_", "step_time", "tokens_per_s"))}  # noqa: E731
                          for r in rows]
    import json

    rows = [[json.loads(line) for line in open(d / "metrics.jsonl")] for d in (out, ref)]
    assert strip(rows[0]) == strip(rows[1])
    assert json.load(open(out / "summary.json"))["resumed_from"].endswith("step-00000002")


# ------------------------------------------------------------------------------------------
# The safety anchor's mathematics


@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_anchor_loss_and_gradient_match_a_hand_computation(loss):
    """The anchor term backpropagates weight * mean((h - h_start)^2) over anchors, positions
    and hidden units, h the final hidden state at the last prompt tokens (`mse`), or weight *
    mean KL(p_start || p) of the next-token distributions there (`kl`): its gradient equals
    autograd of that formula written out here, one prompt at a time, and it is zero at the start
    weights (mse; kl's loss)."""
    from sap_dist.backends.single import SingleBackend
    from sap_dist.backends.common import OptimizerSpec
    from sap_dist.methods import RunSetup
    from sap_dist.methods.anchor import AnchorConfig, anchor_prompts, build
    from sap_dist.models import load_model

    cfg = load_config("tiny", ["weights.lora_dropout=0", "model.dtype=fp32"])
    model = load_model(cfg.model, cfg.weights, seed=0)
    backend = SingleBackend(model, OptimizerSpec(lr=1e-3))
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    pairs = [{"harmful": {"input_ids": p + [3, 4], "labels": [-100] * len(p) + [3, 4]}} for p in prompts]
    anchor = AnchorConfig(weight=2.0, prompts=3, positions=2, loss=loss)
    state, apply = build(anchor, RunSetup(backend, safety_pairs=pairs, pad_id=0, seed=0))
    config = model.get_base_model().config
    assert state.targets.shape == (3, 2, config.hidden_size if loss == "mse" else config.vocab_size)

    backend.zero_grad()
    metrics = {}
    apply(backend, metrics)
    assert metrics[f"anchor_{loss}"] == 0.0  # the start weights reproduce their own targets
    if loss == "mse":  # kl's gradient at the start is p * (sum(p) - 1): the rounding of a sum of 49k terms
        assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters() if p.requires_grad)

    with torch.no_grad():  # move the trained weights, then compare with the formula by hand
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    backend.zero_grad()
    apply(backend, metrics)
    got = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    losses = []
    for k, prompt in enumerate(anchor_prompts(pairs, 3, seed=0)):
        out = model(input_ids=torch.tensor([prompt]), output_hidden_states=True)
        if loss == "mse":
            losses.append(((out.hidden_states[-1][0, -2:] - state.targets[k]) ** 2).mean())
        else:
            start, now = state.targets[k], torch.log_softmax(out.logits[0, -2:], dim=-1)
            losses.append((start.exp() * (start - now)).sum(-1).mean())
    assert metrics[f"anchor_{loss}"] == pytest.approx(float(torch.stack(losses).mean()), rel=1e-4)
    (anchor.weight * torch.stack(losses).mean()).backward()
    want = [p.grad for p in model.parameters() if p.requires_grad]
    scale = max(float(w.abs().max()) for w in want)
    assert scale > 0
    # one padded batch against one prompt at a time: float32 sums in another order
    assert max(float((g - w).abs().max()) for g, w in zip(got, want)) <= 1e-4 * scale


def test_anchor_prompts_are_distinct_harmful_prompts_and_too_few_is_refused():
    from sap_dist.methods.anchor import anchor_batch, anchor_prompts

    pairs = [{"harmful": {"input_ids": [1, 2, 9], "labels": [-100, -100, 9]}},
             {"harmful": {"input_ids": [1, 2, 8], "labels": [-100, -100, 8]}},  # the same prompt again
             {"harmful": {"input_ids": [3, 4, 5, 7], "labels": [-100, -100, -100, 7]}}]
    assert sorted(anchor_prompts(pairs, 2, seed=0)) == [[1, 2], [3, 4, 5]]
    with pytest.raises(ConfigError, match="only 2 distinct prompts"):
        anchor_prompts(pairs, 3, seed=0)
    batch, index = anchor_batch([[1, 2], [3, 4, 5]], 2, pad_id=0, device="cpu")
    assert batch["input_ids"].tolist() == [[1, 2, 0], [3, 4, 5]]
    assert index.tolist() == [[0, 1], [1, 2]]
    with pytest.raises(ConfigError, match="anchor.positions=3: the shortest anchor prompt has 2 tokens"):
        anchor_batch([[1, 2], [3, 4, 5]], 3, pad_id=0, device="cpu")


# ------------------------------------------------------------------------------------------
# Booster's mathematics


def _mean_nll(model, b) -> torch.Tensor:
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    labels = b["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum") / (labels != -100).sum()


def test_booster_gradient_matches_a_hand_computation():
    """The gradient Booster's step hands the optimizer is grad f(W) + lambda * grad h(W) -
    lambda * grad h(W - alpha * g/|g|), g = grad h(W), h the harmful twins' mean NLL and f the
    task's: autograd of the three losses written out here, one at a time. The weights the step
    perturbed are restored bitwise before the task pass (the step's own gradient is captured by
    an add-on term, which runs just before the optimizer step)."""
    from sap_dist.backends.common import OptimizerSpec
    from sap_dist.backends.single import SingleBackend
    from sap_dist.methods.booster import BoosterConfig, booster_step
    from helpers import batch, safety_batch, tiny_lora_model, tokens_of, trained

    model = tiny_lora_model()
    backend = SingleBackend(model, OptimizerSpec(lr=1e-3))
    task, safety = batch(1), safety_batch(2)
    cfg = BoosterConfig(lamb=2.0, alpha=0.05)
    start = [p.detach().clone() for p in trained(model)]
    seen: dict = {}

    def capture(backend, metrics):
        seen["grad"] = [p.grad.clone() for p in trained(model)]
        seen["weights"] = [p.detach().clone() for p in trained(model)]

    metrics = booster_step(backend, task, tokens_of(task), safety, cfg, [capture])
    assert all(torch.equal(w, s) for w, s in zip(seen["weights"], start))  # restored before the task pass

    with torch.no_grad():
        for p, s in zip(trained(model), start):
            p.copy_(s)
    harmful = {k: v[2:] for k, v in safety.items()}  # the harmful twins
    g_h = torch.autograd.grad(_mean_nll(model, harmful), trained(model))
    norm = torch.sqrt(sum((g ** 2).sum() for g in g_h))
    assert metrics["harmful_grad_norm"] == pytest.approx(float(norm), rel=1e-5)
    with torch.no_grad():
        for p, g in zip(trained(model), g_h):
            p.sub_(cfg.alpha * g / norm)
    g_moved = torch.autograd.grad(_mean_nll(model, harmful), trained(model))
    with torch.no_grad():
        for p, s in zip(trained(model), start):
            p.copy_(s)
    g_f = torch.autograd.grad(_mean_nll(model, task), trained(model))
    want = [f + cfg.lamb * (h - m) for f, h, m in zip(g_f, g_h, g_moved)]
    # Each element is a sum of three gradients that may nearly cancel (h and m differ by one
    # small step), each from fp32 sums of a few hundred products ordered otherwise here (the
    # step keeps only the response positions' logits and normalises over the global batch):
    # a few float32 epsilons of the terms' own size, not of the result's.
    size = max(float((f.abs() + cfg.lamb * (h.abs() + m.abs())).max()) for f, h, m in zip(g_f, g_h, g_moved))
    assert max(float((g - w).abs().max()) for g, w in zip(seen["grad"], want)) <= 64 * 2 ** -24 * size
    assert metrics["harmful_drop"] > 0  # a step down the harmful gradient lowers the harmful loss
