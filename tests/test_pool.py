"""local_map's process pool never outlives it: on a clean end, a failing job, an interrupt or a caller that
stops early, every worker is gone and the executor's manager thread has ended when it returns or raises, so
nothing is left for the interpreter's exit hooks (a stage that hung at exit waited for such a worker).

Real spawned pools of 2 workers, more jobs than workers; the jobs are the functions below."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import process as futures_process
from pathlib import Path

from digitpairs.training.runner import local_map

import pytest

SLOW_S = 600  # a job that would keep a worker busy far beyond any bound below
BOUND_S = 60  # spawning two workers that import torch takes seconds, more on a busy machine


def job(kind: str) -> str:
    """``fail`` raises; ``slow`` sleeps; ``stubborn`` ignores SIGTERM, as a worker still importing the stage
    package does (stages/__init__.py defers it), then sleeps; anything else returns itself."""
    if kind == "fail":
        raise ValueError("job failed")
    if kind == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if kind in ("slow", "stubborn"):
        time.sleep(SLOW_S)
    return kind


def assert_pool_gone(pids: list[int]) -> None:
    """No worker process (running or zombie) and no executor manager thread is left."""
    assert multiprocessing.active_children() == []
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
    assert not [t for t in threading.enumerate() if isinstance(t, futures_process._ExecutorManagerThread)]
    assert not [t for t in futures_process._threads_wakeups if t.is_alive()]  # what the exit hook would join


def pids() -> list[int]:
    return [p.pid for p in multiprocessing.active_children()]


def test_a_clean_run_yields_every_result_and_leaves_nothing():
    gen = local_map(job, ["a", "b", "c", "d"], workers=2, threads=1)
    got = [next(gen)]
    seen = pids()
    got += list(gen)
    assert sorted(got) == ["a", "b", "c", "d"] and len(seen) == 2
    assert_pool_gone(seen)


def test_a_failing_job_kills_workers_that_ignore_sigterm_and_running_jobs():
    start = time.monotonic()
    with pytest.raises(ValueError, match="job failed"):
        for _ in local_map(job, ["stubborn", "fail", "slow"], workers=2, threads=1):
            pass
    assert time.monotonic() - start < BOUND_S
    assert_pool_gone([])


def test_an_interrupt_while_workers_start_or_run_stops_them_all():
    seen: list[int] = []
    old = signal.signal(signal.SIGINT, signal.default_int_handler)  # a test runner may ignore SIGINT
    timer = threading.Timer(1.0, lambda: (seen.extend(pids()), os.kill(os.getpid(), signal.SIGINT)))
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            timer.start()
            for _ in local_map(job, ["slow"] * 3, workers=2, threads=1):
                pass
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, old)
    assert time.monotonic() - start < BOUND_S
    assert len(seen) == 2
    assert_pool_gone(seen)


def test_a_caller_that_stops_early_closes_the_pool():
    gen = local_map(job, ["quick", "slow", "slow"], workers=2, threads=1)
    assert next(gen) == "quick"
    seen = pids()
    start = time.monotonic()
    gen.close()  # GeneratorExit inside local_map, as run_trials' closing() does on any error
    assert time.monotonic() - start < BOUND_S
    assert len(seen) == 2
    assert_pool_gone(seen)
