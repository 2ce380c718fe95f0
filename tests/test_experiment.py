"""`sap-dist experiment` end to end on the tiny preset (a seeded random 4-layer Llama, a few steps),
and the pieces around it: data preparation (held-out split, poisoning, mixing), aggregation and
the table, settings validation, and the align step's caching."""

from __future__ import annotations

import json
import os
import sys

import pytest

from sap_dist import experiment
from sap_dist.experiment import ExperimentSettings, aggregate, markdown_table, prepare_data, settings_from


def test_prepare_data_split_poison_mix(tmp_path):
    s = ExperimentSettings(task_eval_size=100, poison=0.1, mix_fraction=0.05)
    data = prepare_data(s, str(tmp_path))
    assert data["counts"]["task_train"] == 400
    assert data["counts"]["task_eval"] + data["counts"]["task_eval_duplicates_dropped"] == 100
    assert data["counts"]["poison"] == round(0.1 / 0.9 * 400)

    def read(path):
        with open(path) as fh:
            return [json.loads(line) for line in fh]

    poisoned = read(data["train"]["poisoned"]["plain"])
    clean = read(data["train"]["clean"]["plain"])
    assert len(clean) == 400 and len(poisoned) == 400 + data["counts"]["poison"]
    share = sum(r.get("kind") == "poison" for r in poisoned) / len(poisoned)
    assert share == pytest.approx(0.1, abs=0.005)
    mixed = read(data["train"]["poisoned"]["mix"])
    assert sum(r.get("kind") == "refusal" for r in mixed) / len(mixed) == pytest.approx(0.05, abs=0.005)
    # the held-out task rows are not trained on, and keep their subtask tags
    train_prompts = {r["messages"][0]["content"] for r in clean}
    assert not train_prompts & {r["messages"][0]["content"] for r in data["task_eval"]}
    assert all(r.get("subtask") for r in data["task_eval"])
    # poisoned answers are compliant openers only, on prompts kept apart from the evaluation set
    from sap_dist.eval import load_prompts

    eval_prompts = {r["prompt"] for r in load_prompts("builtin:harmful_eval")}
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    try:
        from harmful_requests import is_opener
    finally:
        sys.path.pop(0)
    for r in poisoned:
        if r.get("kind") == "poison":
            assert is_opener(r["messages"][-1]["content"]) and r["messages"][0]["content"] not in eval_prompts


def test_settings_validation():
    with pytest.raises(ValueError, match="unknown preset"):
        settings_from("huge")
    with pytest.raises(ValueError, match="unknown method"):
        settings_from("quick", methods=["sft", "dpo"])
    with pytest.raises(ValueError, match="unknown experiment setting"):
        settings_from("quick", stepz=3)
    assert settings_from("quick", seeds=[4]).seeds == [4]


def test_aggregate_and_table():
    rows = [{"setting": "poisoned", "method": m, "seed": k, "harmful_score": h, "task_accuracy": 50.0 + k,
             "over_refusal": 0.0, "refusal_rate": 100 - h, "train_time_s": 10.0, "mean_step_time_s": 1.0,
             "model_dir": f"/x/{m}/{k}"}
            for m, hs in (("sft", (60.0, 70.0)), ("sap_paper", (40.0, 50.0))) for k, h in enumerate(hs)]
    summary = aggregate(rows)
    assert summary["poisoned/sft"]["harmful_score"]["mean"] == 65.0
    assert summary["poisoned/sft"]["harmful_score"]["sd"] == pytest.approx(7.07, abs=0.01)
    assert summary["poisoned/sap_paper"]["model_dir"] == ["/x/sap_paper/0", "/x/sap_paper/1"]
    table = markdown_table(summary, {"base": None, "aligned": {"harmful_score": 20.0, "task_accuracy": 1.0,
                                                                "over_refusal": 5.0}}, ExperimentSettings())
    assert "| plain fine-tuning (`sft`) | poisoned p=0.1 | 65.0 ± 7.1 | 50.5 ± 0.7 |" in table
    assert "start point (aligned)" in table and table.count("\n") == 5


def test_tiny_experiment_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out, align_dir = tmp_path / "exp", tmp_path / "aligned"
    argv = ["--preset", "tiny", "--out", str(out), "--align-dir", str(align_dir), "--threads", "1"]
    assert experiment.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    methods = results["methods"]
    assert set(methods) == {"poisoned/sft", "poisoned/sap_paper", "poisoned/sap_reference", "poisoned/mix", "clean/sft"}
    for group in methods.values():
        run = group["runs"][0]
        for key in ("harmful_score", "task_accuracy", "over_refusal", "train_time_s", "model_dir"):
            assert run[key] is not None, key
        assert os.path.exists(os.path.join(run["model_dir"], "adapter_config.json"))
        assert group["harmful_score"]["n"] == 1
    assert methods["poisoned/sap_paper"]["runs"][0]["steps"] == 2
    assert results["align"]["aligned"]["n_prompts"] == 6
    assert os.path.exists(os.path.join(results["start_model"], "config.json"))
    assert (out / "table.md").read_text() == results["table_markdown"]
    for path in results["plots"]:
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    # a second run reuses the aligned model and every finished run
    assert experiment.main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["align"]["reused"] is True
    assert all(r["reused"] for g in again["methods"].values() for r in g["runs"])
    # a trainer override changes the runs' configuration, so they are run again
    assert experiment.main(argv + ["--methods", "sap_paper", "--poison", "0.1", "sap.rho=0.2"]) == 0
    third = json.loads((out / "results.json").read_text())
    assert not third["methods"]["poisoned/sap_paper"]["runs"][0]["reused"]


def test_experiment_cli_errors(tmp_path, capsys):
    assert experiment.main(["--preset", "tiny", "--out", str(tmp_path), "--set", "nonsense=1"]) == 2
    assert "unknown experiment setting" in capsys.readouterr().err
    assert experiment.main(["--preset", "tiny", "--out", str(tmp_path), "--bogus"]) == 2
