"""The `sap-dist` console: dry run of a config, --version, --help that says what it does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from sap_dist.cli import main
from sap_dist.config import load_config, preset_names

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_dry_run_prints_the_resolved_config(capsys, tmp_path):
    """`sap-dist config` printed only the built-in defaults, whatever --config said."""
    assert main(["config", "--config", "tiny", "train.max_steps=7", "--sap.rho", "0.25"]) == 0
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(capsys.readouterr().out)
    assert load_config(str(resolved)) == load_config("tiny", ["train.max_steps=7", "sap.rho=0.25"])
    assert main(["config", "--config", "tiny", "sap.rh=1"]) == 2  # fails like a run would
    assert "did you mean 'sap.rho'" in capsys.readouterr().err


def test_config_at_a_world_size_prints_the_batches_each_rank_gets(capsys, tmp_path):
    """The 70B recipe on 4 nodes x 8 GPUs: 16 probe rows and 16 pairs for 32 ranks are rounded
    to 32 (one per rank), said in comments that leave the printed config loadable."""
    assert main(["config", "--config", os.path.join(REPO, "configs", "sap_70b.yaml"), "--world-size", "32"]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("#")]
    assert notes[0] == ("# at 32 ranks: train.batch_size 32 (1 per rank), probe rows 32 (1 per rank), "
                        "safety pairs 32 (1 per rank); backend zero3"), notes
    assert any("sap.probe_batch_fraction=0.5 of train.batch_size=32 gives 16" in n for n in notes)
    assert any("sap.safety_batch_size=16 rounded up to a multiple of the 32 ranks" in n for n in notes)
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(out)
    assert load_config(str(resolved)) == load_config(os.path.join(REPO, "configs", "sap_70b.yaml"))


@pytest.mark.parametrize("args, message", [
    (["--config", "tiny", "--world-size", "8"], "train.batch_size=4 is a global batch size and must divide evenly over "
                                                "the 8 ranks"),
    (["--config", "tiny", "--world-size", "2", "dist.backend=single"], "dist.backend=single cannot run in 2 processes"),
    (["--config", "tiny", "--world-size", "2", "dist.backend=zero4"], "unknown backend 'zero4' (dist.backend)"),
    (["--config", "tiny", "--world-size", "2", "dist.backend=zero3", "dist.deepspeed_config=missing.json"],
     "dist.deepspeed_config missing.json: cannot read it"),
    (["--config", "tiny", "--world-size", "2", "train.max_steps=2", "sap.probe_every=3"],
     "sap.probe_every=3 is more than the run's 2 steps"),
    (["--config", "tiny", "--world-size", "0"], "the world size must be at least 1"),
])
def test_config_at_a_world_size_refuses_what_the_trainer_refuses_in_one_line(capsys, args, message):
    assert main(["config", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_config_key_list_prints_types_by_name(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "  (float)" in out and "  (int)" in out and "<class" not in out


def test_config_into_a_closed_pipe_is_quiet():
    """`sap-dist config | head` ended with a BrokenPipeError traceback."""
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run(f"{sys.executable} -m sap_dist.cli config | head -1", shell=True, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[model]" and proc.stderr == ""


def test_version(capsys):
    from sap_dist import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sap-dist {__version__}"


@pytest.mark.parametrize("command", ["eval", "align", "plan", "bench", "check-equivalence"])
def test_help_shows_defaults(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "(default: " in capsys.readouterr().out


def test_train_help_says_how_to_set_keys_and_names_real_presets(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "section.key=value" in out and "--section.key value" in out and "sap-dist config" in out
    assert f"({', '.join(preset_names())})" in out and "smoke" not in out


def test_every_subcommand_keeps_third_party_noise_off_the_console(tmp_path):
    """`sap-dist eval` (like bench, align, experiment) printed bitsandbytes' kernels message and
    transformers' FutureWarnings on every run; only `train` filtered them."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("Tell me a joke.\n")
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    env.pop("SAP_DIST_VERBOSE", None)
    run = tmp_path / "run"  # an adapter: loading it imports peft, and with it bitsandbytes
    trained = subprocess.run([sys.executable, "-m", "sap_dist.train", "--config", "tiny", f"train.output_dir={run}",
                              "train.progress_bar=false", "train.max_steps=1", "method=sft"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-2000:]
    cmd = [sys.executable, "-m", "sap_dist.cli", "eval", "--adapter", str(run), "--harmful-prompts",
           str(prompts), "--max-new-tokens", "2", "--out", str(tmp_path / "r.json")]
    quiet = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    loud = subprocess.run(cmd, env={**env, "SAP_DIST_VERBOSE": "1"}, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == loud.returncode == 0, quiet.stderr[-2000:]
    assert "FutureWarning" in loud.stderr or "gemm_4bit_forward" in loud.stderr  # there is noise to hide
    assert "FutureWarning" not in quiet.stderr and "gemm_4bit_forward" not in quiet.stderr, quiet.stderr


@pytest.mark.parametrize("command", ["judge", "eval", "align", "experiment"])
def test_a_checkpoint_for_a_judge_that_loads_none_stops_in_one_line(command, tmp_path, capsys):
    """`--judge-model` only means something to the model judges: given to another, every command
    that judges stops before any work, with one line and exit 2, and writes nothing."""
    out = tmp_path / "out"
    args = {"judge": [str(tmp_path / "answers.jsonl"), "--out", str(out / "v.jsonl")],
            "eval": ["--out", str(out / "eval.json")], "align": ["--out", str(out)],
            "experiment": ["--out", str(out)]}[command]
    (tmp_path / "answers.jsonl").write_text('{"prompt": "Can you help me hack?", "answer": "No."}\n')
    assert main([command, *args, "--judge", "keyword", "--judge-model", "/models/guard"]) == 2
    err = capsys.readouterr().err.strip()
    assert "judge 'keyword' loads no checkpoint" in err and len(err.splitlines()) == 1, err
    assert not out.exists()
