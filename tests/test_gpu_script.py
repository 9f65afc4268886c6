"""`scripts/gpu_full_grid.py run`, the GPU machine's script, exercised on the CPU with a tiny grid:
it writes the tables and provenance, and a second run resumes every trial from its checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import SHARED_MNIST
from tests.e2e import REPO

pytestmark = [pytest.mark.slow, pytest.mark.system]


def run(tmp_path, out: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts/gpu_full_grid.py"), "run", "--mnist", str(SHARED_MNIST),
           "--out", str(tmp_path / out), "--state", str(tmp_path / "state"), "--device", "cpu", "--tiny",
           "--skip-checks", "--workers", "1", "--budget", "300"]  # fmt: skip
    cp = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert cp.returncode == 0, cp.stdout[-2000:] + cp.stderr[-2000:]
    return cp


def test_tiny_grid_writes_results_and_resumes(tmp_path):
    first = run(tmp_path, "out1")
    with tarfile.open(tmp_path / "out1/results.tar.gz") as tar:
        names = set(tar.getnames())
        metrics = json.loads(tar.extractfile("results/metrics.json").read())
        prov = json.loads(tar.extractfile("results/provenance.json").read())
    assert {"results/cv/pair.csv", "results/cv/siamese.csv", "results/loss_weights.csv"} <= names
    assert set(metrics) == {"pair", "siamese-2", "siamese-10"} and prov["grid_complete"] is True
    assert "complete: True" in first.stdout
    second = run(tmp_path, "out2")
    assert "cv@pair: resumed 32 of 32 trials" in second.stderr + second.stdout
    assert "cv@siamese: resumed 64 of 64 trials" in second.stderr + second.stdout
    with tarfile.open(tmp_path / "out2/results.tar.gz") as tar:
        assert json.loads(tar.extractfile("results/metrics.json").read()) == metrics
