"""params.yaml validation, and the stage scripts' one-line errors."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from digitpairs.params import ParamError, validate
from tests.e2e import REPO

DEFAULTS = yaml.safe_load((REPO / "params.yaml").read_text())


def test_committed_params_are_valid():
    assert validate(copy.deepcopy(DEFAULTS)) == DEFAULTS


def edited(section: str, key: str, value) -> dict:
    p = copy.deepcopy(DEFAULTS)
    p[section][key] = value
    return p


@pytest.mark.parametrize(
    "section,key,value,message",
    [
        ("cv", "nbch3", [8], "unknown key cv.nbch3"),
        ("cv", "lr", [], "cv.lr must be a non-empty list"),
        ("cv", "lr", [0.1, 0.0], r"cv.lr\[1\] must be > 0"),
        ("cv", "lr", [0.1, -1], r"cv.lr\[1\] must be > 0"),
        ("cv", "lr", 0.1, "cv.lr must be a non-empty list"),
        ("cv", "nbch1", [8, "16"], r"cv.nbch1\[1\] must be an integer"),
        ("cv", "batch_norm", ["yes"], r"cv.batch_norm\[0\] must be true or false"),
        ("cv", "nbfch", [64, 64], "cv.nbfch lists a value twice"),
        ("data", "n_draws", 0, "data.n_draws must be >= 1"),
        ("cv", "n_draws", 0, "cv.n_draws must be >= 1"),
        ("cv", "n_draws", 11, "cv.n_draws=11 exceeds data.n_draws=10"),
        ("loss_weights", "n_draws", 11, "loss_weights.n_draws=11 exceeds data.n_draws=10"),
        ("train", "epochs", 2.5, "train.epochs must be an integer"),
        ("train", "batch_size", 5000, "train.batch_size=5000 exceeds data.n_pairs"),
        ("train", "engine", "jax", "train.engine must be one of"),
        ("cv", "score_on", "train", "cv.score_on must be one of val, test"),
        ("grad_norms", "draw", 10, "grad_norms.draw=10 must be < data.n_draws"),
    ],
)
def test_bad_values_name_the_key(section, key, value, message):
    with pytest.raises(ParamError, match=message):
        validate(edited(section, key, value))


def test_unknown_and_missing_sections():
    p = copy.deepcopy(DEFAULTS)
    p["optimizer"] = {}
    with pytest.raises(ParamError, match="unknown section 'optimizer'"):
        validate(p)
    p = copy.deepcopy(DEFAULTS)
    del p["train"]["seed"]
    with pytest.raises(ParamError, match="train.seed is missing"):
        validate(p)


def stage(tmp: Path, name: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, str(REPO / "stages" / f"{name}.py")],
        cwd=tmp,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )


def test_check_params_stage_fails_with_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(edited("cv", "lr", [0.1, -1])))
    cp = stage(tmp_path, "check_params")
    assert cp.returncode == 1
    assert cp.stderr.strip().splitlines() == ["error: cv.lr[1] must be > 0, got -1."]
    assert not (tmp_path / "data/params.ok").exists()


def test_mnist_stage_offline_fails_cleanly(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cp = stage(tmp_path, "mnist", MNIST_MIRROR=f"http://127.0.0.1:{port}/")
    assert cp.returncode == 1
    lines = cp.stderr.strip().splitlines()
    assert lines[-1].startswith("error: Could not download MNIST file train-images-idx3-ubyte.gz")
    assert "MNIST_MIRROR" in lines[-1]
    assert not list((tmp_path / "data/mnist").rglob("*ubyte*"))
