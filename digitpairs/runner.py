"""Run many trials: choose an engine (per-model loop or lockstep), an executor, resume from a
checkpoint. Every stage that trains goes through :func:`run_trials`."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from functools import lru_cache
from hashlib import sha256
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm import tqdm

from digitpairs.pairs import Draw, draw_path, load_draw
from digitpairs.trials import Outcome, Trial, run_trial

ENGINES = ("loop", "lockstep")
EXECUTORS = ("local", "ray")


@lru_cache(maxsize=16)
def _draw(pairs_dir: str, draw: int) -> Draw:
    return load_draw(draw_path(Path(pairs_dir), draw))


def run_job(
    job: list[Trial], pairs_dir: str, engine: str, device: str, record_grad_norms: bool, keep_state: bool
) -> list[Outcome]:
    """Train one job (a single trial for ``loop``, a group of same-shape trials for ``lockstep``)."""
    draws = {t.draw: _draw(pairs_dir, t.draw) for t in job}
    if engine == "lockstep":
        from digitpairs.lockstep import run_lockstep

        outs = run_lockstep(job, draws, device=device, record_grad_norms=record_grad_norms)
    else:
        outs = [run_trial(t, draws[t.draw], device, record_grad_norms) for t in job]
    if not keep_state:
        for o in outs:
            o.state = None
    return outs


def make_jobs(trials: list[Trial], engine: str, batch: int) -> list[list[Trial]]:
    """Loop: one trial a job. Lockstep: trials of one architecture and widths, ``batch`` at a time."""
    if engine == "loop":
        return [[t] for t in trials]
    from digitpairs.lockstep import group_trials

    return group_trials(trials, batch)


def _set_threads(n: int) -> None:
    torch.set_num_threads(n)


def local_map(fn: Callable, jobs: list, workers: int, threads: int) -> Iterator:
    """Run ``fn(job)`` for each job in ``workers`` processes, yielding results as they finish."""
    if workers <= 1:
        for job in jobs:
            yield fn(job)
        return
    ctx = get_context("spawn")  # fork after torch's thread pools start is unsafe
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_set_threads, initargs=(threads,)) as pool:
        futures = [pool.submit(fn, job) for job in jobs]
        for fut in as_completed(futures):
            yield fut.result()


class Checkpoint:
    """Append-only JSON-lines record of finished trials, keyed by ``Trial.key()``.

    Each line carries a checksum of its own content, so a line torn by a kill, or edited, is
    detected, reported and its trial recomputed; everything else is reused.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.done: dict[str, dict] = {}
        if not self.path.exists():
            return
        bad = 0
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
                body = json.dumps(rec["row"], sort_keys=True)
                if rec["sha"] != sha256(body.encode()).hexdigest():
                    raise ValueError("checksum mismatch")
                self.done[rec["row"]["key"]] = rec["row"]
            except (ValueError, KeyError, TypeError):
                bad += 1
        if bad:
            warnings.warn(
                f"{self.path}: {bad} corrupt or truncated checkpoint line(s) ignored; those trials are recomputed.",
                stacklevel=2,
            )

    def add(self, row: dict) -> None:
        """Record one finished trial durably (flushed and fsynced before returning)."""
        body = json.dumps(row, sort_keys=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"row": row, "sha": sha256(body.encode()).hexdigest()}, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[row["key"]] = row


def outcome_row(o: Outcome, key: str) -> dict:
    """A flat record of one outcome's identity and scores (what a checkpoint keeps)."""
    return {"key": key, "trial": asdict(o.trial), "scores": o.scores}


def run_trials(
    trials: list[Trial],
    pairs_dir: Path,
    *,
    engine: str = "loop",
    executor: str = "local",
    device: str = "cpu",
    workers: int | None = None,
    batch: int = 64,
    record_grad_norms: bool = False,
    keep_state: bool = False,
    checkpoint: Path | None = None,
    desc: str = "trials",
) -> list[Outcome]:
    """Train ``trials`` and return their outcomes in the same order.

    Results do not depend on ``executor``, ``workers`` or scheduling: each trial's randomness comes
    from its own key. With ``checkpoint``, finished trials are recorded as they complete and
    skipped on a rerun (their outcomes then carry scores only).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}.")
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose one of {EXECUTORS}.")
    ckpt = Checkpoint(checkpoint) if checkpoint else None
    digests: dict[int, str] = {}

    def ckey(t: Trial) -> str:
        """A checkpoint entry is valid only for the same trial, data, engine and device."""
        if t.draw not in digests:
            digests[t.draw] = sha256(draw_path(Path(pairs_dir), t.draw).read_bytes()).hexdigest()[:16]
        return f"{t.key()}-{digests[t.draw]}-{engine}-{device}"

    by_key: dict[str, Outcome] = {}
    todo = []
    for t in trials:
        if ckpt and ckey(t) in ckpt.done:
            by_key[t.key()] = Outcome(t, ckpt.done[ckey(t)]["scores"])
        else:
            todo.append(t)
    todo = list({t.key(): t for t in todo}.values())  # identical trials train once
    jobs = make_jobs(todo, engine, batch)
    cuda = device == "cuda"
    if workers is None:
        workers = 1 if cuda else min(os.cpu_count() or 1, max(1, len(jobs)))
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    fn = _JobFn(str(pairs_dir), engine, device, record_grad_norms, keep_state)
    if executor == "ray":
        from digitpairs.ray_executor import ray_map

        results: Iterable = ray_map(fn, jobs)
    else:
        if workers <= 1:
            torch.set_num_threads(threads)
        results = local_map(fn, jobs, workers, threads)
    with tqdm(total=len(todo), desc=desc, unit="trial", disable=None) as bar:
        for outs in results:
            for o in outs:
                by_key[o.trial.key()] = o
                if ckpt:
                    ckpt.add(outcome_row(o, ckey(o.trial)))
            bar.update(len(outs))
    return [by_key[t.key()] for t in trials]


class _JobFn:
    """A picklable ``job -> outcomes`` function for process pools and Ray."""

    def __init__(self, pairs_dir: str, engine: str, device: str, grad_norms: bool, keep_state: bool) -> None:
        self.args = (pairs_dir, engine, device, grad_norms, keep_state)

    def __call__(self, job: list[Trial]) -> list[Outcome]:
        return run_job(job, *self.args)
