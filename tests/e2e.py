"""Helpers for tests that run the real pipeline in a temporary copy of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SKIP = {".venv", ".git", "data", "models_out", "plots", "dvc_plots", "test-artifacts", ".pytest_cache", ".ruff_cache"}

TINY = {
    "data": {"n_draws": 2},
    "train": {"epochs": 2},
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
    "recipe": {"n_draws": 1, "nbch1": [8], "nbch2": [8], "nbfch": [16], "lr": [0.1]},
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


def set_params(repo: Path, overrides: dict) -> None:
    """Deep-merge ``overrides`` into the copy's params.yaml."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in overrides.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


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
