"""Run many trials: choose an engine (per-model loop or lockstep), an executor, resume from a
checkpoint. Every stage that trains goes through :func:`run_trials`."""

from __future__ import annotations

import ast
import ctypes
import json
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import closing
from dataclasses import asdict, dataclass
from functools import lru_cache
from hashlib import sha256
from multiprocessing import get_context
from pathlib import Path

from digitpairs.core import numerics
from digitpairs.core.io import StageError, replacing
from digitpairs.core.params import ENGINES, EXECUTORS
from digitpairs.data.pairs import Draw, draw_path, existing_draw, load_draw
from digitpairs.training.models import weights_digest
from digitpairs.training.train import run_trial
from digitpairs.training.trials import Outcome, Trial

import torch
from tqdm import tqdm

# Source files whose code decides a trial's result: a checkpoint written by other code is stale.
RESULT_CODE = (
    "core/gemm.py",
    "core/seeding.py",
    "training/models.py",
    "training/trials.py",
    "training/semantics.py",
    "training/train.py",
    "training/lockstep.py",
    "training/lockstep_models.py",
    "training/lockstep_kernels.py",
)
# Torch threads per job, on every executor and whatever the number of jobs or CPUs: a float
# reduction split over a different number of threads can round differently, and then a resumed
# run (fewer jobs left) or another executor would not reproduce a trial bit for bit. Parallelism
# comes from running jobs side by side instead.
THREADS_PER_JOB = 1


def cpu_count() -> int:
    """CPUs this process may use (the affinity mask, which containers and `taskset` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@lru_cache(maxsize=1)
def code_digest() -> str:
    """Digest of the training code and torch version, part of every checkpoint key.

    It hashes the parsed code (:func:`parsed_code`), not the text: editing a comment or a docstring
    changes no result, so it keeps every checkpoint (DVC still reruns the stage, which then resumes
    all its trials)."""
    h = sha256(torch.__version__.encode())
    for name in RESULT_CODE:
        f = Path(__file__).parents[1] / name  # relative to the package root
        h.update(name.encode() + parsed_code(f.read_text()).encode())
    return h.hexdigest()[:12]


def parsed_code(source: str) -> str:
    """``source``'s syntax tree without docstrings (comments never reach it), as text."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:]
    return ast.dump(tree)


@lru_cache(maxsize=16)
def _draw(pairs_dir: str, draw: int) -> Draw:
    return load_draw(draw_path(Path(pairs_dir), draw))


def run_job(
    job: list[Trial],
    pairs_dir: str,
    engine: str,
    device: str,
    record_grad_norms: bool,
    keep_state: bool,
    draws: dict[int, Draw] | None = None,
) -> list[Outcome]:
    """Train one job (a single trial for ``loop``, a group of same-shape trials for ``lockstep``).

    ``draws`` lets a remote worker (Ray) use draws shipped with the job instead of reading
    ``pairs_dir``, which need not exist on its machine.
    """
    if draws is None:
        draws = {t.draw: _draw(pairs_dir, t.draw) for t in job}
    if device == "cuda":
        numerics.deterministic_cuda()
    if engine == "lockstep":
        from digitpairs.training.lockstep import run_lockstep

        outs = run_lockstep(job, draws, device=device, record_grad_norms=record_grad_norms)
    else:
        outs = [run_trial(t, draws[t.draw], device, record_grad_norms) for t in job]
    for o in outs:
        o.weights = weights_digest(o.state)
        if not keep_state:
            o.state = None
    return outs


def make_jobs(trials: list[Trial], engine: str, batch: int) -> list[list[Trial]]:
    """Loop: one trial a job. Lockstep: trials of one architecture and widths, ``batch`` at a time."""
    if engine == "loop":
        return [[t] for t in trials]
    from digitpairs.training.lockstep import group_trials

    return group_trials(trials, batch)


def _init_worker(threads: int, parent: int) -> None:
    """Pool worker set-up: the run's thread count, and death with the parent (Linux), so a killed
    stage leaves no orphans training trials nobody will record."""
    torch.set_num_threads(threads)
    # Ctrl-C reaches the whole process group: the parent alone handles it (and stops the workers),
    # so the terminal shows its one line, not a traceback per worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the stage's own handling of SIGTERM and SIGHUP (stages/__init__.py, which a spawned worker imports
    # again as its main module) is the parent's: a worker dies on them
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass
    if os.getppid() != parent:  # the parent died while this worker was starting: no signal will come
        os._exit(1)


def local_map(fn: Callable, jobs: list, workers: int, threads: int) -> Iterator:
    """Run ``fn(job)`` for each job in ``workers`` processes with ``threads`` torch threads each,
    yielding results as they finish. Only this (the parent) process sees results and writes files.

    The pool never outlives this generator, whichever way it ends:

    - every job done: the pool is shut down and joined (each worker exits on its sentinel);
    - a job raises, an exception or interrupt (KeyboardInterrupt) arrives here, or the caller closes
      the generator (GeneratorExit): queued jobs are cancelled, every process the executor started is
      killed and joined, and so is the executor's manager thread, before the exception goes on.

    Either way nothing is left for the interpreter's exit hooks to wait for. A caller that stops
    iterating early must close the generator (``contextlib.closing``): an unclosed generator keeps
    its pool until it is garbage-collected.
    """
    if workers <= 1:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for job in jobs:
                yield fn(job)
        finally:
            torch.set_num_threads(before)
        return
    ctx = get_context("spawn")  # fork after torch's thread pools start is unsafe
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads, os.getpid()))
    processes = pool._processes  # the executor's own table, {pid: process}, filled as it starts workers
    try:
        futures = [pool.submit(fn, job) for job in jobs]
        for fut in as_completed(futures):
            yield fut.result()
        pool.shutdown()
    finally:
        _stop(pool, processes)


def _stop(pool: ProcessPoolExecutor, processes: dict) -> None:
    """Cancel what is queued, kill and join every worker of ``pool``, then its manager thread; at once.

    Killed (SIGKILL), not asked to stop: a worker still starting runs the stage package's import,
    which defers SIGTERM until a ``run_stage`` that a worker never reaches (stages/__init__.py), so
    SIGTERM can be lost. And once any worker is killed, the call queue cannot be trusted: a worker
    killed while waiting in ``Queue.get`` holds the queue's reader lock for good, so a surviving one
    would wait for that lock forever, and the executor's manager thread (and, at exit,
    ``concurrent.futures``' exit hook) with it. Their results are discarded anyway. After a clean
    shutdown nothing is left alive and this returns at once."""
    manager = pool._executor_manager_thread  # None once shut down, or if no job was submitted
    pool.shutdown(wait=False, cancel_futures=True)
    started = list(processes.values())
    for p in started:
        p.kill()
    for p in started:
        p.join()
    if manager is not None:
        manager.join()  # it sees every worker gone, fails what was pending, and ends


class Checkpoint:
    """Append-only JSON-lines record of finished trials, keyed by the trial's configuration plus
    its data, engine, device, threads and code (see ``run_trials``).

    Each line carries a checksum of its own content, so a line torn by a kill, or edited, is
    detected, reported and its trial recomputed; everything else is reused.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.done: dict[str, dict] = {}
        if not self.path.exists():
            return
        text = self.path.read_text(errors="replace")
        good, bad = [], 0
        for line in text.splitlines():
            try:
                rec = json.loads(line)
                if rec["sha"] != _sha(rec["row"]):
                    raise ValueError("checksum mismatch")
                self.done[rec["row"]["key"]] = rec["row"]
                good.append(line)
            except (ValueError, KeyError, TypeError):
                bad += 1
        if bad:
            warnings.warn(
                f"{self.path}: {bad} corrupt or truncated checkpoint line(s) ignored; those trials are recomputed.",
                stacklevel=2,
            )
        if bad or (text and not text.endswith("\n")):
            # Rewrite with the good lines only: the next append then starts on a fresh line
            # (a torn last line would otherwise swallow it), and the warning is not repeated.
            with replacing(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in good))

    def add(self, row: dict) -> None:
        """Record one finished trial durably (one write, flushed and fsynced before returning). Signals
        wait until the line is written and counted, so an interrupt reports exactly what the file holds."""
        self.extend([row])

    def extend(self, rows: list[dict]) -> None:
        """Record finished trials durably in one write (:meth:`add`'s guarantees), such as trials another
        machine computed (scripts/full_grid.py)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        try:
            with open(self.path, "a") as f:
                f.writelines(
                    json.dumps({"row": r, "sha": _sha(r)}, sort_keys=True, allow_nan=False) + "\n" for r in rows
                )
                f.flush()
                os.fsync(f.fileno())
            self.done.update((r["key"], r) for r in rows)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _sha(row: dict) -> str:
    return sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()


def outcome_row(o: Outcome, key: str) -> dict:
    """A flat record of one outcome's identity, scores and weights digest (what a checkpoint keeps)."""
    return {"key": key, "trial": asdict(o.trial), "scores": o.scores, "weights": o.weights}


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
    threads: int = THREADS_PER_JOB,
) -> list[Outcome]:
    """Train ``trials`` and return their outcomes in the same order.

    Results do not depend on ``executor``, ``workers`` or scheduling: each trial's randomness comes
    from its own key, and every job runs with ``threads`` torch threads (default
    :data:`THREADS_PER_JOB`; results are bit-identical between runs with equal ``threads``).
    With ``checkpoint``, finished trials are recorded as they complete and skipped on a rerun
    (their outcomes then carry scores only, hence no checkpoint with ``keep_state`` or
    ``record_grad_norms``). A progress bar (done, rate, ETA) goes to stderr on a terminal only.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}.")
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose one of {EXECUTORS}.")
    if checkpoint and (keep_state or record_grad_norms):
        raise ValueError("a checkpoint keeps scores only: it cannot resume runs that keep states or gradient norms.")
    ckpt = Checkpoint(checkpoint) if checkpoint else None
    ckey = _CheckpointKey(Path(pairs_dir), engine, device, threads)
    by_key, todo = _resume(trials, ckpt, ckey)
    if ckpt:
        print(f"{desc}: resumed {len(by_key)} of {len(by_key) + len(todo)} trials from {ckpt.path}", file=sys.stderr)
    jobs = make_jobs(todo, engine, batch)
    fn = _JobFn(str(pairs_dir), engine, device, record_grad_norms, keep_state)
    results = _execute(fn, jobs, todo, executor, workers, threads)
    try:
        with (
            closing(results),
            tqdm(total=len(todo), desc=desc, unit="trial", disable=None, file=sys.stderr, smoothing=0.1) as bar,
        ):
            for outs in results:
                for o in outs:
                    by_key[o.trial.key()] = o
                    if ckpt:
                        ckpt.add(outcome_row(o, ckey(o.trial)))
                bar.update(len(outs))
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_kept(trials, ckpt, ckey, desc)) from None
    except StageError as err:  # the Ray cluster lost mid-run: what happened, then what was kept
        raise type(err)(f"{str(err).rstrip('.')}; {_kept(trials, ckpt, ckey, desc)}") from None
    return [by_key[t.key()] for t in trials]


def _resume(
    trials: list[Trial], ckpt: Checkpoint | None, ckey: _CheckpointKey
) -> tuple[dict[str, Outcome], list[Trial]]:
    """The outcomes ``ckpt`` already holds, by trial key (scores and weights digest only), and the trials
    still to train, each once however often it is listed."""
    done: dict[str, Outcome] = {}
    todo = []
    for t in trials:
        if ckpt and ckey(t) in ckpt.done:
            row = ckpt.done[ckey(t)]
            done[t.key()] = Outcome(t, row["scores"], weights=row.get("weights"))
        else:
            todo.append(t)
    return done, list({t.key(): t for t in todo}.values())


class _CheckpointKey:
    """A checkpoint entry is valid only for the same trial, data, engine, device, threads, code and
    numeric settings (pins, library versions: :func:`numerics.fingerprint`)."""

    def __init__(self, pairs_dir: Path, engine: str, device: str, threads: int) -> None:
        self.pairs_dir, self.engine, self.device, self.threads = pairs_dir, engine, device, threads
        self.digests: dict[int, str] = {}

    def __call__(self, t: Trial) -> str:
        if t.draw not in self.digests:
            data = existing_draw(draw_path(self.pairs_dir, t.draw)).read_bytes()
            self.digests[t.draw] = sha256(data).hexdigest()[:16]
        setting = f"{self.engine}-{self.device}-t{self.threads}-{code_digest()}-{numerics.digest(self.device)}"
        return f"{t.key()}-{self.digests[t.draw]}-{setting}"


def _execute(fn: _JobFn, jobs: list, todo: list[Trial], executor: str, workers: int | None, threads: int) -> Iterable:
    """The jobs' outcomes as they finish, on Ray or in local processes (on CUDA, one)."""
    cuda = fn.device == "cuda"
    if executor == "ray":
        from digitpairs.training.ray_executor import ray_map

        return ray_map(
            fn,
            jobs,
            threads=threads,
            gpus=1 if cuda else 0,
            cpus=cpu_count(),
            shared={d: _draw(fn.pairs_dir, d) for d in {t.draw for t in todo}},
            needs=lambda job: sorted({t.draw for t in job}),
        )
    if workers is None:
        workers = 1 if cuda else max(1, min(cpu_count() // threads, len(jobs)))
    return local_map(fn, jobs, workers, threads)


def _kept(trials: list[Trial], ckpt: Checkpoint | None, ckey: _CheckpointKey, desc: str) -> str:
    """What a stopped run leaves: the trials checkpointed, and how to go on."""
    total = len({t.key() for t in trials})
    if not ckpt:
        return f"{desc}: stopped before its {total} trials finished; `dvc repro` reruns it."
    # What the file holds, read again: an interrupt can land after a record's write and
    # before Checkpoint.add notes it (the moment a watcher of the file reacts to).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        done = Checkpoint(ckpt.path).done
    n = sum(ckey(t) in done for t in {t.key(): t for t in trials}.values())
    return f"{desc}: {n} of {total} trials are checkpointed in {ckpt.path}; `dvc repro` resumes from there."


@dataclass(frozen=True)
class _JobFn:
    """A picklable ``(job, draws=None) -> outcomes`` function for process pools and Ray: :func:`run_job`
    with the run's settings."""

    pairs_dir: str
    engine: str
    device: str
    record_grad_norms: bool
    keep_state: bool

    def __call__(self, job: list[Trial], draws: dict[int, Draw] | None = None) -> list[Outcome]:
        return run_job(
            job, self.pairs_dir, self.engine, self.device, self.record_grad_norms, self.keep_state, draws=draws
        )
