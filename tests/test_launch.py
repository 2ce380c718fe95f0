"""How a run lives with its launcher and its run directory, for real: torchrun's workers stop
(checkpoint, requeue marker, exit) when torchrun itself is SIGKILLed, and a run directory held
by a live run is refused with one line naming it, a stale hold taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from sap_dist.run_control.checkpoint import list_checkpoints
from sap_dist.run_control.stop import REQUEUE_MARKER, RUN_LOCK, RunLock
from sap_dist.config import ConfigError
from test_reliability import _children

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", "tiny", "train.progress_bar=false", "train.tensorboard=false"]


def _env() -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("ACCELERATE_", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    return env


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def _rows(out: str) -> int:
    try:
        with open(os.path.join(out, "metrics.jsonl")) as fh:
            return sum(1 for line in fh if line.strip().endswith("}"))
    except FileNotFoundError:
        return 0


def test_workers_stop_with_a_checkpoint_when_torchrun_is_killed(tmp_path, embedded_dir):
    out = str(tmp_path / "run")
    steps = 200
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path / "log"
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
             "-m", "sap_dist.train", *TINY, "dist.backend=ddp", f"train.max_steps={steps}", f"train.output_dir={out}",
             "checkpoint.every_steps=1000"],
            env=_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.time() + 300
        while _rows(out) < 2:
            assert launcher.poll() is None and time.time() < deadline, log_path.read_text()[-4000:]
            time.sleep(0.2)
        workers = _children(launcher.pid)
        assert len(workers) == 2, workers
        os.kill(launcher.pid, signal.SIGKILL)  # the launcher dies; nobody tells the workers
        launcher.wait()
        deadline = time.time() + 120
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "the workers trained on as orphans\n" + log_path.read_text()[-4000:]
    finally:
        for pid in [w for w in workers if _alive(w)]:
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
    summary = json.loads(open(os.path.join(out, "summary.json")).read())
    assert summary["status"] == "preempted" and summary["steps"] < steps, summary
    assert [c.step for c in list_checkpoints(os.path.join(out, "checkpoints"))] == [summary["steps"]]
    assert os.path.exists(os.path.join(out, REQUEUE_MARKER))  # the batch script would requeue it
    assert not os.path.exists(os.path.join(out, RUN_LOCK))  # released on the way out


def test_a_second_live_run_in_the_directory_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        out.mkdir()
        (out / RUN_LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                                "slurm_job": None, "started": "2026-01-01 00:00:00"}))
        result = subprocess.run([sys.executable, "-m", "sap_dist.train", *TINY, f"train.output_dir={out}"],
                                capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"in use by a live run (pid {holder.pid} on {socket.gethostname()}" in lines[0], lines
    assert json.loads((out / RUN_LOCK).read_text())["pid"] == holder.pid  # the first run's lock is untouched


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / RUN_LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "slurm_job": None}))
    lock = RunLock(str(out), env={}).acquire()
    assert f"taking over the stale lock {out / RUN_LOCK} of pid {dead.pid}" in capsys.readouterr().err
    assert json.loads((out / RUN_LOCK).read_text())["pid"] == os.getpid()
    # a lock of another job on another host, with no Slurm to ask about it, is not provably
    # stale: refused; an earlier start of this same Slurm job (it was requeued) is
    lock.release()
    (out / RUN_LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "slurm_job": "42", "slurm_restart": "0"}))
    with pytest.raises(ConfigError, match=r"in use by a live run \(pid 1 on elsewhere, Slurm job 42\)"):
        RunLock(str(out), env={"SLURM_JOB_ID": "43", "SLURM_CONF": str(tmp_path / "no-slurm.conf")}).acquire()
    RunLock(str(out), env={"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "1"}).acquire().release()
    assert "an earlier start of this Slurm job 42" in capsys.readouterr().err
    assert not (out / RUN_LOCK).exists()


def test_two_live_runs_in_one_slurm_allocation_are_kept_apart(tmp_path):
    """The same SLURM_JOB_ID (and restart) is not a requeue: a live holder in this allocation,
    another process on this host, keeps the directory; once it is dead the lock is taken over."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    out = tmp_path / "run"
    out.mkdir()
    same_job = {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "0", "SLURM_STEP_ID": "0"}
    try:
        (out / RUN_LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "slurm_job": "42",
                                                "slurm_restart": "0", "slurm_step": "0"}))
        with pytest.raises(ConfigError, match=rf"in use by a live run \(pid {holder.pid} on .*, Slurm job 42\)"):
            RunLock(str(out), env=same_job).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(str(out), env=same_job).acquire()
    assert json.loads((out / RUN_LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_missing_deepspeed_is_one_line_naming_the_setup_command(tmp_path):
    """DeepSpeed made unimportable for real (sys.modules entry None): the run stops before any
    process group or model, in one line that names the command that installs it."""
    argv = TINY + ["dist.backend=zero3", f"train.output_dir={tmp_path / 'run'}"]
    code = f"import sys; sys.modules['deepspeed'] = None; from sap_dist.train import main; sys.exit(main({argv!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "dist.backend=zero3 needs DeepSpeed" in lines[0] and "bash scripts/setup_env.sh" in lines[0]
    assert ".[cluster]" in lines[0]
    pyproject = open(os.path.join(REPO, "pyproject.toml")).read()
    assert 'cluster = ["deepspeed' in pyproject  # the extra the message names exists
    assert "EXTRAS=${EXTRAS-cluster}" in open(os.path.join(REPO, "scripts", "setup_env.sh")).read()


def _fetch(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sap_dist.cli", "fetch-model", *args], capture_output=True, text=True,
                          env=dict(_env(), **env), cwd=REPO, timeout=300)


def test_fetch_model_offline_finds_the_shared_cache_or_says_in_one_line(tmp_path):
    """What slurm/common.sh runs once before the ranks: offline, a hub id in the cache resolves to
    its snapshot; one that is not there is one line (exit 2) naming the cache and the command."""
    hf_home = tmp_path / "hf"
    snapshot = hf_home / "hub" / "models--acme--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    found = _fetch("--config", "tiny", "model.name_or_path=acme/tiny", HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    assert found.returncode == 0 and str(snapshot) in found.stdout, found.stderr[-2000:]
    missing = _fetch("--config", "tiny", "model.name_or_path=acme/absent", HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert missing.returncode == 2 and len(lines) == 1, missing.stderr[-2000:]
    assert "'acme/absent'" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0] and str(hf_home) in lines[0]
    assert "sap-dist fetch-model --config" in lines[0]


def _cached_model(hf_home) -> str:
    """A hub model id that is complete in the cache under `hf_home` (what fetch-model finds offline)."""
    snapshot = hf_home / "hub" / "models--acme--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir(exist_ok=True)
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    return "acme/tiny"


def test_fetch_model_asks_only_for_the_hub_datasets_a_run_loads(tmp_path):
    """builtin:, local files (of any state) and local directories need nothing; a hub name does,
    for data.safety only with the methods that read safety pairs."""
    from sap_dist.config import load_config
    from sap_dist.tools.fetch import hub_datasets

    local = tmp_path / "task.jsonl"
    local.write_text('{"instruction": "a", "output": "b"}\n')
    assert hub_datasets(load_config("tiny")) == []  # builtin:task, builtin:safety
    assert hub_datasets(load_config("tiny", [f"data.task={local}", f"data.safety={tmp_path / 'missing.csv'}"])) == []
    assert hub_datasets(load_config("tiny", [f"data.task={tmp_path}"])) == []  # a directory: loaded locally
    both = load_config("tiny", ["data.task=acme/task", "data.task_split=sft", "data.safety=acme/pairs"])
    assert hub_datasets(both) == [("data.task", "acme/task", "sft"), ("data.safety", "acme/pairs", "train")]
    sft = load_config("tiny", ["data.safety=acme/pairs", "method=sft"])
    assert hub_datasets(sft) == []
    usage = " ".join(_fetch("--help").stdout.split())
    assert "hub data sets (data.task, and data.safety for sap and lisa)" in usage and "builtin:" in usage


@pytest.mark.parametrize("key", ["data.task", "data.safety"])
def test_fetch_model_loads_hub_datasets_and_names_the_key_when_it_cannot(key, tmp_path):
    """After the model, each hub dataset goes through `datasets.load_dataset` (the ranks' own
    call); offline and not cached, that is one line naming the key, the name and the cache."""
    hf_home = tmp_path / "hf"
    model = _cached_model(hf_home)
    result = _fetch("--config", "tiny", f"model.name_or_path={model}", f"{key}=acme/absent-data",
                    HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"sap-dist fetch-model: error: {key} 'acme/absent-data'"), lines[0]
    assert "HF_HUB_OFFLINE=1" in lines[0] and str(hf_home) in lines[0] and "sap-dist fetch-model --config" in lines[0]
    assert f"model {model}:" in result.stdout  # the model came first and was found
    fine = _fetch("--config", "tiny", f"model.name_or_path={model}", HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    assert fine.returncode == 0 and "data." not in fine.stdout, fine.stderr[-2000:]  # builtin: nothing to fetch


def test_launcher_configs_name_only_files_that_exist():
    """Every repository path a ds_configs/*.yaml names (in a value or a comment) exists."""
    import glob
    import re

    for path in glob.glob(os.path.join(REPO, "ds_configs", "*.yaml")):
        text = open(path).read()
        for named in re.findall(r"\b((?:ds_configs|slurm|configs|docker|scripts)/[\w./-]+\.(?:json|yaml|sh|sbatch))", text):
            assert os.path.exists(os.path.join(REPO, named)), f"{os.path.basename(path)} names {named}, which does not exist"


@pytest.mark.parametrize("env, override, message", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "dist.backend=fsdp2", "dist.backend=fsdp2 contradicts the accelerate config, which asks for DeepSpeed"),
    ({"ACCELERATE_USE_FSDP": "true"}, "dist.backend=zero3", "dist.backend=zero3 contradicts the accelerate config, which asks for FSDP"),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "model.dtype=bf16", "accelerate --mixed_precision fp16 is not how sap-dist sets precision"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, "model.dtype=fp32", "set model.dtype=bf16 and drop --mixed_precision"),
])
def test_accelerate_choices_sap_dist_would_ignore_are_refused_in_one_line(env, override, message, tmp_path, monkeypatch, capsys):
    from sap_dist.train import main as train_main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert train_main([*TINY, override, f"train.output_dir={tmp_path / 'run'}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err
