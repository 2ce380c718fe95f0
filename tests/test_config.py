"""Typed config: YAML + overrides, unknown keys with suggestions, types, round trip."""

from __future__ import annotations

import os
import re

import pytest
import yaml

from sap_dist.config import ConfigError, all_keys, describe, load_config, parse_overrides, save_config


def test_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"sap": {"rho": 0.5, "variant": "reference"}, "train": {"batch_size": 6}}))
    cfg = load_config(str(path), ["sap.rho=0.25", "train.seed=7"])
    assert cfg.sap.rho == 0.25  # the command line wins over the file
    assert cfg.sap.variant == "reference"  # the file wins over the default
    assert cfg.train.batch_size == 6 and cfg.train.seed == 7
    assert cfg.model.name_or_path == "smollm2-135m-instruct"  # untouched default


@pytest.mark.parametrize("override, suggestion", [
    ("sap.rh=1", "sap.rho"),
    ("train.learning_rte=1", "train.learning_rate"),
    ("rho=1", "sap.rho"),  # section forgotten
    ("data.probe_layers=[1]", "sap.probe_layers"),  # wrong section
])
def test_unknown_key_names_it_and_suggests(override, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    key = override.split("=")[0]
    assert repr(key) in str(err.value) and repr(suggestion) in str(err.value)


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sap:\n  variantt: paper\n")
    with pytest.raises(ConfigError, match=r"'sap.variantt' in .*bad.yaml; did you mean 'sap.variant'"):
        load_config(str(path))


@pytest.mark.parametrize("override, message", [
    ("sap.rho=abc", "expected float"),
    ("train.batch_size=2.5", "expected an integer"),
    ("sap.variant=papr", "did you mean 'paper'"),
    ("train.tensorboard=maybe", "expected true or false"),
    ("train.batch_size=0", "at least 1"),
    ("sap.rho=-1", "must be positive"),
    ("sap.safety_every=0", "sap.safety_every must be at least 1"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_lists_dicts_and_null_from_the_command_line():
    cfg = load_config(None, ["sap.probe_layers=1,5", "data.task_columns={output: answer}",
                             "weights.target_modules=[q_proj, k_proj]", "train.max_steps=null"])
    assert cfg.sap.probe_layers == [1, 5]
    assert cfg.data.task_columns == {"output": "answer"}
    assert cfg.weights.target_modules == ["q_proj", "k_proj"]
    assert cfg.train.max_steps is None


def test_override_syntaxes():
    assert parse_overrides(["--sap.rho", "0.1", "--train.seed=3", "model.dtype=fp32"]) == [
        "sap.rho=0.1", "train.seed=3", "model.dtype=fp32"]
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--sap.rho"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("tiny", ["sap.variant=reference", "data.task_columns={output: answer}"])
    save_config(cfg, str(tmp_path / "config.yaml"))
    assert load_config(str(tmp_path / "config.yaml")) == cfg


def test_presets_load_and_missing_file_is_named():
    for preset in ("quick", "tiny"):
        load_config(preset)
    with pytest.raises(ConfigError, match="nope.yaml.*not found.*quick"):
        load_config("nope.yaml")


def test_every_field_is_documented():
    text = describe()
    for key in all_keys():
        assert key in text
    # every key line is followed by its docstring line
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^  \w+\.\w+ = ", line):
            assert lines[i + 1].startswith("      "), f"no docstring for {line.strip()}"


@pytest.mark.parametrize("override, message", [
    ("data.task_limit=0", "data.task_limit must be at least 1"),
    ("data.max_length=5", "data.max_length must exceed 8"),
    ("data.safety_max_length=8", "data.safety_max_length must exceed 8"),
    ("weights.lora_dropout=2", r"weights.lora_dropout is a probability and must be in \[0, 1\), got 2"),
])
def test_out_of_range_values_are_refused_by_validate(override, message):
    """These raised a ValueError deep inside data loading or peft (a traceback) before."""
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _repo_text_files():
    for top in ("sap_dist", "docs", "scripts", "slurm", "configs", "README.md"):
        path = os.path.join(REPO, top)
        if os.path.isfile(path):
            yield path
        for root, _, files in os.walk(path):
            yield from (os.path.join(root, f) for f in files if f.endswith((".py", ".md", ".yaml", ".sh")))


def test_code_and_docs_cite_only_files_in_the_repository():
    """They cited shared/SAP.md and shared/PILOT.md, which a clone does not have."""
    cited = re.compile(r"(?<![\w/.])shared/[\w./-]+")
    bad = {}
    for path in _repo_text_files():
        with open(path, encoding="utf-8") as fh:
            hits = cited.findall(fh.read())
        if hits:
            bad[path] = hits
    assert not bad
    assert os.path.exists(f"{REPO}/docs/pilot.md") and os.path.exists(f"{REPO}/docs/SAP.md")


def test_readme_lists_every_config_section():
    import dataclasses

    from sap_dist.config import Config

    with open(f"{REPO}/README.md", encoding="utf-8") as fh:
        line = next(x for x in fh if x.startswith("A config file has the sections"))
    assert all(f"`{f.name}`" in line for f in dataclasses.fields(Config)), line


def test_flags_from_other_trainers_map_or_are_refused_with_the_reason():
    """--model x suggested model.dtype; --per_device_train_batch_size was suggested as the global
    train.batch_size, a different quantity."""
    assert load_config("tiny", parse_overrides(["--model", "some/model"])).model.name_or_path == "some/model"
    assert load_config("tiny", parse_overrides(["--model_name_or_path", "x"])).model.name_or_path == "x"
    with pytest.raises(ConfigError, match="per_device_train_batch_size is not a sap-dist key: train.batch_size is "
                                          "the global batch"):
        load_config("tiny", parse_overrides(["--per_device_train_batch_size", "4"]))
