"""`scripts/verify.py` (`make verify`): a committed tiny pipeline recomputed from scratch in a fresh
clone matches dvc.lock hash for hash, also under the environment another CPU presents to the
numeric libraries; a tampered dvc.lock is reported and fails."""

from __future__ import annotations

import re
import sys

import pytest
import yaml

from tests.e2e import sh

pytestmark = [pytest.mark.slow, pytest.mark.system]

# What an AVX2-only CPU would present to the libraries, set from outside (MKL's own instruction cap,
# PyTorch's dispatch cap, oneDNN's ISA cap): on an AVX-512 machine, unpinned, this changes every
# trained output.
AVX2_ONLY = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@pytest.fixture
def committed(tiny_repo):
    """A tiny pipeline run natively (the environment a fresh shell has) and committed with its dvc.lock:
    conftest's shared ``tiny_built``, in a private copy (a test may tamper with it)."""
    return tiny_repo


def verify(repo, *args: str, **env: str):
    return sh(repo, sys.executable, str(repo / "scripts/verify.py"), *args, check=False, **env)


def test_recomputed_under_another_cpus_environment_matches_every_hash(committed):
    cp = verify(committed, **AVX2_ONLY)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    lines = [line for line in cp.stdout.splitlines() if re.match(r"(match|DIFFERS|MISSING) ", line)]
    lock = yaml.safe_load((committed / "dvc.lock").read_text())
    n_outs = sum(len(s.get("outs", [])) for s in lock["stages"].values())
    assert len(lines) == n_outs >= 15 and all(line.startswith("match") for line in lines), cp.stdout
    assert "models_out/metrics.json" in cp.stdout and "data/cv/pair.csv" in cp.stdout


def test_a_difference_is_reported_and_fails(committed):
    lock_path = committed / "dvc.lock"
    original = lock_path.read_text()
    lock = yaml.safe_load(original)
    out = lock["stages"]["pairs"]["outs"][0]
    out["md5"] = "0" * 32 + ".dir"
    lock_path.write_text(yaml.safe_dump(lock, sort_keys=False))
    sh(committed, "git", "commit", "-qam", "tampered")
    try:
        cp = verify(committed, "--quick")
        assert cp.returncode == 1, cp.stdout + cp.stderr
        assert re.search(r"^DIFFERS +data/pairs \(pairs\)", cp.stdout, re.M), cp.stdout
        assert re.search(r"^match +data/mnist \(mnist\)", cp.stdout, re.M), cp.stdout
    finally:
        lock_path.write_text(original)
        sh(committed, "git", "commit", "-qam", "restored")
