"""Helpers for tests that run the real pipeline in a temporary copy of the repository."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SKIP = {".venv", ".git", "data", "models_out", "plots", "dvc_plots", "test-artifacts", ".pytest_cache", ".ruff_cache"}

TINY = {
    "data": {"n_draws": 2},
    "train": {"epochs": 1},
    "cv": {
        "n_draws": 1,
        "nbch1": [8],
        "nbch2": [8],
        "nbfch": [16],
        "batch_norm": [True],
        "skip_connections": [False],
        "lr": [0.1, 0.5],
    },
    "loss_weights": {"n_draws": 1, "exponents": [0, -1]},
    "recipe": {"n_draws": 1, "ablation_draws": 1, "nbch1": [8], "nbch2": [8], "nbfch": [16], "lr": [0.1]},
}


def env(**extra: str) -> dict:
    """The venv's python first on PATH (dvc.yaml runs `python ...`), MNIST from the shared folder."""
    from tests.conftest import SHARED_MNIST

    e = dict(os.environ)
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e["PATH"]
    e["MNIST_MIRROR"] = str(SHARED_MNIST)
    e.setdefault("GIT_AUTHOR_NAME", "test")
    e.setdefault("GIT_AUTHOR_EMAIL", "test@example.invalid")
    e.setdefault("GIT_COMMITTER_NAME", "test")
    e.setdefault("GIT_COMMITTER_EMAIL", "test@example.invalid")
    e.update(extra)
    return e


def sh(cwd: Path, *cmd: str, check: bool = True, **extra: str) -> subprocess.CompletedProcess:
    """Run a command in ``cwd``; on failure show its output in the assertion message."""
    cp = subprocess.run(cmd, cwd=cwd, env=env(**extra), capture_output=True, text=True)
    if check and cp.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({cp.returncode}):\n{cp.stdout}\n{cp.stderr}")
    return cp


def dvc(cwd: Path, *args: str, check: bool = True, **extra: str) -> subprocess.CompletedProcess:
    return sh(cwd, str(Path(sys.executable).parent / "dvc"), *args, check=check, **extra)


POOL_CPUS = 2  # a stage run by start_dvc sees this many CPUs: a pool of 2 workers wherever the machine has 2


def start_dvc(cwd: Path, *args: str, limit_kib: int = 0, **extra: str) -> subprocess.Popen:
    """`dvc <args>` in the background, as a terminal's foreground job: its own session and process group,
    SIGINT at its default, on POOL_CPUS CPUs (a stage's pool size follows its CPUs); output merged.
    ``limit_kib``: run it as `ulimit -v <limit_kib> && dvc <args>` in a shell. Ended by :func:`finish`."""

    def child() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:POOL_CPUS])

    limit = ["sh", "-c", f'ulimit -v {limit_kib} && exec "$@"', "sh"] if limit_kib else []
    return subprocess.Popen(
        [*limit, str(Path(sys.executable).parent / "dvc"), *args],
        cwd=cwd,
        env=env(**extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=child,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, limit: float, started: float) -> str:
    """Wait for a :func:`start_dvc` command until ``limit`` seconds after ``started`` (a monotonic time),
    and return the rest of its output; fail if it is still running then (after killing its session), or
    if any process of its session (the stage's pool workers included) is still alive a moment after."""
    try:
        out, _ = proc.communicate(timeout=max(0.0, started + limit - time.monotonic()))
    except subprocess.TimeoutExpired:
        left = session(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"still running after {limit} s: {left}\n{out}") from None
    deadline = time.monotonic() + 5  # the resource tracker of a stage's pool sees its stage end a moment later
    while session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert session(proc.pid) == [], f"left alive: {session(proc.pid)}\n{out}"
    return out


def session(sid: int) -> list[str]:
    """``pid command`` of each live process of session ``sid`` (a zombie is dead: left out)."""
    alive = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if proc.name.isdigit() and int(stat[3]) == sid and stat[0] != "Z":
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                alive.append(f"{proc.name} {cmdline[:200]}")
        except (OSError, IndexError, ValueError):
            continue  # not a process, or one that ended meanwhile
    return alive


def set_params(repo: Path, overrides: dict) -> None:
    """Deep-merge ``overrides`` into the copy's params.yaml."""
    path = repo / "params.yaml"
    path.write_text(merged(path.read_text(), overrides))


def merged(text: str, overrides: dict) -> str:
    """params.yaml's ``text`` with ``overrides`` deep-merged, as set_params writes it."""
    params = yaml.safe_load(text)
    for section, values in overrides.items():
        params[section].update(values)
    return yaml.safe_dump(params, sort_keys=False)


def clone(dest: Path, overrides: dict | None = TINY) -> Path:
    """A fresh git repository holding the project's files (no outputs), with tiny params committed."""

    def ignore(folder: str, names: list[str]) -> list[str]:
        if Path(folder) == REPO:
            return [n for n in names if n in SKIP]
        if Path(folder) == REPO / ".dvc":  # the work tree's cache would let stages be restored, not run
            return [n for n in names if n in ("cache", "tmp")]
        return []

    shutil.copytree(REPO, dest, ignore=ignore)
    if overrides:
        set_params(dest, overrides)
    sh(dest, "git", "init", "-q")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "project")
    return dest


# folders holding the pipeline's outputs (docs/figures: the README's figure, a git-tracked output)
OUTPUT_DIRS = ("data", "models_out", "plots", "docs/figures")


def snapshot(repo: Path, skip: str = "") -> dict[str, str]:
    """md5 of every output file (checkpoints aside: they are not outputs) and dvc.lock; ``skip``: a path
    (file or folder) left out, the input a test broke on purpose."""
    files = [p for d in OUTPUT_DIRS for p in (repo / d).rglob("*") if p.is_file() and "checkpoints" not in p.parts]
    files += [repo / "dvc.lock"] if (repo / "dvc.lock").exists() else []  # none where DVC never ran
    rel = {str(p.relative_to(repo)): p for p in sorted(files)}
    return {k: hashlib.md5(p.read_bytes()).hexdigest() for k, p in rel.items() if not (skip and k.startswith(skip))}


def pipeline_outputs(repo: Path) -> dict[str, str]:
    """snapshot() less DVC's own files (dvc.lock, the .gitignore files it writes): what the stages wrote."""
    return {k: v for k, v in snapshot(repo).items() if k != "dvc.lock" and not k.endswith(".gitignore")}


def ran(log: str) -> set[str]:
    """The stages a `dvc repro` (or `dvc exp run`) log says it ran."""
    return set(re.findall(r"Running stage '([^']+)'", log))


BUILD_LOG = "repro.log"  # beside the tiny pipeline's folder: the build's `dvc repro` output
BUILD_STATUS = "status.txt"  # beside it too: `git status --porcelain -uall` after the build, before its commit


def build_tiny(repo: Path) -> Path:
    """clone() with TINY params, `dvc repro` run natively, then `git add -A && git commit`: the committed
    tiny pipeline. The build's log and the git status it left go to files beside ``repo``."""
    from digitpairs.core import numerics

    clone(repo)
    # natively: the environment a fresh shell has, no numeric pins set from outside (this process imported
    # digitpairs, which pinned its own environment); each stage sets the pins itself on import
    cp = dvc(repo, "repro", **dict.fromkeys(numerics.PIN_VARS, ""))
    (repo.parent / BUILD_LOG).write_text(cp.stdout + cp.stderr)
    (repo.parent / BUILD_STATUS).write_text(sh(repo, "git", "status", "--porcelain", "--untracked-files=all").stdout)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny run")
    return repo


def build_log(repo: Path) -> str:
    """The `dvc repro` output that built the tiny pipeline ``repo`` (or the one it was copied from)."""
    return (repo.parent / BUILD_LOG).read_text()


def build_status(repo: Path) -> str:
    """`git status --porcelain --untracked-files=all` of the tiny pipeline right after its build."""
    return (repo.parent / BUILD_STATUS).read_text()


def copy_repo(src: Path, dest: Path) -> Path:
    """A private copy of a built repository: work tree, .git, .dvc/cache (symlinks kept as links), and
    the build's log and status beside it."""
    shutil.copytree(src, dest, symlinks=True)
    for name in (BUILD_LOG, BUILD_STATUS):
        if (src.parent / name).exists():
            shutil.copy2(src.parent / name, dest.parent / name)
    return dest


def edited_text(text: str, key: str, value: str) -> str:
    """params.yaml's ``text`` with ``section.key`` set to the YAML text ``value`` (a text edit, so YAML
    spellings such as .inf or yes reach DVC and the stages as written)."""
    from digitpairs.core.params import parse

    section, name = key.split(".")
    params = parse(text)
    params[section][name] = "BAD_VALUE_HERE"
    return yaml.safe_dump(params, sort_keys=False).replace("BAD_VALUE_HERE", value)


def full_grid_module():
    """scripts/full_grid.py loaded as a module (a script, not a package member), for its constants."""
    spec = importlib.util.spec_from_file_location("full_grid", REPO / "scripts/full_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
