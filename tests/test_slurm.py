"""The Slurm scripts: shellcheck, their command lines, and real runs on a real Slurm.

The fixture `cluster` starts a one-host Slurm cluster of its own from Debian's packages
(`scripts/ci_services.sh` installs them; .ci/run calls it): munged on a private socket,
slurmctld and two slurmd (nodes n1 and n2, both 127.0.0.1, Debian builds Slurm with
multiple-slurmd support) on free loopback ports, everything under a temp directory, all
stopped at the end. The real `slurm/sap_7b.sh` is submitted with overrides to the tiny model
on CPU: 2 nodes x 1 process, torchrun's c10d rendezvous on the first node, gloo, the
recipe's ZeRO-3 backend. Then the preemption round trip: the time-limit signal
(`scancel --batch --signal=USR1`, what `--signal=B:USR1@600` delivers), checkpoint, requeue
by the script, resume, and the same final weights as the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = (sorted((ROOT / "slurm").glob("*.sh")) + sorted((ROOT / "scripts").glob("*.sh"))
           + [ROOT / ".ci" / "run", ROOT / "docker" / "entrypoint.sh"])
"""Every shell script in the project."""
SLURM_TOOLS = ["slurmctld", "slurmd", "munged", "sbatch", "scontrol", "squeue", "scancel", "sinfo"]
# The tiny model on CPU through the 7B recipe: everything else (LoRA, SAP paper variant, ZeRO-3,
# the DeepSpeed config) is the recipe's own.
TINY = ("model.dtype=fp32 model.attn_implementation=null data.max_length=64 data.safety_max_length=64 "
        "train.batch_size=4 sap.safety_batch_size=4 train.max_steps=6 train.tensorboard=false")
JOB_TIMEOUT = 300


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _require(tools: list[str], why: str) -> None:
    missing = [t for t in tools if not _which(t)]
    if missing:
        message = f"{', '.join(missing)} not installed: {why} (bash scripts/ci_services.sh installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs them: missing there is a broken setup, not a skip
        pytest.skip(message)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ------------------------------------------------------------------------------------------
# No Slurm needed


def test_shellcheck_every_script():
    _require(["shellcheck"], "needed to lint the scripts")
    result = subprocess.run([_which("shellcheck"), "-x", "-P", "SCRIPTDIR", *map(str, SCRIPTS)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(SCRIPTS) >= 10  # slurm/ (5), scripts/ (4+), .ci/run


@pytest.mark.parametrize("size", ["7b", "13b", "70b"])
def test_sbatch_headers(size):
    text = (ROOT / "slurm" / f"sap_{size}.sh").read_text()
    opts = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    assert opts["signal"].startswith("B:USR1@") and "requeue" in opts and opts["ntasks-per-node"] == "1"
    assert opts["output"] == "%x-%j.out" and opts["open-mode"] == "append"  # per job, kept across requeues
    assert f"SAP_RECIPE=configs/sap_{size}.yaml" in text and (ROOT / "configs" / f"sap_{size}.yaml").exists()
    assert re.search(r"sap-dist plan --config configs/sap_%s\.yaml --gpus \d+ --gpu-memory 80" % size, text)
    assert "FITS" in text
    # sized for 80 GB cards: the GPU type can be asked for, on the command line or in the header
    assert f"sbatch --gpus-per-node=h100:8 slurm/sap_{size}.sh" in text
    assert "##SBATCH --gpus-per-node=h100:8" in text and "##SBATCH --constraint=" in text

    common = (ROOT / "slurm" / "common.sh").read_text()
    assert "--kill-on-bad-exit=1" in common and "scontrol requeue" in common


def test_cluster_docs_log_in_after_hf_home_with_a_cache_outside_the_checkout():
    doc = (ROOT / "docs" / "cluster.md").read_text()
    steps = doc[doc.index("```bash"):doc.index("```", doc.index("```bash") + 3)]
    assert "huggingface-cli login" not in doc and "hf auth login" in steps
    home = re.search(r"^export HF_HOME=(\S+)", steps, re.M)
    assert home and steps.index(home.group(0)) < steps.index("hf auth login")  # the token lands in $HF_HOME
    checkout = re.search(r"git clone \S+ (\S+)", steps).group(1)
    assert not home.group(1).startswith(checkout), home.group(1)  # 140 GB of weights out of the code tree
    assert "--gpus-per-node=h100:8" in steps
    header = (ROOT / "slurm" / "sap_7b.sh").read_text().split("\n#SBATCH ")[0]
    assert "weights.method=full train.learning_rate=2e-5 checkpoint.every_steps=500" in header and "95 GB" in header
    assert "hf auth login" in (ROOT / "slurm" / "common.sh").read_text()


def _dry_run(env_extra: dict, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SAP_DRY_RUN="1", SAP_PYTHON=sys.executable, SLURM_JOB_ID="77", SLURM_JOB_NAME="sap-70b",
               SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8", SAP_RDZV_HOST="10.1.2.3", **env_extra)
    result = subprocess.run(["bash", "slurm/sap_70b.sh", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_environment_overrides_reach_the_command_lines():
    out = _dry_run({"SAP_MODEL": "/models/llama70b", "SAP_TASK_DATA": "/data/t.jsonl", "SAP_SAFETY_DATA": "/data/s.jsonl",
                    "SAP_OUTPUT_DIR": "/scratch/run1", "SAP_BACKEND": "fsdp2", "SAP_DS_CONFIG": "ds_configs/zero3_offload.json",
                    "SAP_CONFIG": "configs/sap_13b.yaml", "SAP_EXTRA_ARGS": "sap.rho=0.02 train.max_steps=9"},
                   "train.seed=5")
    for part in ("model.name_or_path=/models/llama70b", "data.task=/data/t.jsonl", "data.safety=/data/s.jsonl",
                 "train.output_dir=/scratch/run1", "dist.backend=fsdp2", "dist.deepspeed_config=ds_configs/zero3_offload.json",
                 "sap.rho=0.02", "train.max_steps=9", "train.seed=5", "--config configs/sap_13b.yaml",
                 "checkpoint.resume_from=auto"):
        assert part in out, part
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert "--nodes=2" in srun and "--ntasks-per-node=1" in srun and "--kill-on-bad-exit=1" in srun
    torchrun = next(line for line in out.splitlines() if "torch.distributed.run" in line)
    assert "--nnodes=2" in torchrun and "--nproc-per-node=8" in torchrun and "--rdzv-backend=c10d" in torchrun
    assert "--rdzv-endpoint=10.1.2.3:20077" in torchrun and "--rdzv-conf=is_host=true" in torchrun


def test_defaults_and_per_node_values():
    out = _dry_run({})
    assert "--config configs/sap_70b.yaml" in out and "train.output_dir=runs/sap-70b-77" in out
    # an output directory given as an override is the one whose status decides a requeue
    assert "output /scratch/o," in _dry_run({}, "train.output_dir=/scratch/o")
    # node.sh evaluates its values on the node: node 1 does not host the rendezvous
    env = dict(os.environ, SAP_DRY_RUN="1", SAP_PYTHON=sys.executable, SLURM_NODEID="1", SLURM_JOB_NUM_NODES="2",
               SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="32", SAP_RDZV_ENDPOINT="h:1", SAP_CONFIG="c.yaml",
               SAP_OUTPUT_DIR="/scratch/o")
    env.pop("OMP_NUM_THREADS", None)
    node = subprocess.run(["bash", "slurm/node.sh", "a.b=1"], capture_output=True, text=True, cwd=ROOT, env=env).stdout
    assert "is_host=false" in node and "--nproc-per-node=4" in node
    # torchrun leaves SIGTERM to the workers; per-rank logs beside the run
    assert r"--signals-to-handle=SIGINT\,SIGHUP\,SIGQUIT" in node and "--log-dir=/scratch/o/logs/node-1" in node
    # threads per rank from the CPUs the launcher really has (its affinity), not --cpus-per-task,
    # at most what Slurm allocated on the node
    real = len(os.sched_getaffinity(0))
    for on_node, want in (("1024", real), ("1", 1)):
        one_gpu = dict(env, SLURM_GPUS_ON_NODE="1", SLURM_CPUS_ON_NODE=on_node)
        node = subprocess.run(["bash", "slurm/node.sh"], capture_output=True, text=True, cwd=ROOT, env=one_gpu).stdout
        assert f"OMP_NUM_THREADS={want}," in node, (on_node, node)
    # the launcher step gets every CPU the job has on a node (the fewest over the nodes)
    srun = next(line for line in _dry_run({"SLURM_JOB_CPUS_PER_NODE": "128(x2),64"}).splitlines() if line.startswith("srun "))
    assert "--cpus-per-task=64" in srun


def test_output_dir_of_a_users_config_and_of_a_space_separated_override(tmp_path):
    """The batch shell watches the output directory the run really writes: the one a user's own
    SAP_CONFIG sets (the recipes keep one directory per job), and `--train.output_dir X` as well
    as `train.output_dir=X`."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("train:\n  output_dir: /scratch/mine\n")
    out = _dry_run({"SAP_CONFIG": str(mine)})
    assert "output /scratch/mine," in out and "train.output_dir=/scratch/mine" in out
    unset = tmp_path / "unset.yaml"
    unset.write_text("sap:\n  rho: 0.02\n")
    assert "output runs/sap-70b-77," in _dry_run({"SAP_CONFIG": str(unset)})
    assert "output runs/sap-70b-77," in _dry_run({})  # the recipe's own output_dir is not the job's
    assert "output /scratch/env," in _dry_run({"SAP_CONFIG": str(mine), "SAP_OUTPUT_DIR": "/scratch/env"})
    spaced = _dry_run({}, "--train.output_dir", "/scratch/o2")
    assert "output /scratch/o2," in spaced and "--train.output_dir /scratch/o2" in spaced


def _node_dry_run(python: str) -> str:
    env = dict(os.environ, SAP_DRY_RUN="1", SAP_PYTHON=python, SAP_RDZV_ENDPOINT="h:1", SAP_CONFIG="c.yaml",
               SAP_OUTPUT_DIR="/scratch/o")
    result = subprocess.run(["bash", "slurm/node.sh"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_torchrun_signal_option_follows_the_installed_torchrun():
    """node.sh passes --signals-to-handle only to a torchrun that has it (torch >= 2.9): asked of
    the installed torchrun's own --help, for real."""
    help_text = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    assert "usage:" in help_text
    out = _node_dry_run(sys.executable)
    launch = next(line for line in out.splitlines() if "torch.distributed.run" in line)
    assert ("--signals-to-handle=" in launch) == ("--signals-to-handle" in help_text), (help_text[:300], launch)
    assert ("no --signals-to-handle" in out) != ("--signals-to-handle" in help_text)


def test_a_torchrun_without_the_signal_option_is_launched_without_it(tmp_path):
    """torch 2.8's torchrun (the Docker image's) refuses --signals-to-handle: its launch line has
    none, and the log says what a SIGTERM then does. Its --help is stood in for by a python that
    prints the 2.8 usage (no torch 2.8 here); anything else it passes to the real one."""
    usage = ("usage: torchrun [-h] [--nnodes NNODES] [--nproc-per-node NPROC_PER_NODE] [--rdzv-backend RDZV_BACKEND] "
             "[--max-restarts MAX_RESTARTS] [--log-dir LOG_DIR] [--tee TEE] [--local-ranks-filter LOCAL_RANKS_FILTER]")
    old = tmp_path / "python"
    old.write_text(f'#!/bin/sh\nif [ "$*" = "-m torch.distributed.run --help" ]; then echo "{usage}"; exit 0; fi\n'
                   f'exec {sys.executable} "$@"\n')
    old.chmod(0o755)
    out = _node_dry_run(str(old))
    launch = next(line for line in out.splitlines() if "torch.distributed.run" in line)
    assert "--signals-to-handle" not in launch and "--max-restarts=0 --log-dir=" in launch, launch
    assert "no --signals-to-handle: on a SIGTERM (scancel) it SIGKILLs the training processes 30 s later" in out


def test_the_model_is_fetched_once_before_the_ranks_which_run_offline():
    out = _dry_run({"SAP_MODEL": "org/model"})
    lines = out.splitlines()
    fetch = next(i for i, line in enumerate(lines) if "sap_dist.cli fetch-model" in line)
    srun = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    assert fetch < srun and "model.name_or_path=org/model" in lines[fetch] and "--config configs/sap_70b.yaml" in lines[fetch]
    common = (ROOT / "slurm" / "common.sh").read_text()
    assert "export HF_HUB_OFFLINE=1" in common and ': "${HF_HOME:=' in common


def test_refuses_to_run_outside_slurm():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", "slurm/sap_7b.sh"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode != 0 and "sbatch" in result.stderr


# ------------------------------------------------------------------------------------------
# A real one-host Slurm cluster


class Cluster:
    """munged + slurmctld + two slurmd on loopback, under `root`; only these processes are
    stopped at the end (by the pids they wrote)."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.pidfiles: list[Path] = []

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run([_which(cmd[0]) or cmd[0], *cmd[1:]], capture_output=True, text=True,
                                env=self.env(), timeout=timeout)
        if check and result.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: exit {result.returncode}: {result.stderr.strip()}")
        return result

    def env(self, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env.update(SLURM_CONF=str(self.conf), **extra)
        return env

    def start(self) -> None:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir()
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = r / "munge.sock"
        self.pidfiles.append(r / "munged.pid")
        subprocess.run([_which("munged"), "--force", f"--socket={sock}", f"--key-file={key}", f"--log-file={r / 'log/munged.log'}",
                        f"--pid-file={r / 'munged.pid'}", f"--seed-file={r / 'munged.seed'}"], check=True, capture_output=True)
        ctld_port, d1, d2 = _free_ports(3)
        host = socket.gethostname()
        self.conf.write_text(f"""\
ClusterName=saptest{os.getpid()}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={sock},cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd-%n.pid'}
SlurmctldLogFile={r / 'log/slurmctld.log'}
SlurmdLogFile={r / 'log/slurmd-%n.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
KillWait=20
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={d1} CPUs=4 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={d2} CPUs=4 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
""")
        self.pidfiles.append(r / "slurmctld.pid")
        self.run("slurmctld", "-f", str(self.conf))
        for node in ("n1", "n2"):
            self.pidfiles.append(r / f"slurmd-{node}.pid")
            self.run("slurmd", "-f", str(self.conf), "-N", node)
        deadline = time.time() + 60
        while time.time() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            if states.count("idle") == 2:
                return
            time.sleep(1)
        raise RuntimeError(f"the test cluster did not come up: {states}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*.log")))

    def stop(self) -> None:
        self.run("scancel", "--full", "--quiet", "--partition=debug", check=False)
        self.run("scontrol", "shutdown", check=False)  # slurmctld and the slurmd exit
        deadline = time.time() + 20
        for pidfile in reversed(self.pidfiles):  # the slurm daemons first, munged last
            try:
                pid = int(pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            while pidfile.name != "munged.pid" and time.time() < deadline and _alive(pid):
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)

    def sbatch(self, *args: str, env: dict, cwd: Path = ROOT) -> int:
        result = subprocess.run([_which("sbatch"), "--parsable", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float = JOB_TIMEOUT) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
                return info
            time.sleep(1)
        self.run("scancel", str(job_id), check=False)
        raise AssertionError(f"job {job_id} did not finish in {timeout} s: {self.job(job_id)}\n{self.logs()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _require(SLURM_TOOLS, "the Slurm tests run a one-host cluster from Debian's slurmctld, slurmd and munge")
    if os.geteuid() != 0:
        pytest.skip("the one-host Slurm cluster runs its daemons as root (SlurmUser=root); run the tests as root")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _job_env(cluster: Cluster, output_dir: Path) -> dict:
    return cluster.env(SAP_PYTHON=sys.executable, SAP_MODEL="tiny-random-llama", SAP_OUTPUT_DIR=str(output_dir),
                       SAP_NPROC_PER_NODE="1", SAP_RDZV_PORT=str(_free_ports(1)[0]), SAP_EXTRA_ARGS=TINY,
                       HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


# Two nodes of the test cluster, no GPUs, two CPUs per node: everything else is the script's.
CPU_OVERRIDES = ("--nodes=2", "--gpus-per-node=0", "--cpus-per-task=2")


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory, embedded_dir):
    """The real slurm/sap_7b.sh on the tiny model, run to the end (also the reference for the
    preemption round trip). Submitted from another directory than the checkout, by the
    script's absolute path, as a user does: its log goes where the script says, the submit
    directory's sap-7b-<job>.out.
    (`embedded_dir`: the tiny model's tokenizer is cached before two ranks ask for it.)"""
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    elsewhere = tmp_path_factory.mktemp("submit-dir")
    started = time.time()
    job_id = cluster.sbatch(*CPU_OVERRIDES, str(ROOT / "slurm" / "sap_7b.sh"), env=_job_env(cluster, out), cwd=elsewhere)
    info = cluster.wait(job_id)
    log_file = elsewhere / f"sap-7b-{job_id}.out"
    log = log_file.read_text() if log_file.exists() else ""
    return {"job": job_id, "info": info, "log": log, "out": out, "seconds": time.time() - started}


def test_sap_7b_script_runs_the_tiny_model_on_two_nodes(uninterrupted, cluster):
    info, log, out = uninterrupted["info"], uninterrupted["log"], uninterrupted["out"]
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-5000:]}\n{cluster.logs()}"
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]"
    # one launcher per node, evaluated on the node; node 0 hosts the rendezvous
    assert re.search(r"^\d: node 0/2 \S+: 1 process\(es\).*rendezvous host: true, per-rank logs: \S+/logs/node-0$", log, re.M), log[-3000:]
    assert re.search(r"^\d: node 1/2 \S+: 1 process\(es\).*rendezvous host: false, per-rank logs: \S+/logs/node-1$", log, re.M)
    assert list((out / "logs" / "node-0").rglob("stderr.log"))  # torchrun's per-rank logs
    assert re.search(r"^model tiny-random-llama: ", log, re.M)  # fetched once, by the batch shell, before the ranks
    assert "rendezvous 127.0.0.1:" in log and "run status: completed" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["steps"] == 6
    assert summary["backend"] == "DeepSpeedBackend"  # the recipe's ZeRO-3
    assert (out / "adapter_model.safetensors").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6
    print(f"\nSlurm job of the tiny model: {uninterrupted['seconds']:.0f} s")


def _has_checkpointing() -> bool:
    """The trainer checkpoints on SIGUSR1 and resumes with checkpoint.resume_from=auto."""
    from sap_dist.config import all_keys

    try:
        from sap_dist.run_control.stop import EXIT_REQUEUE  # noqa: F401
    except ImportError:
        return False
    trainer = (ROOT / "sap_dist" / "train.py").read_text()
    return "checkpoint.resume_from" in all_keys() and "StopRequest" in trainer and "resume" in trainer


def test_preemption_signal_requeue_and_resume_to_the_same_weights(uninterrupted, cluster, tmp_path):
    if not _has_checkpointing():
        pytest.skip("this sap-dist has no checkpointing yet (sap_dist/run_control/checkpoint.py, checkpoint.resume_from)")
    from safetensors.torch import load_file
    import torch

    out = tmp_path / "preempted"
    started = time.time()
    job_id = cluster.sbatch(*CPU_OVERRIDES, f"--output={tmp_path}/%x-%j.out", "slurm/sap_7b.sh", env=_job_env(cluster, out))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + JOB_TIMEOUT
    while not (metrics.exists() and metrics.read_text().strip()):  # the first step is done
        assert time.time() < deadline and cluster.job(job_id).get("JobState") in ("PENDING", "RUNNING"), cluster.job(job_id)
        time.sleep(0.5)
    # what `#SBATCH --signal=B:USR1@600` does ten minutes before the time limit
    cluster.run("scancel", "--batch", "--signal=USR1", str(job_id))
    info = cluster.wait(job_id)
    log = (tmp_path / f"sap-7b-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-6000:]}"
    assert info["Restarts"] == "1", log[-6000:]  # requeued once by the script
    assert "SIGUSR1" in log and "requeueing job" in log and "restart 1:" in log
    # a planned stop is not a failure: no launcher traceback (torchrun turns a worker's 75 into
    # ChildFailedError); the requeue rests on the trainer's marker, not on an exit code
    assert "Traceback" not in log and "ChildFailedError" not in log, log[-6000:]
    # the signal reached the training processes themselves: both ranks stopped on it
    assert len(re.findall(r"rank \d: stopped by SIGUSR1", log)) == 2, log[-6000:]
    assert re.search(r"resumed from \S+/checkpoints/step-\d+", log)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6 and summary["resumed_from"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6  # no step logged twice
    resumed = load_file(str(out / "adapter_model.safetensors"))
    reference = load_file(str(uninterrupted["out"] / "adapter_model.safetensors"))
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    print(f"\npreemption round trip (signal, checkpoint, requeue, resume): {time.time() - started:.0f} s")


def test_scancel_sigterm_checkpoints_without_torchrun_killing_the_workers(cluster, tmp_path, embedded_dir):
    """`scancel` (and Slurm's own preemption with GraceTime) sends SIGTERM to every process of
    the job. torchrun must leave it to the workers (with its default signal handling it
    forwards it, SIGKILLs them 30 s later and fails with a traceback): both ranks checkpoint
    at the step boundary and the batch script does not requeue a cancel."""
    if not _has_checkpointing():
        pytest.skip("this sap-dist has no checkpointing yet")
    out = tmp_path / "cancelled"
    env = _job_env(cluster, out)
    env["SAP_EXTRA_ARGS"] = TINY.replace("train.max_steps=6", "train.max_steps=400")
    job_id = cluster.sbatch(*CPU_OVERRIDES, str(ROOT / "slurm" / "sap_7b.sh"), env=env, cwd=tmp_path)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + JOB_TIMEOUT
    while not (metrics.exists() and metrics.read_text().strip()):
        assert time.time() < deadline and cluster.job(job_id).get("JobState") in ("PENDING", "RUNNING"), cluster.job(job_id)
        time.sleep(0.5)
    cluster.run("scancel", str(job_id))  # SIGTERM to every process of the job, SIGKILL after KillWait
    info = cluster.wait(job_id)
    time.sleep(2)  # the log's last lines
    log = (tmp_path / f"sap-7b-{job_id}.out").read_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", f"{info}\n{log[-6000:]}"
    assert "death signal" not in log and "SignalException" not in log, log[-6000:]  # torchrun kept out of it
    assert len(re.findall(r"rank \d: stopped by SIGTERM", log)) == 2, log[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["last_checkpoint"], summary
    assert (out / ".requeue").exists() and "not requeueing" in log


# ------------------------------------------------------------------------------------------
# The run lock asks this Slurm whether its holder still runs


def _wait_for_step(cluster: Cluster, job_id: int, step: str) -> None:
    deadline = time.time() + 60
    while f"{job_id}.{step}" not in cluster.run("squeue", "-h", "-s", "-j", str(job_id), "-o", "%i", check=False).stdout.split():
        assert time.time() < deadline, f"step {job_id}.{step} did not start: {cluster.job(job_id)}"
        time.sleep(0.5)


def _write_lock(out: Path, **holder) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "slurm_restart": "0", **holder}))


def test_run_lock_of_another_host_follows_what_slurm_says_of_its_job_and_step(cluster, tmp_path, capsys):
    """A lock left on another host: kept while Slurm runs its job (or, inside the same
    allocation, its step), taken over with a message once Slurm says the job ended or does not
    know it, as for the resubmission after a hard kill."""
    from sap_dist.run_control.stop import RunLock
    from sap_dist.config import ConfigError

    out = tmp_path / "run"
    job = cluster.sbatch("--nodes=1", "--cpus-per-task=1", f"--output={tmp_path}/%j.out", "--wrap", "srun sleep 600",
                         env=cluster.env(), cwd=tmp_path)
    try:
        _wait_for_step(cluster, job, "0")
        _write_lock(out, slurm_job=str(job), slurm_step="0")
        with pytest.raises(ConfigError, match=rf"in use by a live run \(pid 1 on elsewhere, Slurm job {job}\)"):
            RunLock(str(out), env=cluster.env(SLURM_JOB_ID=str(job + 1000))).acquire()
        same_allocation = cluster.env(SLURM_JOB_ID=str(job), SLURM_STEP_ID="1")
        with pytest.raises(ConfigError, match="in use by a live run"):
            RunLock(str(out), env=same_allocation).acquire()
        _write_lock(out, slurm_job=str(job), slurm_step="7")  # a step of this job that runs no more
        RunLock(str(out), env=same_allocation).acquire().release()
        assert f"Slurm job step {job}.7 has ended" in capsys.readouterr().err
    finally:
        cluster.run("scancel", str(job), check=False)
    cluster.wait(job)
    _write_lock(out, slurm_job=str(job), slurm_step="0")
    RunLock(str(out), env=cluster.env(SLURM_JOB_ID=str(job + 1000))).acquire().release()
    assert f"Slurm job {job} is no longer running" in capsys.readouterr().err
    _write_lock(out, slurm_job="999999", slurm_step="0")  # unknown to this Slurm (purged)
    RunLock(str(out), env=cluster.env(SLURM_JOB_ID=str(job + 1000))).acquire().release()
    assert "Slurm job 999999 is no longer running" in capsys.readouterr().err


def test_a_lock_left_by_a_killed_job_step_is_taken_over_by_the_next_job(cluster, tmp_path, capsys):
    """The lock a rank 0 takes inside a real job step (srun) names that job and step; the
    process then dies without releasing it (a hard kill). The next job takes it over."""
    from sap_dist.run_control.stop import RunLock

    out = tmp_path / "run"
    take = f"from sap_dist.run_control.stop import RunLock; RunLock({str(out)!r}).acquire(); import os; os._exit(9)"
    job = cluster.sbatch("--nodes=1", "--cpus-per-task=1", f"--output={tmp_path}/%j.out", "--wrap",
                         f"srun {sys.executable} -c {shlex.quote(take)}", env=cluster.env(PYTHONPATH=str(ROOT)), cwd=tmp_path)
    cluster.wait(job)
    holder = json.loads((out / ".lock").read_text())
    assert holder["slurm_job"] == str(job) and holder["slurm_step"] == "0", (holder, (tmp_path / f"{job}.out").read_text())
    # rank 0 of the next job lands on another node: only Slurm can say the holder is gone
    (out / ".lock").write_text(json.dumps(dict(holder, host="another-node")))
    RunLock(str(out), env=cluster.env(SLURM_JOB_ID=str(job + 1000))).acquire().release()
    err = capsys.readouterr().err
    assert f"taking over the stale lock {out / '.lock'}" in err and f"Slurm job {job} is no longer running" in err, err
    assert not (out / ".lock").exists()
