"""The numeric pins hold on other CPUs: the same trials give the same bytes natively and under
``qemu-x86_64 -cpu MODEL`` (user-mode emulation of another CPU: its CPUID, vendor and instruction set,
so MKL, OpenBLAS and PyTorch choose their code paths as they would on that CPU).

Emulated models: Intel Haswell (AVX2, the oldest CPU the pins target) and Skylake-Server, AMD EPYC
(Zen 1) and EPYC-Milan (Zen 3): two vendors, since MKL chooses its code path by vendor and OpenBLAS
its kernels by CPU model, so the GEMM batteries of ``tests/cpu_fingerprint.py`` check that the pinned
paths are taken on each. qemu's TCG has no AVX-512, so Skylake-Server runs without it (OpenBLAS would
otherwise pick its SkylakeX kernels there); the native machine is the AVX-512 one where it has it.
Needs Debian's qemu-user (``make qemu``); each emulated run takes about a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from digitpairs.core import numerics
from digitpairs.data.pairs import write_draws

import pytest

from tests.e2e import REPO

pytestmark = [pytest.mark.slow, pytest.mark.system]
QEMU = shutil.which("qemu-x86_64")
MODELS = ["Haswell", "Skylake-Server", "EPYC", "EPYC-Milan"]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory, mnist_splits):
    folder = tmp_path_factory.mktemp("pairs")
    write_draws(mnist_splits, folder, n_draws=1, seed=1)
    return folder


def fingerprint(pairs_dir, *prefix: str, **env: str) -> dict:
    # as a fresh shell has it (this process pinned itself)
    drop = {numerics.UNPINNED_ENV, *numerics.PIN_VARS}
    e = {k: v for k, v in os.environ.items() if k not in drop} | env
    cmd = [*prefix, sys.executable, "-m", "tests.cpu_fingerprint", str(pairs_dir)]
    cp = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=600)
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def native(pairs_dir):
    return fingerprint(pairs_dir)


@pytest.mark.parametrize("model", MODELS)
def test_same_bytes_on_an_emulated_cpu(pairs_dir, native, model):
    if QEMU is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-x86_64 is missing: `make qemu` installs Debian's qemu-user")
        pytest.skip("qemu-x86_64 not installed (make qemu)")
    emulated = fingerprint(pairs_dir, QEMU, "-cpu", model)
    assert emulated["cpu_capability"] == native["cpu_capability"] == "AVX2"
    assert emulated == native


def test_pins_matter_on_this_cpu(pairs_dir, native):
    """Where this CPU has AVX-512, the unpinned run dispatches to it and its bytes differ: the pins are
    what the cross-CPU equality above rests on (skipped on an AVX2-only machine, where both agree)."""
    unpinned = fingerprint(pairs_dir, DIGITPAIRS_UNPINNED="1")
    if not unpinned["cpu_capability"].startswith("AVX512"):
        pytest.skip(f"this CPU's best torch capability is {unpinned['cpu_capability']}: nothing to pin away")
    assert unpinned["gemm"] != native["gemm"]
    assert unpinned["gemm_mkl"] != native["gemm_mkl"]
    assert unpinned["lockstep"] != native["lockstep"]
    assert unpinned["loop"] != native["loop"]
