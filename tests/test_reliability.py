"""Checkpoints, exact resume, preemption signals, failing ranks and bad checkpoint input, for
real: the trainer runs as separate processes (`python -m sap_dist.train`, or `torchrun
--nproc_per_node 2` on gloo), receives real signals (SIGTERM, SIGUSR1, SIGKILL, SIGSTOP), and
is resumed with `checkpoint.resume_from=auto`; the final weights are compared with an
uninterrupted run of the same backend.

Every run trains the tiny fp32 model with the `reference` SAP variant (its probe AdamW and
lagged probe must survive a resume), LoRA dropout on (the RNG must be restored) and a linear
schedule with warm-up (the scheduler must be restored).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from safetensors.torch import load_file

from sap_dist.run_control.checkpoint import config_mismatches, latest_complete, list_checkpoints, verify
from sap_dist.run_control.stop import EXIT_CHECKPOINT_WRITE_FAILED, EXIT_REQUEUE, StopRequest
from sap_dist.run_control.checkpoint import main as checkpoint_cli
from sap_dist.train import main as train_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
"""Optimizer steps per run."""
COMMON = ["--config", "tiny", "train.progress_bar=false", "method=sap", "sap.variant=reference",
          "weights.lora_dropout=0.1", "train.lr_schedule=linear", "train.warmup_steps=2",
          "checkpoint.every_steps=2", "checkpoint.keep_last=3"]
REL_TOL = 1e-6
KILL_BOUND_S = 60
"""A SIGKILLed rank must bring the whole run down within this (torchrun notices at once)."""
HANG_TIMEOUT_MIN = 0.3
"""dist.timeout_minutes of the run whose rank hangs (18 s)."""
TORCHRUN_STOP_S = 30
"""How long torchrun waits after SIGTERM before it SIGKILLs a worker that did not exit."""


def steps_for(backend: str) -> int:
    return STEPS


# ----------------------------------------------------------------------------------------
# launching and watching runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict | None = None) -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("ACCELERATE_", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    env.update(extra or {})
    return env


class Run:
    """One training run in its own process (group), its output in `<out>.log`."""

    def __init__(self, backend: str, out: str, *overrides: str, env: dict | None = None):
        self.backend, self.out = backend, str(out)
        args = COMMON + [f"dist.backend={backend}", f"train.max_steps={steps_for(backend)}",
                         f"train.output_dir={out}", *overrides]
        if backend == "single":
            cmd = [sys.executable, "-m", "sap_dist.train", *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_port", str(_free_port()), "-m", "sap_dist.train", *args]
        self.log_path = f"{out}.{int(time.time() * 1000)}.log"
        self._fh = open(self.log_path, "w")
        self.started = time.time()
        self.proc = subprocess.Popen(cmd, env=_env(env), cwd=REPO, stdout=self._fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait(self, timeout: float = 600) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.cleanup()
            pytest.fail(f"run did not end within {timeout} s:\n{self.tail()}")
        self._fh.close()
        return rc

    def tail(self, n: int = 6000) -> str:
        with open(self.log_path) as fh:
            return fh.read()[-n:]

    def log(self) -> str:
        with open(self.log_path) as fh:
            return fh.read()

    def pid_of_rank(self, rank: int) -> int:
        """The process of `rank`: the run itself on one process, else torchrun's worker
        whose environment says RANK=rank."""
        if self.backend == "single":
            return self.proc.pid
        deadline = time.time() + 60
        while time.time() < deadline:
            for child in _children(self.proc.pid):
                try:
                    with open(f"/proc/{child}/environ", "rb") as fh:
                        if f"RANK={rank}".encode() in fh.read().split(b"\0"):
                            return child
                except OSError:
                    pass
            time.sleep(0.1)
        pytest.fail(f"no worker with RANK={rank} under torchrun {self.proc.pid}")

    def until(self, condition, what: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"run exited ({self.proc.returncode}) before {what}:\n{self.tail()}")
            if time.time() > deadline:
                self.cleanup()
                pytest.fail(f"timed out waiting for {what}:\n{self.tail()}")
            time.sleep(0.1)

    def cleanup(self) -> None:
        """Kill whatever is left: torchrun starts each worker in its own session, so they
        are killed one by one."""
        for pid in _children(self.proc.pid) + [self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


def rows(out) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip().endswith("}")]


def complete(out, step: int) -> bool:
    return os.path.exists(os.path.join(out, "checkpoints", f"step-{step:08d}", "meta.json"))


def summary(out) -> dict:
    with open(os.path.join(out, "summary.json")) as fh:
        return json.load(fh)


def adapter(out) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "adapter_model.safetensors"))


def rel_diff(got: dict | list, want: dict | list) -> float:
    """max |got - want| / max |want| over all tensors together."""
    pairs = [(got[k], want[k]) for k in want] if isinstance(want, dict) else list(zip(got, want))
    diff = max(float((a.double() - b.double()).abs().max()) for a, b in pairs)
    scale = max(float(b.double().abs().max()) for _, b in pairs)
    return diff / scale


# ----------------------------------------------------------------------------------------
# uninterrupted references, one per backend (computed once, when first needed)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cache: dict[str, str] = {}

    def get(backend: str) -> str:
        if backend not in cache:
            out = str(tmp_path_factory.mktemp(f"ref-{backend}") / "run")
            run = Run(backend, out)
            rc = run.wait()
            assert rc == 0, run.tail()
            assert summary(out)["status"] == "completed"
            cache[backend] = out
        return cache[backend]

    return get


def assert_same_as_reference(out: str, ref: str, backend: str) -> None:
    """Final weights, last probe, metrics rows (each step exactly once, same losses) and
    token count equal the uninterrupted run's: bitwise on one process, within REL_TOL on two."""
    s, r = summary(out), summary(ref)
    assert s["status"] == "completed" and s["steps"] == r["steps"] == steps_for(backend)
    assert s["tokens_seen"] == r["tokens_seen"]
    got, want = adapter(out), adapter(ref)
    assert got.keys() == want.keys()
    probe_got = torch.load(os.path.join(out, "probe.pt"))["vectors"]
    probe_want = torch.load(os.path.join(ref, "probe.pt"))["vectors"]
    mine, theirs = rows(out), rows(ref)
    assert [m["step"] for m in mine] == list(range(1, steps_for(backend) + 1)), "a metrics row missing or repeated"
    losses = [(m["task_loss"], t["task_loss"]) for m, t in zip(mine, theirs)]
    if backend == "single":
        assert all(torch.equal(got[k], want[k]) for k in want), f"max diff {rel_diff(got, want):.3e} (rel)"
        assert all(torch.equal(a, b) for a, b in zip(probe_got, probe_want))
        assert all(a == b for a, b in losses), losses
    else:
        assert rel_diff(got, want) <= REL_TOL
        assert rel_diff(probe_got, probe_want) <= REL_TOL
        assert all(abs(a - b) <= REL_TOL * abs(b) for a, b in losses), losses


# ----------------------------------------------------------------------------------------
# interruptions


def _stopped(run: Run, out: str, rc: int, by: str, ranks: int) -> int:
    """A run stopped by a signal: exit EXIT_REQUEUE on every rank, a complete checkpoint at
    the step it stopped after, no final weights. Returns that step."""
    log = run.log()
    if ranks == 1:
        assert rc == EXIT_REQUEUE, log[-4000:]
    else:
        assert rc != 0  # torchrun reports any failed worker as its own exit code 1
        for r in range(ranks):
            assert re.search(rf"rank {r}: stopped by \w+", log), log[-4000:]
        # the workers' own codes, as torchrun's failure report lists them (when it prints one)
        codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", log)]
        assert all(c == EXIT_REQUEUE for c in codes), codes
    assert f"stopped by {by}" in log
    s = summary(out)
    assert s["status"] == "preempted" and s["message"].startswith("stopped by")
    assert not os.path.exists(os.path.join(out, "adapter_model.safetensors"))
    step = s["steps"]
    assert complete(out, step) and s["last_checkpoint"].endswith(f"step-{step:08d}")
    assert [m["step"] for m in rows(out)] == list(range(1, step + 1))
    return step


def _resumed_at(run: Run) -> int:
    m = re.search(r"resumed from \S+ \(step (\d+) of", run.log())
    return int(m.group(1)) if m else 0


def interrupt(kind: str, backend: str, out: str, done: int) -> int:
    """Start a run (resuming if `done` > 0), interrupt it by `kind` once it has taken a step
    beyond `done` (and beyond a checkpoint for the failures), check what it left. Returns the
    step the next run resumes from."""
    ranks = 1 if backend == "single" else 2
    overrides = ["checkpoint.resume_from=auto"] if done else []
    if kind == "hang_rank1":
        overrides.append(f"dist.timeout_minutes={HANG_TIMEOUT_MIN}")
    run = Run(backend, out, *overrides)
    try:
        if kind in ("usr1_rank0", "usr1_rank1", "sigterm", "sigterm_launcher"):
            run.until(lambda: len(rows(out)) >= done + 1 and (not done or _resumed_at(run)), f"step {done + 1}")
            if kind == "sigterm_launcher":
                os.kill(run.proc.pid, signal.SIGTERM)  # torchrun forwards it to every worker
                by = "SIGTERM"
            elif kind == "sigterm":
                os.kill(run.pid_of_rank(0), signal.SIGTERM)
                by = "SIGTERM"
            else:
                os.kill(run.pid_of_rank(int(kind[-1])), signal.SIGUSR1)  # one rank only: the others must follow
                by = "SIGUSR1"
            rc = run.wait()
            step = _stopped(run, out, rc, by, ranks)
            assert step > done
            return step
        # failures: a rank dies (SIGKILL) or hangs (SIGSTOP) after a checkpoint newer than `done`
        # and a step beyond it. Checkpoints come every 2 steps, so that state lasts a whole step:
        # with one every step it lasted only while the checkpoint was written, and the kill
        # sometimes landed after the next checkpoint, leaving no step for the resume to drop.
        def progressed():
            complete_steps = [c.step for c in list_checkpoints(os.path.join(out, "checkpoints")) if complete(out, c.step)]
            newest = max(complete_steps, default=0)
            return newest > done and len(rows(out)) > newest
        run.until(progressed, "a new checkpoint and a step after it")
        victim = run.pid_of_rank(ranks - 1)
        t0 = time.time()
        os.kill(victim, signal.SIGKILL if kind.startswith("kill") else signal.SIGSTOP)
        rc = run.wait(timeout=300)
        elapsed = time.time() - t0
        assert rc != 0
        # a hang: the survivors' collective times out, then torchrun SIGTERMs the hung rank
        # and SIGKILLs it after TORCHRUN_STOP_S (its failure path ignores --shutdown-timeout)
        bound = KILL_BOUND_S if kind.startswith("kill") else HANG_TIMEOUT_MIN * 60 + TORCHRUN_STOP_S + 60
        assert elapsed < bound, f"the run took {elapsed:.0f} s to end after a rank {kind}"
        if kind == "hang_rank1":
            assert re.search(r"timed out|timeout", run.log(), re.IGNORECASE), run.tail()  # gloo's words vary by collective
        print(f"{backend}: {kind}: all ranks gone {elapsed:.1f} s later (exit {rc})")
        newest = latest_complete(os.path.join(out, "checkpoints"))
        assert newest is not None and newest.step > done  # the last checkpoint is intact
        assert len(rows(out)) > newest.step  # rows beyond it exist now; the resume must drop them
        return newest.step
    finally:
        run.cleanup()
        if kind == "hang_rank1":
            try:
                os.kill(victim, signal.SIGKILL)
            except (OSError, UnboundLocalError):
                pass


SCENARIOS = {
    "single": ["kill", "sigterm"],
    "zero3": ["usr1_rank1", "kill_rank1"],
    "fsdp2": ["sigterm_launcher", "hang_rank1"],
    "ddp": ["usr1_rank0"],
    "zero2": ["usr1_rank1"],
}
"""Interruptions per backend, in order, before a last run finishes."""


@pytest.mark.parametrize("backend", list(SCENARIOS))
def test_interrupted_run_resumes_exactly(backend, reference, tmp_path):
    """Stop a run by each interruption in turn (signal to one rank, signal to the launcher,
    a killed rank, a hung rank), resume each time with `auto`, finish: the weights, probe,
    metrics rows and token count equal an uninterrupted run's (bitwise on one process)."""
    ref = reference(backend)
    out = str(tmp_path / "run")
    done = 0
    for kind in SCENARIOS[backend]:
        done = interrupt(kind, backend, out, done)
    run = Run(backend, out, "checkpoint.resume_from=auto")
    rc = run.wait()
    assert rc == 0, run.tail()
    assert _resumed_at(run) == done
    assert_same_as_reference(out, ref, backend)


# ----------------------------------------------------------------------------------------
# bad checkpoint input


def _copy_run(ref: str, dst) -> str:
    shutil.copytree(ref, dst)
    return str(dst)


def _truncate(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)


def _flip_byte(path: str) -> None:
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) // 2)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([b[0] ^ 0xFF]))


def _ckpt(out: str, step: int) -> str:
    return os.path.join(out, "checkpoints", f"step-{step:08d}")


def test_damaged_checkpoints_are_refused_with_the_reason(reference, tmp_path, capsys):
    """Truncated, bit-flipped and partial (no meta.json) checkpoints: `verify` names the file
    and the damage, the CLI lists them, and naming one in resume_from is refused (exit 2)."""
    out = _copy_run(reference("single"), tmp_path / "run")
    assert [c.step for c in list_checkpoints(os.path.join(out, "checkpoints"))] == [2, 4, 6]
    _truncate(os.path.join(_ckpt(out, 6), "backend", "state.pt"))
    _flip_byte(os.path.join(_ckpt(out, 4), "trainer.pt"))
    os.remove(os.path.join(_ckpt(out, 2), "meta.json"))

    assert any("backend/state.pt has" in p and "truncated" in p for p in verify(_ckpt(out, 6)))
    assert verify(_ckpt(out, 4)) == ["trainer.pt is corrupt (SHA-256 differs from the one recorded when it was written)"]
    assert verify(_ckpt(out, 4), hashes=False) == []  # same size: only the hash sees it
    assert "partial checkpoint (no meta.json" in verify(_ckpt(out, 2))[0]
    assert latest_complete(os.path.join(out, "checkpoints")) is None
    assert checkpoint_cli([os.path.join(out, "checkpoints")]) == 1
    assert capsys.readouterr().out.count("REFUSED") == 3

    for step, reason in ((6, "truncated"), (2, "partial checkpoint"), (4, "SHA-256 differs")):
        rc = train_main(COMMON[:] + ["dist.backend=single", f"train.max_steps={steps_for('single')}",
                                     f"train.output_dir={tmp_path}/new{step}", f"checkpoint.resume_from={_ckpt(out, step)}"])
        err = capsys.readouterr().err
        assert rc == 2 and "refused" in err and reason in err and "Traceback" not in err, err
        assert not os.path.exists(tmp_path / f"new{step}" / "adapter_model.safetensors")


def test_auto_falls_back_past_partial_and_corrupt_checkpoints(reference, tmp_path):
    """`auto` skips a partial checkpoint, a truncated one and a crash's temp dir, sets the bad
    ones aside as *.corrupt, resumes from the newest intact one and still ends bitwise equal."""
    ref = reference("single")
    out = _copy_run(ref, tmp_path / "run")
    shutil.copytree(_ckpt(out, 6), _ckpt(out, 7))
    os.remove(os.path.join(_ckpt(out, 7), "meta.json"))  # what a non-atomic writer would leave
    _truncate(os.path.join(_ckpt(out, 6), "backend", "state.pt"))
    os.makedirs(os.path.join(out, "checkpoints", ".tmp-step-00000008", "backend"))  # a crash mid-write
    run = Run("single", out, "checkpoint.resume_from=auto")
    rc = run.wait()
    log = run.log()
    assert rc == 0, log[-4000:]
    assert re.search(r"step-00000007 refused: .*partial checkpoint", log)
    assert re.search(r"step-00000006 refused: backend/state.pt has \d+ bytes", log)
    assert _resumed_at(run) == 4
    names = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert names == ["step-00000002", "step-00000004", "step-00000006", "step-00000006.corrupt", "step-00000007.corrupt"]
    assert verify(_ckpt(out, 6)) == []  # step 6 written anew
    assert_same_as_reference(out, ref, "single")


def test_resume_in_the_middle_of_a_probe_every_cycle(tmp_path):
    """With `sap.probe_every=3` the probe is refreshed at steps 1 and 4; a run resumed from the
    step-2 checkpoint must reuse step 1's probe at step 3 (its SapState: step count and probe
    are restored), and ends bitwise equal to the uninterrupted run."""
    _resume_mid_cycle(tmp_path, "sap.probe_every=3", "probe_refreshed")


def _resume_mid_cycle(tmp_path, interval: str, refreshed: str, backend: str = "single") -> None:
    """Run 6 steps with `interval` (k=3: refreshes at steps 1 and 4), resume a copy from the
    step-2 checkpoint and require the end to be the uninterrupted run's (bitwise on one process)."""
    cheap = ["sap.variant=paper", interval, "sap.probe_batch_fraction=0.5"]
    ref = str(tmp_path / "ref")
    run = Run(backend, ref, *cheap)
    assert run.wait() == 0, run.tail()
    assert [m[refreshed] for m in rows(ref)] == [1, 0, 0, 1, 0, 0]
    out = _copy_run(ref, tmp_path / "run")
    for step in (4, 6):
        shutil.rmtree(_ckpt(out, step))
    run = Run(backend, out, *cheap, "checkpoint.resume_from=auto")
    assert run.wait() == 0, run.tail()
    assert _resumed_at(run) == 2
    assert_same_as_reference(out, ref, backend)


@pytest.mark.parametrize("backend", ["single", "ddp", "zero2", "zero3", "fsdp2"])
def test_resume_in_the_middle_of_a_safety_every_cycle(tmp_path, backend):
    """With `sap.safety_every=3` the safety pass runs at steps 1 and 4 and steps 2-3 and 5-6
    perturb along the stored direction; a run resumed from the step-2 checkpoint must perturb
    step 3 along step 1's direction (restored per rank from rank_state/rank-*.pt: under ZeRO
    and FSDP2 each rank holds its own shard of it, which the resume checks piece by piece
    against the rank's weights), and ends equal to the uninterrupted run."""
    _resume_mid_cycle(tmp_path, "sap.safety_every=3", "safety_refreshed", backend)
    ranks = 1 if backend == "single" else 2
    saved = sorted(os.listdir(os.path.join(_ckpt(str(tmp_path / "ref"), 2), "rank_state")))
    assert saved == [f"rank-{r:05d}.pt" for r in range(ranks)]


def _rewrite_rank_state(ckpt: str, edit) -> None:
    """Apply `edit` to rank 0's per-rank state file of checkpoint `ckpt` and record the new
    file's size and hash in meta.json, as a checkpoint written that way would have them."""
    from sap_dist.run_control.checkpoint import _sha256

    rel = os.path.join("rank_state", "rank-00000.pt")
    state = torch.load(os.path.join(ckpt, rel), weights_only=True)
    edit(state)
    torch.save(state, os.path.join(ckpt, rel))
    with open(os.path.join(ckpt, "meta.json")) as fh:
        meta = json.load(fh)
    meta["files"][rel] = {"size": os.path.getsize(os.path.join(ckpt, rel)), "sha256": _sha256(os.path.join(ckpt, rel))}
    with open(os.path.join(ckpt, "meta.json"), "w") as fh:
        json.dump(meta, fh)


@pytest.mark.parametrize("method, field", [("sap.safety_every=3", "safety_direction"),
                                           ("method=lisa", "anchor")])
def test_per_rank_state_cut_into_other_pieces_is_refused(method, field, tmp_path, capsys):
    """The per-rank state (SAP's stored safety direction, Lisa's anchor) holds one piece per
    local weight piece of its rank. A checkpoint whose pieces do not fit this rank's weights
    (one piece too many, one piece short of an element) is refused with exit 2, naming the
    field, before any step: applied as it is, the extra piece would be dropped without a
    word, and the short one would fail in the middle of a step."""
    overrides = [method, "sap.variant=paper", "train.max_steps=3"]
    ref = str(tmp_path / "ref")
    run = Run("single", ref, *overrides)
    assert run.wait() == 0, run.tail()

    def extra(saved):
        st = saved["method"]  # the method's part of the run's state (a term's would be beside it)
        st[field].append(st[field][-1].clone())
        st[f"{field}__on_cpu"].append(True)  # where the pieces live, one flag each

    def short(saved):
        st = saved["method"]
        st[field][0] = st[field][0].reshape(-1)[:-1].clone()

    edits = {"one piece too many": extra, "a piece one element short": short}
    for what, edit in edits.items():
        ckpt = str(tmp_path / what.replace(" ", "-"))
        shutil.copytree(_ckpt(ref, 2), ckpt)
        _rewrite_rank_state(ckpt, edit)
        assert verify(ckpt) == []  # intact as a file: only its pieces are wrong
        out = tmp_path / f"resumed-{what.replace(' ', '-')}"
        rc = train_main(COMMON + ["dist.backend=single", f"train.max_steps={steps_for('single')}", *overrides,
                                  f"train.output_dir={out}", f"checkpoint.resume_from={ckpt}"])
        err = capsys.readouterr().err
        assert rc == 2 and f"{field} " in err and "rank_state/rank-00000.pt" in err and "Traceback" not in err, (what, err)
        assert not os.path.exists(out / "adapter_model.safetensors")


def test_lisa_resumes_in_the_middle_of_a_cycle(tmp_path):
    """Lisa with cycles of 1 alignment + 3 task steps aligns before task steps 1 and 4; a run
    resumed from the step-2 checkpoint must take step 3 as a task step (the step counts are
    restored) against the anchor saved at the end of step 1's alignment (this rank's
    rank_state file), and ends bitwise equal to the uninterrupted run. rho=50 makes the
    proximal term large enough that a wrong anchor changes the weights."""
    lisa = ["method=lisa", "lisa.align_steps=1", "lisa.task_steps=3", "lisa.rho=50"]
    ref = str(tmp_path / "ref")
    run = Run("single", ref, *lisa)
    assert run.wait() == 0, run.tail()
    assert [m["lisa_align_steps"] for m in rows(ref)] == [1, 0, 0, 1, 0, 0]
    assert os.path.exists(os.path.join(_ckpt(ref, 2), "rank_state", "rank-00000.pt"))
    out = _copy_run(ref, tmp_path / "run")
    for step in (4, 6):
        shutil.rmtree(_ckpt(out, step))
    run = Run("single", out, *lisa, "checkpoint.resume_from=auto")
    assert run.wait() == 0, run.tail()
    assert _resumed_at(run) == 2
    got, want = adapter(out), adapter(ref)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    mine, theirs = rows(out), rows(ref)
    assert [m["step"] for m in mine] == list(range(1, STEPS + 1))
    assert [(m["task_loss"], m["task_proximal"]) for m in mine] == [(m["task_loss"], m["task_proximal"]) for m in theirs]


def test_checkpoint_from_another_config_lists_the_mismatching_keys(reference, tmp_path, capsys):
    ref = reference("single")
    base = COMMON + ["dist.backend=single", f"train.max_steps={steps_for('single')}"]
    rc = train_main(base + [f"train.output_dir={tmp_path}/other", f"checkpoint.resume_from={_ckpt(ref, 4)}",
                            "train.learning_rate=0.002", "sap.rho=0.1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "was written by another configuration" in err
    assert "train.learning_rate: 0.001 in the checkpoint, 0.002 in this run" in err
    assert "sap.rho: 0.05 in the checkpoint, 0.1 in this run" in err
    listed = [line.split(":")[0].strip() for line in err.split("mismatching keys:")[1].splitlines() if line.startswith("  ")]
    assert listed == ["sap.rho", "train.learning_rate"], listed  # where a run writes (output_dir) may change
    # the same through `auto` in the run's own directory, and a fresh start there is refused
    out = _copy_run(ref, tmp_path / "run")
    assert train_main(base + [f"train.output_dir={out}", "checkpoint.resume_from=auto", "weights.lora_r=8"]) == 2
    assert "weights.lora_r: 4 in the checkpoint, 8 in this run" in capsys.readouterr().err
    assert train_main(base + [f"train.output_dir={out}"]) == 2
    assert "checkpoint.resume_from=auto to continue it" in capsys.readouterr().err


def test_config_mismatch_ignores_only_output_and_logging_keys():
    from sap_dist.config import load_config, to_dict

    a = to_dict(load_config("tiny"))
    b = to_dict(load_config("tiny", ["train.output_dir=/elsewhere", "train.progress_bar=false",
                                     "checkpoint.every_steps=7", "dist.timeout_minutes=1"]))
    assert config_mismatches(a, b) == []
    c = to_dict(load_config("tiny", ["train.max_steps=9", "dist.backend=zero3"]))
    assert [m.split(":")[0] for m in config_mismatches(a, c)] == ["dist.backend", "train.max_steps"]


def test_stop_request_sets_a_flag_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest()
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.received == "SIGUSR1"  # the first one counts
    stop.close()
    assert signal.getsignal(signal.SIGTERM) is before


def _mount_tmpfs(path: str, size: str) -> bool:
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                          capture_output=True).returncode == 0


def _fill(path: str) -> None:
    """Write a file until the filesystem is full."""
    with open(os.path.join(path, "filler"), "wb", buffering=0) as fh:  # unbuffered: close() has nothing left to fail on
        block = b"\0" * 4096
        try:
            while fh.write(block):
                pass
        except OSError:
            pass


@pytest.mark.parametrize("backend", ["single", "zero3", "fsdp2"])
def test_full_disk_while_writing_keeps_the_previous_checkpoint(backend, reference, tmp_path):
    """The checkpoint directory fills up between two checkpoints. On a 3 MiB tmpfs when this
    process may mount one (root); otherwise RLIMIT_FSIZE is lowered on the running trainer
    processes, so their next large write fails with EFBIG. Every rank exits
    EXIT_CHECKPOINT_WRITE_FAILED with the reason, the temp dir is removed and the previous
    checkpoint verifies. On one process the run is then resumed once there is space again and
    ends bitwise equal to the uninterrupted run."""
    ckdir = tempfile.mkdtemp(prefix="sapd-ckpt-")
    tmpfs = _mount_tmpfs(ckdir, "3m")
    out = str(tmp_path / "run")
    run = Run(backend, out, "checkpoint.every_steps=1", f"checkpoint.dir={ckdir}")
    try:
        run.until(lambda: os.path.exists(os.path.join(ckdir, "step-00000001", "meta.json")), "the first checkpoint")
        if tmpfs:
            _fill(ckdir)
        else:  # no mount allowed: a file-size limit on the trainer processes themselves
            import resource

            for rank in range(1 if backend == "single" else 2):
                resource.prlimit(run.pid_of_rank(rank), resource.RLIMIT_FSIZE, (16 * 1024, resource.RLIM_INFINITY))
        rc = run.wait()
        log = run.log()
        if backend == "single":
            assert rc == EXIT_CHECKPOINT_WRITE_FAILED, log[-4000:]
        else:
            assert rc != 0 and re.findall(r"exitcode\s*:\s*(-?\d+)", log).count(str(EXIT_CHECKPOINT_WRITE_FAILED)) >= 2, log[-4000:]
        # torch.save inside DCP/DeepSpeed reports ENOSPC as "unexpected pos"; the free space says why
        reason = r"(No space left on device|unexpected pos).*0\.0 MiB free" if tmpfs else "(File too large|unexpected pos)"
        assert re.search(rf"writing checkpoint .*\.tmp-step-0000000\d failed .*{reason}", log), log[-3000:]
        assert "the previous checkpoint (" in log and "is intact" in log
        left = sorted(n for n in os.listdir(ckdir) if n != "filler")
        assert left[-1].startswith("step-") and not any(n.startswith(".tmp") for n in left), left
        assert verify(os.path.join(ckdir, left[-1])) == []
        print(f"{backend}: full disk via {'tmpfs' if tmpfs else 'RLIMIT_FSIZE'}: kept {left}")
        if backend != "single":
            return
        if tmpfs:
            os.remove(os.path.join(ckdir, "filler"))
        again = Run("single", out, "checkpoint.every_steps=1", f"checkpoint.dir={ckdir}", "checkpoint.resume_from=auto")
        assert again.wait() == 0, again.tail()
        assert _resumed_at(again) == int(left[-1].split("-")[1])
        assert_same_as_reference(out, reference("single"), "single")
    finally:
        run.cleanup()
        if tmpfs:
            subprocess.run(["umount", ckdir], capture_output=True)
        shutil.rmtree(ckdir, ignore_errors=True)
