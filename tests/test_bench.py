"""`sap-dist bench` measures what it says: every method, the same batches, ratios of medians.
(No timing assertions: speed targets live in the bench's output, not in tests.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sap_dist.tools.bench import format_table, methods_for, run_bench
from sap_dist.config import load_config


def test_methods_compared():
    cfg = load_config("tiny", ["sap.probe_every=4", "sap.probe_batch_fraction=0.5", "sap.variant=reference",
                               "sap.safety_every=2"])
    methods = methods_for(cfg)
    assert methods["sft"].method == "sft"
    assert methods["sap_default"].method == "sap"
    assert (methods["sap_default"].sap.probe_every, methods["sap_default"].sap.variant) == (4, "reference")
    for name in ("sap_paper_exact", "sap_reference_exact"):
        assert methods[name].sap.probe_every == 1 and methods[name].sap.probe_batch_fraction == 1.0
        assert methods[name].sap.safety_every == 1
    assert methods["lisa"].method == "lisa"
    # every registered term, alone and with each method
    assert {"anchor", "sap+anchor", "lisa+anchor", "booster", "booster+anchor"} <= set(methods)


def test_bench_reports_every_method_with_its_passes(tmp_path):
    cfg = load_config("tiny", [f"train.output_dir={tmp_path}", "sap.probe_every=2"])
    result = run_bench(cfg, repeats=2, warmup=0)
    m = result["methods"]
    assert set(m) == {"sft", "sap_default", "sap_paper_exact", "sap_reference_exact", "lisa", "booster", "anchor",
                      "sap+anchor", "lisa+anchor", "booster+anchor"}
    assert set(m["booster"]["passes_s"]) == {"harmful", "train"}
    assert m["sap+anchor"]["settings"]["anchor"]["prompts"] == cfg.anchor.prompts
    # Lisa: every task step charged its share of the alignment phase (the first block has one)
    assert set(m["lisa"]["passes_s"]) == {"align", "train"} and m["lisa"]["passes_s"]["align"] > 0
    assert m["lisa"]["settings"]["lisa"]["task_steps"] == cfg.lisa.task_steps
    assert result["lisa_over_sft_time"] == m["lisa"]["time_ratio"]
    assert set(m["sft"]["passes_s"]) == {"train"}
    assert set(m["sap_paper_exact"]["passes_s"]) == {"safety", "probe_harm", "probe_here", "train"}
    assert set(m["sap_reference_exact"]["passes_s"]) == {"safety", "probe_harm", "train", "probe_update"}
    assert result["steps_per_block"] == 2  # the default refreshes every 2 steps: charged per cycle
    for name, row in m.items():
        assert row["time_ratio"] == pytest.approx(row["step_time_s"] / m["sft"]["step_time_s"])
        assert row["peak_memory_ratio"] == pytest.approx(row["peak_memory_mb"] / m["sft"]["peak_memory_mb"])
        assert row["peak_memory_mb"] > 0 and row["tokens_per_s"] > 0
    assert result["sap_over_sft_time"] == m["sap_default"]["time_ratio"]
    assert "sap_over_sft_time=" in format_table(result)


def test_bench_measures_candidates_in_the_same_rotation(tmp_path):
    """A candidate is SAP with its own settings, its own probe where its layers differ, and its
    ratio over the same run's plain fine-tuning; the config it came from is left untouched."""
    from sap_dist.tools.bench import candidate_config

    cfg = load_config("tiny", [f"train.output_dir={tmp_path}"])
    top = candidate_config(cfg, "top", "sap.probe_layers=[3] sap.safety_every=2 sap.safety_batch_size=2")
    assert cfg.sap.probe_layers == [1, 2] and cfg.sap.safety_every == 1  # not changed in place
    result = run_bench(cfg, repeats=1, warmup=0, candidates={"top": top})
    m = result["methods"]
    assert set(m) == {"sft", "sap_default", "sap_paper_exact", "sap_reference_exact", "lisa", "booster", "anchor",
                      "sap+anchor", "lisa+anchor", "booster+anchor", "top"}
    assert m["top"]["settings"]["probe_layers"] == [3] and m["sap_default"]["settings"]["probe_layers"] == [1, 2]
    assert m["top"]["settings"]["sap"]["safety_every"] == 2 and m["top"]["settings"]["sap"]["safety_batch_size"] == 2
    assert result["steps_per_block"] == 2  # the candidate's safety interval sets the block for every method
    from sap_dist.tools.bench import block_steps, methods_for

    # intervals 2 and 3: a block of 6 steps holds whole cycles of both (not 3, which would give the
    # interval-2 method one or two safety passes per block by turns)
    three = candidate_config(cfg, "three", "sap.safety_every=3")
    assert block_steps(methods_for(cfg, {"top": top, "three": three})) == 6
    assert set(m["top"]["passes_s"]) == {"safety", "probe_harm", "probe_here", "train"}
    assert m["top"]["time_ratio"] == pytest.approx(m["top"]["step_time_s"] / m["sft"]["step_time_s"])


def test_a_candidate_can_be_another_method_with_its_own_settings(tmp_path):
    """`method=NAME` and that method's section make a candidate of any registered method (the KL
    anchor at another weight, say), measured in the same rotation and reported with its settings."""
    from sap_dist.tools.bench import candidate_config

    cfg = load_config("tiny", [f"train.output_dir={tmp_path}"])
    kl = candidate_config(cfg, "anchor_kl", "method=anchor anchor.loss=kl anchor.weight=10")
    assert (kl.method, kl.anchor.loss, kl.anchor.weight) == ("anchor", "kl", 10.0)
    assert (cfg.method, cfg.anchor.loss, cfg.anchor.weight) == ("sap", "mse", 3.0)  # not changed in place
    result = run_bench(cfg, repeats=1, warmup=0, candidates={"anchor_kl": kl})
    row = result["methods"]["anchor_kl"]
    assert row["settings"]["method"] == "sft+anchor" and row["settings"]["anchor"]["loss"] == "kl"
    assert result["methods"]["anchor"]["settings"]["anchor"]["loss"] == "mse"
    assert row["step_time_s"] > 0 and row["time_ratio"] == pytest.approx(row["step_time_s"] / result["methods"]["sft"]["step_time_s"])


@pytest.mark.parametrize("candidate, message", [
    (["top", "train.batch_size=4"], "--candidate top: 'train.batch_size=4' is neither method=NAME nor a setting of a "
                                    "method's own section"),
    (["top", "method=dpo"], "method='dpo': choose a method"),
    (["top", "method=anchor anchor.prompts=0"], "anchor.prompts must be at least 1"),
    (["top", "sap.safety_every=0"], "sap.safety_every must be at least 1"),
    (["top", "sap.probe_layers=[9]"], "sap.probe_layers [9] out of range"),
    (["sft", "sap.safety_every=2"], "--candidate sft: the name of a method the bench always measures"),
    (["top", "sap.safety_every=2", "--candidate", "top", "sap.safety_every=3"], "--candidate top: given more than once"),
])
def test_bench_refuses_a_bad_candidate(tmp_path, candidate, message):
    proc = subprocess.run([sys.executable, "-m", "sap_dist", "bench", "--preset", "tiny", "--repeats", "1",
                           "--out", str(tmp_path / "bench.json"), "--candidate", *candidate],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "bench.json").exists()


def test_bench_command_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "sap_dist", "bench", "--preset", "tiny", "--repeats", "1",
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["preset"] == "tiny" and "sap_over_sft_peak_memory" in data
    assert "sap_paper_exact" in proc.stdout


def _script(name: str, *args: str) -> str:
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "scripts", name), *args], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_probe_rows_bench_times_both_ways():
    """The doubled-rows measurement the README quotes runs and reports both fractions."""
    import re

    lines = [line for line in _script("probe_rows_bench.py", "--config", "tiny", "--repeats", "1").splitlines()
             if line.startswith("probe_batch_fraction=")]
    assert [line.split(" ")[0] for line in lines] == ["probe_batch_fraction=0.25", "probe_batch_fraction=0.5"]
    for line in lines:
        two, one, ratio = map(float, re.search(r"two passes ([\d.]+) s, one pass over doubled rows ([\d.]+) s, "
                                               r"ratio ([\d.]+)", line).groups())
        assert two > 0 and one > 0 and ratio == pytest.approx(one / two, rel=0.05, abs=0.01)


def test_cpu_kernels_digests_per_dtype_and_threads():
    """scripts/cpu_kernels.py (docs/experiment.md, reproducibility) prints one digest line per thread
    count and dtype, and equal inputs give equal digests run to run."""
    first, second = _script("cpu_kernels.py"), _script("cpu_kernels.py")
    lines = [line for line in first.splitlines() if not line.startswith("#")]
    assert [line.split()[1:3] for line in lines] == [["threads=1", "bf16:"], ["threads=1", "fp32:"],
                                                      ["threads=2", "bf16:"], ["threads=2", "fp32:"]]
    digests = [line.split("  matmul ")[0] for line in lines]
    assert digests == [line.split("  matmul ")[0] for line in second.splitlines() if not line.startswith("#")]


def test_probe_variance_reports_every_cosine():
    """The probe-variance measurement the README quotes runs and reports each comparison, with
    cosines in [-1, 1]; on the tiny model (no dropout) two whole-batch estimates agree exactly,
    so a part of the batch is compared against an estimate without noise of its own."""
    import re

    out = _script("probe_variance.py", "--config", "tiny", "--steps", "5", "--threads", "1")
    found = dict(re.findall(r"^(.+): median (-?[\d.]+), min", out, flags=re.M))
    assert set(found) == {"probe: whole batch, other dropout masks", "probe: 0.5 of the rows", "probe: 0.25 of the rows",
                          "safety: pairs of step +1, same weights", "safety: pairs of step +2, same weights",
                          "safety: pairs of step +4, same weights", "safety: direction 1 steps earlier (safety_every=1)",
                          "safety: direction 2 steps earlier (safety_every=2)",
                          "safety: direction 4 steps earlier (safety_every=4)"}
    assert all(-1.0 <= float(v) <= 1.0 for v in found.values())
    assert float(found["probe: whole batch, other dropout masks"]) == pytest.approx(1.0, abs=1e-4)
    assert float(found["probe: 0.25 of the rows"]) < 0.999  # a part of the rows is another estimate
