"""Stop requests and the run's place on a cluster: the signals that ask a run to checkpoint and
exit, the exit codes a batch script reads, the requeue marker, the watch on the launcher, and
the lock that keeps two runs out of one output directory (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

from sap_dist.backends.checkpointing import fsync_dir
from sap_dist.errors import ConfigError


EXIT_REQUEUE = 75
"""Exit code of a run that stopped on SIGTERM/SIGUSR1 after writing a checkpoint: "requeue me,
resume with checkpoint.resume_from=auto". 75 is EX_TEMPFAIL of sysexits.h (a temporary
failure, retrying is expected to work); it differs from timeout(1)'s 124, from 128+N (killed
by signal N) and from the trainer's other codes (2 input error, 3 non-finite loss, 4
checkpoint write failed)."""

EXIT_CHECKPOINT_WRITE_FAILED = 4
"""Exit code of a run that could not write a checkpoint (e.g. a full disk); the previous
checkpoint is intact."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""Signals that ask the run to checkpoint and exit with EXIT_REQUEUE at the next step
boundary (Kubernetes and torchrun send SIGTERM, Slurm `--signal=USR1@secs` sends SIGUSR1,
Ctrl-C sends SIGINT; a second Ctrl-C aborts at once)."""

class Preempted(RuntimeError):
    """The run stopped on a stop signal after writing a checkpoint (exit EXIT_REQUEUE)."""

    def __init__(self, message: str, checkpoint: str | None):
        super().__init__(message)
        self.checkpoint = checkpoint

    def __reduce__(self):  # raised in an experiment's worker process, it is pickled back to the parent
        return Preempted, (str(self), self.checkpoint)


REQUEUE_MARKER = ".requeue"
"""File in train.output_dir that a run stopped on a stop signal writes (rank 0, atomically)
after its checkpoint: the batch script (slurm/common.sh) requeues when it exists, whatever exit
code the launcher turned EXIT_REQUEUE into. Removed when a run starts and when it completes."""

PREEMPT_EXIT_CODE_ENV = "SAP_PREEMPT_EXIT_CODE"
"""Environment variable: the exit code of a run stopped on a stop signal (default EXIT_REQUEUE).
slurm/node.sh sets 0, so that torchrun exits cleanly (no ChildFailedError traceback) and the
batch script reads REQUEUE_MARKER instead."""


def write_requeue_marker(out: str, info: dict) -> None:
    """Write REQUEUE_MARKER in `out` atomically (temp file, fsync, rename)."""
    path = os.path.join(out, REQUEUE_MARKER)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(info, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(out)


def clear_requeue_marker(out: str) -> None:
    try:
        os.remove(os.path.join(out, REQUEUE_MARKER))
    except FileNotFoundError:
        pass


def preempt_exit_code(env: dict | None = None) -> int:
    value = (os.environ if env is None else env).get(PREEMPT_EXIT_CODE_ENV, "")
    return int(value) if value.strip().isdigit() else EXIT_REQUEUE


_PR_SET_PDEATHSIG = 1


def watch_launcher(env: dict | None = None) -> int | None:
    """Under torchrun (TORCHELASTIC_RUN_ID set), make this worker stop when its launcher dies
    (SIGKILL, the OOM killer): Linux's parent-death signal delivers SIGTERM, which StopRequest
    turns into "checkpoint at the step boundary, then exit". Returns the launcher's pid, which
    `launcher_gone` compares with the current parent (the backstop while SIGTERM is ignored,
    e.g. inherited SIG_IGN before StopRequest is installed). A plain `python -m sap_dist.train`
    is left alone: it may rightly outlive the shell that started it (nohup)."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" not in env:
        return None
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: launcher_gone still notices at the next step boundary
    return parent


def launcher_gone(launcher_pid: int | None) -> bool:
    """The launcher recorded by `watch_launcher` is no longer this process's parent."""
    return launcher_pid is not None and os.getppid() != launcher_pid


RUN_LOCK = ".lock"
"""File in train.output_dir held for the life of a run (see `RunLock`)."""


SLURM_GONE_STATES = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                     "PENDING", "PREEMPTED", "REQUEUE_HOLD", "REVOKED", "SPECIAL_EXIT", "TIMEOUT"}
"""Job states (squeue %T) in which none of the job's processes run: finished, or waiting to
start (a requeued job included). Any other state counts as running, new ones too."""


def slurm_running(job: str, step: str | None = None, env: dict | None = None) -> bool | None:
    """Whether Slurm runs job `job` (or, with `step`, its step `job.step`): False when it is
    finished, pending or unknown to Slurm (purged after MinJobAge), None when there is no Slurm
    to ask or it does not answer (then nothing can be concluded)."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    cmd = [squeue, "-h", "-s", "-j", job, "-o", "%i"] if step else [squeue, "-h", "-j", job, "-o", "%T"]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                                env=dict(os.environ, **(env or {})))
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        # the one error that means "no such job"; others (no controller, no config) prove nothing
        return False if "invalid job id" in result.stderr.lower() else None
    if step:
        return f"{job}.{step}" in result.stdout.split()
    states = [s.split()[0] for s in result.stdout.splitlines() if s.strip()]
    return any(s.rstrip("+") not in SLURM_GONE_STATES for s in states)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


class RunLock:
    """Exclusive hold on a run directory for the life of a run, so that two live runs never
    write (and rotate) each other's checkpoints. The lock file is created with O_EXCL (atomic on
    local and NFS filesystems) and names its holder: host, pid, Slurm job, restart and step.
    A lock whose holder is provably gone is taken over with a message; anything else makes the
    run refuse with one line naming the holder. Gone means: on this host, its pid is dead; in
    Slurm (asked with squeue when it is installed), its job is finished, pending or unknown;
    within this very Slurm job, it was an earlier start of it (a requeued job restarts on
    possibly other nodes) or its job step has ended. Two live runs in one allocation are thus
    kept apart by their steps and pids. Held by rank 0 only."""

    def __init__(self, out: str, env: dict | None = None):
        self.path = os.path.join(out, RUN_LOCK)
        self.env = dict(os.environ if env is None else env)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": self.env.get("SLURM_JOB_ID"),
                   "slurm_restart": self.env.get("SLURM_RESTART_COUNT", "0"),
                   "slurm_step": self.env.get("SLURM_STEP_ID"), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.held = False

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or garbage: not provably stale

    def _gone(self, holder: dict) -> str | None:
        """Why the holder is provably gone, or None while it may still run."""
        pid, host, job = holder.get("pid"), holder.get("host"), holder.get("slurm_job")
        if host == self.me["host"] and isinstance(pid, int):
            if pid == self.me["pid"]:
                return "it is this process, left over by an earlier run in it"
            if not _pid_alive(pid):
                return "that process is gone"
        if not job:
            return None  # another host and no Slurm job to ask about: cannot tell
        if job == self.me["slurm_job"]:
            # Slurm never runs two starts of one job at once: an earlier start is over
            if str(holder.get("slurm_restart", "0")) != str(self.me["slurm_restart"]):
                return f"it was an earlier start of this Slurm job {job}"
            step = holder.get("slurm_step")
            if step is None or step == self.me["slurm_step"]:
                return None  # this job and step still run (this process is in them)
            if slurm_running(job, step, self.env) is False:
                return f"Slurm job step {job}.{step} has ended"
            return None
        if slurm_running(job, env=self.env) is False:
            return f"Slurm job {job} is no longer running"
        return None

    def acquire(self) -> "RunLock":
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile
                why = self._gone(holder)
                if why is None:
                    who = (f"pid {holder.get('pid')} on {holder.get('host')}"
                           + (f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else "")
                           + (f", since {holder['started']}" if holder.get("started") else "")) if holder else "another run"
                    raise ConfigError(f"{os.path.dirname(self.path)} is in use by a live run ({who}); wait for it, stop it, "
                                      f"or choose another train.output_dir (remove {self.path} if that run is gone)")
                print(f"sap-dist: taking over the stale lock {self.path} of pid {holder.get('pid')} on "
                      f"{holder.get('host')}: {why}", file=sys.stderr, flush=True)
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(self.me, fh)
            self.held = True
            return self
        raise ConfigError(f"could not take the lock {self.path}: it keeps changing hands")

    def release(self) -> None:
        if self.held and (self._holder() or {}).get("pid") == self.me["pid"]:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self.held = False


class StopRequest:
    """SIGTERM and SIGUSR1 set a flag (the run finishes its step, checkpoints and exits with
    EXIT_REQUEUE); previous handlers come back on `close`. Only the main thread can install
    handlers; elsewhere this does nothing (with a warning)."""

    def __init__(self, signals=STOP_SIGNALS, launcher_pid: int | None = None):
        self._received: str | None = None
        self._launcher_pid = launcher_pid  # from watch_launcher: its exit is a stop request too
        self._previous: dict = {}
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("not in the main thread: SIGTERM/SIGUSR1 keep their default action (no checkpoint on preemption)")
            return
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    @property
    def received(self) -> str | None:
        """Name of the first stop request ("SIGTERM", "SIGUSR1", "launcher exit"), or None."""
        if self._received is None and launcher_gone(self._launcher_pid):
            self._received = "launcher exit"
        return self._received

    def _handle(self, signum, frame) -> None:
        if self._received is None:
            self._received = signal.Signals(signum).name
            if signum == signal.SIGINT:
                print("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again aborts without one)",
                      file=sys.stderr, flush=True)
        elif signum == signal.SIGINT and self._received == "SIGINT":
            raise KeyboardInterrupt

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


