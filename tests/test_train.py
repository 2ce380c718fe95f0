"""The trainer end to end: output directory, reload, entrypoints, and its bad-input paths."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sap_dist.config import ConfigError, load_config
from sap_dist.metrics import read_metrics
from sap_dist.train import TrainingStopped, main, run, train_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(tmp_path, *overrides):
    return load_config("tiny", [f"train.output_dir={tmp_path}", "train.progress_bar=false", *overrides])


@pytest.mark.parametrize("method", ["sft", "sap-paper", "sap-reference"])
def test_tiny_run_writes_the_output_directory(tmp_path, method):
    name, _, variant = method.partition("-")
    cfg = tiny(tmp_path, f"method={name}", f"sap.variant={variant or 'paper'}", "train.tensorboard=true")
    summary = run(cfg)
    for f in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "config.yaml",
              "metrics.jsonl", "summary.json"):
        assert os.path.exists(tmp_path / f), f
    assert os.listdir(tmp_path / "tensorboard")
    assert load_config(str(tmp_path / "config.yaml")) == cfg  # the resolved config, complete
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["task_loss"] > 0 and r["step_time"] > 0 and r["tokens_per_s"] > 0
        if name == "sap":
            assert r["safety_grad_norm"] > 0 and "probe_norm" in r and "safety_loss" in r
            assert r["perturb_norm_realized"] == pytest.approx(r["perturb_norm_intended"], rel=1e-3)
    assert summary["steps"] == 3 and summary["status"] == "completed"
    assert json.loads((tmp_path / "summary.json").read_text())["tokens_seen"] == summary["tokens_seen"] > 0
    assert os.path.exists(tmp_path / "probe.pt") == (name == "sap")


def test_sap_and_sft_train_differently(tmp_path):
    """Same seed and data: the probe must change the weights SAP ends with."""
    run(tiny(tmp_path / "sft", "method=sft"))
    run(tiny(tmp_path / "sap", "method=sap", "sap.probe_relative_size=0.5"))
    a = load_file(str(tmp_path / "sft" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "sap" / "adapter_model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "sap"])
def test_embedded_model_trains_and_reloads_to_the_same_logits(tmp_path, method):
    from sap_dist.models import load_trained

    cfg = load_config("quick", [f"train.output_dir={tmp_path}", "train.progress_bar=false", f"method={method}",
                                "train.max_steps=2", "train.batch_size=2", "sap.safety_batch_size=2",
                                "data.max_length=64", "data.safety_max_length=64", "train.tensorboard=false"])
    result = train_model(cfg)
    assert result.summary["steps"] == 2
    rows = read_metrics(str(tmp_path))
    assert len(rows) == 2 and all(r["task_loss"] > 0 for r in rows)
    ids = result.tokenizer("The capital of France is", return_tensors="pt").input_ids
    trained = result.model.eval()
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        got = load_trained(str(tmp_path), cfg.model)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the base as other programs find it (peft wrote this machine's cache path), sap-dist's name beside it
    if (tmp_path / "adapter_config.json").exists():
        adapter = json.loads((tmp_path / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    info = json.loads((tmp_path / "sap_dist_model.json").read_text())
    assert info["name_or_path"] == "smollm2-135m-instruct"
    assert info["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_weights(tmp_path, capsys):
    # a temperature of 1e-40 makes the logsigmoid safety loss overflow as soon as a batch's margin
    # favours the harmful answer (a huge learning rate now stops earlier, on the weights' norm)
    overrides = ["sap.safety_loss=logsigmoid", "sap.temperature=1e-40", "train.max_steps=10"]
    cfg = tiny(tmp_path, *overrides)
    with pytest.raises(TrainingStopped, match=r"step \d+: safety loss is (nan|inf)") as err:
        run(cfg)
    failed = int(re.search(r"step (\d+)", str(err.value)).group(1))
    assert 1 <= failed < 10  # with the bundled pairs the first batch already overflows: the last good weights are the initial ones
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "stopped_nonfinite" and summary["steps"] == failed - 1
    assert len(read_metrics(str(tmp_path))) == failed - 1  # every finished step logged, none after
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())  # the failing update was not applied
    assert main(["--config", "tiny", f"train.output_dir={tmp_path}/again", "train.progress_bar=false",
                 *overrides]) == 3
    assert f"step {failed}" in capsys.readouterr().err


def test_weights_that_overflow_stop_the_run_without_saving_them(tmp_path):
    """learning_rate=1e30 overflowed the weights on step 1 and trained 3 steps of nothing, then
    said `completed`."""
    with pytest.raises(TrainingStopped, match=r"step 1: the weights are no longer finite.*learning_rate=1e\+30"):
        run(tiny(tmp_path, "train.learning_rate=1e30"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps"] == 1
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_probe_layer_out_of_range_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"sap.probe_layers \[7\] out of range: the model has 4 decoder layers"):
        run(tiny(tmp_path, "sap.probe_layers=[1,7]"))


def test_an_existing_run_is_not_overwritten(tmp_path):
    run(tiny(tmp_path, "method=sft", "train.max_steps=1"))
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run.*train.overwrite=true"):
        run(tiny(tmp_path, "method=sft", "train.max_steps=2"))
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert len(read_metrics(str(tmp_path))) == 1
    run(tiny(tmp_path, "method=sft", "train.max_steps=2", "train.overwrite=true"))
    assert len(read_metrics(str(tmp_path))) == 2  # replaced, not appended


def test_overwrite_leaves_only_the_new_runs_files(tmp_path):
    """A full-weights run replaced by a LoRA run: no old model.safetensors/config.json (transformers
    would load them as the base under the new adapter) and no old TensorBoard events remain."""
    out, fresh = tmp_path / "run", tmp_path / "fresh"
    run(tiny(out, "method=sft", "train.max_steps=1", "weights.method=full", "train.tensorboard=true"))
    assert (out / "model.safetensors").exists()
    run(tiny(out, "method=sft", "train.max_steps=1", "train.tensorboard=true", "train.overwrite=true"))
    run(tiny(fresh, "method=sft", "train.max_steps=1", "train.tensorboard=true"))
    assert sorted(os.listdir(out)) == sorted(os.listdir(fresh))
    assert len(os.listdir(out / "tensorboard")) == 1


def test_overwrite_refuses_a_directory_with_foreign_files(tmp_path):
    run(tiny(tmp_path, "method=sft", "train.max_steps=1"))
    (tmp_path / "notes.txt").write_text("mine")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ConfigError, match="not a sap-dist run's \\(notes.txt\\)"):
        run(tiny(tmp_path, "method=sft", "train.max_steps=1", "train.overwrite=true"))
    assert sorted(os.listdir(tmp_path)) == before  # nothing deleted


@pytest.mark.parametrize("where", ["a file", "under a file", "unwritable"])
def test_an_output_dir_that_cannot_be_written_is_one_line(tmp_path, where, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory")
    out = {"a file": blocker, "under a file": blocker / "run", "unwritable": tmp_path / "locked" / "run"}[where]
    if where == "unwritable" and os.geteuid() == 0:
        out = "/sys/sap-dist-test/run"  # root may write anywhere but to sysfs (PermissionError)
    elif where == "unwritable":
        (tmp_path / "locked").mkdir(mode=0o500)
    assert main(["--config", "tiny", f"train.output_dir={out}", "train.progress_bar=false"]) == 2
    err = capsys.readouterr().err
    assert f"train.output_dir {out}: cannot write the run there" in err and "Traceback" not in err
    assert blocker.read_text() == "not a directory"


def test_ctrl_c_checkpoints_at_the_step_boundary_like_sigterm(tmp_path):
    """Ctrl-C printed a KeyboardInterrupt traceback, wrote no checkpoint, and the leftover
    metrics.jsonl then blocked the same command."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sap_dist.train", "--config", "tiny", f"train.output_dir={tmp_path}",
           "train.progress_bar=false", "train.max_steps=200"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGINT" in err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["last_checkpoint"]
    assert os.path.isdir(summary["last_checkpoint"])  # resumable like a SIGTERM'd run (test_reliability)


def test_saved_files_follow_the_umask(tmp_path):
    """transformers wrote model.safetensors 0600: colleagues on a shared filesystem could not read it."""
    import stat

    old = os.umask(0o022)
    try:
        run(tiny(tmp_path, "method=sft", "train.max_steps=1", "weights.method=full"))
    finally:
        os.umask(old)
    modes = {f: stat.S_IMODE(os.stat(tmp_path / f).st_mode) for f in os.listdir(tmp_path) if (tmp_path / f).is_file()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_truncation_is_reported_before_training(tmp_path, capsys):
    """The tiny preset truncates some task rows and safety pairs: that was only in summary.json."""
    summary = run(tiny(tmp_path, "train.max_steps=1"))
    err = capsys.readouterr().err
    assert summary["task_truncated"] > 0 and summary["safety_truncated"] > 0  # there is something to say
    assert (f"builtin:task: {summary['task_examples']} examples, {summary['task_truncated']} truncated, 0 dropped "
            f"(data.max_length=64)") in err
    assert f"{summary['safety_truncated']} truncated" in err and "(data.truncation=truncate)" in err


def test_third_party_noise_is_kept_off_the_console_unless_verbose(tmp_path):
    """Every run printed bitsandbytes' kernels message and a transformers FutureWarning."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    env.pop("SAP_DIST_VERBOSE", None)
    cmd = [sys.executable, "-m", "sap_dist.train", "--config", "tiny", "train.progress_bar=false", "train.max_steps=1"]
    quiet = subprocess.run(cmd + [f"train.output_dir={tmp_path}/quiet"], env=env, capture_output=True, text=True, timeout=300)
    loud = subprocess.run(cmd + [f"train.output_dir={tmp_path}/loud", "--verbose"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert quiet.returncode == loud.returncode == 0, quiet.stderr[-2000:]
    assert "FutureWarning" in loud.stderr  # this environment has some to hide
    assert "FutureWarning" not in quiet.stderr and "gemm_4bit_forward" not in quiet.stderr, quiet.stderr


@pytest.mark.parametrize("verbose", [False, True])
def test_deepspeed_accelerator_line_is_kept_off_stdout(verbose):
    """Importing DeepSpeed printed 'Setting accelerator to CPU ...' on stdout, among the results."""
    code = f"from sap_dist.noise import quiet_third_party; quiet_third_party({verbose}); import deepspeed"
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    env.pop("SAP_DIST_VERBOSE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300).stdout
    assert ("Setting accelerator to" in out or "Setting ds_accelerator to" in out) == verbose, out


def test_global_batch_must_divide_and_data_must_suffice(tmp_path):
    with pytest.raises(ConfigError, match="fewer than train.batch_size=4"):
        run(tiny(tmp_path, "data.task_limit=3"))


@pytest.mark.parametrize("size, fraction", [(8, 0.5), (10, 0.4), (12, 0.5), (12, 1.0), (6, 2 / 3), (32, 0.5), (12, 0.25)])
def test_probe_rows_are_the_same_on_every_world_size(size, fraction):
    """The probe rows of a global batch do not depend on the number of ranks: each rank's
    local indices into its slice pick out exactly the rows one process picks, at the fraction
    as given where it divides, and at the rounded count pinned for one process where the
    trainer rounds it to the ranks."""
    from sap_dist.batching import EffectiveBatches, pinned_overrides, probe_row_count
    from sap_dist.train import Batches, _probe_rows

    rows = [{"id": i} for i in range(size)]
    one, _ = _probe_rows(rows, fraction, 1)
    assert len(one) == max(1, round(fraction * size))
    for world in [w for w in range(2, size + 1) if size % w == 0]:
        chosen, local = _probe_rows(rows, fraction, world)
        count = probe_row_count(size, fraction, world)
        if len(one) % world == 0:
            assert chosen == one  # the numbers divide: exactly the rows one process probes
        pinned = pinned_overrides(EffectiveBatches(world, size, fraction, count))
        same_rows = float(pinned[0].split("=")[1]) if pinned else fraction
        assert _probe_rows(rows, same_rows, 1)[0] == chosen, (world, pinned)
        picked = []
        for rank in range(world):
            mine = Batches(rows, size, 0, rank, world).local(rows)
            picked += [mine[i] for i in local.tolist()]
        assert picked == chosen, (world, picked)


@pytest.mark.parametrize("size, fraction, world, want", [
    (32, 0.5, 32, 32),  # 16 rows for 32 ranks: one row per rank
    (16, 0.5, 16, 16),
    (8, 0.5, 8, 8),
    (12, 0.5, 4, 8),  # 6 is as near to 4 as to 8: 2 rows per rank (Python's round, half to even)
    (12, 0.25, 2, 4),  # 3 -> 4
    (20, 0.25, 4, 4),  # 5 -> 4
    (8, 0.5, 2, 4),  # divides: unchanged
    (4, 0.1, 1, 1),  # never no rows
    (16, 1.0, 8, 16),  # never more than the batch
])
def test_probe_rows_round_to_the_nearest_multiple_of_the_ranks(size, fraction, world, want):
    from sap_dist.batching import probe_row_count

    assert probe_row_count(size, fraction, world) == want


def test_probe_and_safety_counts_are_unchanged_where_they_divide():
    """Where fraction x batch already rounds to a multiple of the ranks (and the safety pairs
    divide), the rule gives exactly the counts the trainer always used."""
    from sap_dist.batching import probe_row_count, safety_pair_count

    for size in range(1, 49):
        for fraction in (0.1, 0.25, 1 / 3, 0.4, 0.5, 2 / 3, 0.75, 1.0):
            old = round(fraction * size)
            for world in (w for w in range(1, size + 1) if size % w == 0 and old >= w and old % w == 0):
                assert probe_row_count(size, fraction, world) == old, (size, fraction, world)
    assert all(safety_pair_count(k * w, w) == k * w for k in range(1, 9) for w in range(1, 33))
    assert safety_pair_count(16, 32) == 32 and safety_pair_count(4, 8) == 8 and safety_pair_count(5, 2) == 6


def test_a_batch_that_does_not_divide_is_refused_in_one_line(capsys, tmp_path):
    from sap_dist.batching import probe_row_count

    with pytest.raises(ConfigError, match="train.batch_size=12 is a global batch size and must divide evenly over the 8 "
                                          "ranks; the nearest that do: 8 or 16"):
        probe_row_count(12, 0.5, 8)
    from sap_dist.cli import config_main

    assert config_main(["--config", "tiny", "--world-size", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.batch_size=4" in err[0] and "3 ranks" in err[0], err


def test_a_rounded_away_perturbation_is_reported_in_the_summary(tmp_path):
    summary = run(tiny(tmp_path, "sap.rho=1e-12", "train.max_steps=1"))
    assert "rounded away" in summary["perturbation_warning"]
    assert json.loads((tmp_path / "summary.json").read_text())["perturbation_warning"] == summary["perturbation_warning"]


@pytest.mark.parametrize("key", ["sap.safety_every", "sap.probe_every"])
def test_an_interval_longer_than_the_run_is_refused(tmp_path, capsys, key):
    out = tmp_path / "run"
    assert main(["--config", "tiny", f"train.output_dir={out}", "train.max_steps=3", f"{key}=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{key}=5 is more than the run's 3 steps" in err[0] and "train.max_steps" in err[0], err
    assert not out.exists()


def test_the_default_safety_interval_does_not_refuse_a_short_run():
    """safety_every defaults to 4: a 2-step smoke test runs (one safety pass), while the same
    interval chosen above the default is refused."""
    from sap_dist.run_control.preflight import check_run_length

    cfg = load_config("quick", ["train.max_steps=2"])
    assert cfg.sap.safety_every == 4
    check_run_length(cfg, 2)
    with pytest.raises(ConfigError, match="sap.safety_every=5 is more than the run's 2 steps"):
        check_run_length(load_config("quick", ["sap.safety_every=5"]), 2)


def test_probe_rows_rounded_up_from_none_are_said_once_and_recorded(tmp_path, capsys):
    """0.1 of a batch of 4 rounds to no rows: the run probes one row instead, says so once
    before training and records the batches it used in summary.json."""
    out = tmp_path / "run"
    assert main(["--config", "tiny", f"train.output_dir={out}", "sap.probe_batch_fraction=0.1", "train.max_steps=1",
                 "train.progress_bar=false", "train.tensorboard=false"]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("batches: ")]
    assert notes == ["batches: probe rows 1 (1 per rank): sap.probe_batch_fraction=0.1 of train.batch_size=4 gives 0, "
                     "rounded to the nearest multiple of the 1 rank (at least one row per rank)"], err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["batches"] == {"world_size": 1, "train_batch_size": 4, "probe_rows": 1, "safety_pairs": 4}


@pytest.mark.parametrize("launcher", [
    [sys.executable, "-m", "sap_dist.train"],
    [sys.executable, "-m", "sap_dist", "train"],
    [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "-m", "sap_dist.train"],
])
def test_entrypoints_run_the_same_program(tmp_path, launcher):
    out = tmp_path / "run"
    proc = subprocess.run(launcher + ["--config", "tiny", f"train.output_dir={out}", "train.max_steps=1",
                                      "train.progress_bar=false"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"adapter/weights: {out}" in proc.stdout
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


def test_a_config_error_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sap_dist.train", "--config", "tiny", "sap.rh=1"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "unknown config key 'sap.rh'" in proc.stderr and "Traceback" not in proc.stderr


def test_tokenizer_without_chat_template_gets_the_plain_one_and_keeps_it(smol_tokenizer, caplog):
    import copy

    from sap_dist.data import PLAIN_TEMPLATE
    from sap_dist.train import _setup_chat_template

    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.chat_template = None
    with caplog.at_level("WARNING"):
        _setup_chat_template(tokenizer)
    assert tokenizer.chat_template == PLAIN_TEMPLATE  # saved with the tokenizer: inference matches
    assert "no chat template" in caplog.text
    _setup_chat_template(smol_tokenizer)
    assert smol_tokenizer.chat_template != PLAIN_TEMPLATE  # a real template is left alone
