"""Several fine-tuning runs at a time on the CPU (`ExperimentSettings.jobs`), each in a process
of its own: for machines with more cores than one small model's run keeps busy. Whether it pays
depends on how a run scales over the cores, so measure: on 2 cores with AVX512-BF16 a run's 2
threads scale almost fully (it trained 1.84x as long with 1 thread beside another run), which
leaves little for two runs side by side to gain (docs/experiment.md, "Time")."""

from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Callable, Iterator

from sap_dist.hardware import usable_cores
from sap_dist.run_control.stop import Preempted


def threads_per_job(jobs: int, threads: int | None) -> int:
    """torch threads of each of `jobs` runs: `threads` when set, else the usable cores shared out."""
    return threads or max(1, usable_cores() // max(1, jobs))


_stop_requested = False
"""In a worker: Ctrl-C came (while it judged or waited, or it stopped a run), so it starts no run."""


def _note_stop(signum, frame) -> None:
    global _stop_requested
    _stop_requested = True


def _start_worker(threads: int) -> None:
    import torch

    # Ctrl-C reaches every process of the terminal's group. A worker in training stops at its next
    # step boundary (the trainer installs its own handler, and restores this one after); one that
    # is judging finishes, so no finished run is lost; none starts another run after it: the pool
    # hands a worker its next run before the experiment can take it back.
    signal.signal(signal.SIGINT, _note_stop)
    torch.set_num_threads(threads)


def _run_unless_stopped(fn: Callable[..., dict], call: dict[str, Any]) -> dict:
    global _stop_requested
    if _stop_requested:
        raise Preempted("stopped before it started", None)
    try:
        return fn(**call)
    except Preempted:
        _stop_requested = True
        raise


def run_at_a_time(fn: Callable[..., dict], calls: list[dict[str, Any]], jobs: int,
                  threads: int) -> Iterator[tuple[int, dict]]:
    """Yield (index into `calls`, fn(**call)) as runs finish, `jobs` at a time in processes of their
    own with `threads` torch threads each (their progress bars share the terminal). When one run
    fails or the caller stops iterating (Ctrl-C), no new run starts, the ones in progress are
    waited for, and the error goes on."""
    context = multiprocessing.get_context("spawn")  # fork after torch's thread pools start can hang
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_start_worker,
                             initargs=(threads,)) as pool:
        pending: dict[Future, int] = {pool.submit(_run_unless_stopped, fn, call): i for i, call in enumerate(calls)}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=pending.__getitem__):
                    index = pending.pop(future)
                    yield index, future.result()
        finally:
            for future in pending:
                future.cancel()
