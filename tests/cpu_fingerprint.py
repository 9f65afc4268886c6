"""Train a few trials of both engines, multiply a battery of matrices, and print one hash of each.

Run by ``tests/test_cpus.py`` natively and under ``qemu-x86_64 -cpu MODEL`` (another CPU, emulated):
equal hashes mean the numeric pins hold on that CPU. ``python -m tests.cpu_fingerprint PAIRS_DIR``.
"""

from __future__ import annotations

import json
import sys
from hashlib import sha256
from pathlib import Path

import torch

import digitpairs  # noqa: F401  (numeric pins before torch computes)
from digitpairs.training.runner import run_trials
from digitpairs.training.train import TrainConfig
from digitpairs.training.trials import make_trial

WIDTHS = dict(nbch1=4, nbch2=8, nbfch=16, batch_norm=True, skip_connections=True)
# Batched products of the shapes the engines multiply at the study's widths (conv1's 9 or 72 im2col
# columns into 8-32 channels, the wider layers): the tiny trainings above do not reach every MKL
# kernel, and under MKL_CBWR=AVX2,STRICT the first four shapes round differently on an emulated AMD
# EPYC than on Intel CPUs.
GEMMS = [(2, 100, 9, 8), (2, 100, 72, 8), (4, 100, 200, 16), (2, 32, 256, 100), (2, 100, 800, 256), (6, 576, 72, 32)]


def gemm_digest() -> str:
    """A hash of :data:`GEMMS` on fixed random operands, batched and single."""
    g = torch.Generator().manual_seed(0)
    h = sha256()
    for b, m, k, n in GEMMS:
        a, c = torch.randn(b, m, k, generator=g), torch.randn(b, k, n, generator=g)
        h.update(torch.bmm(a, c).numpy().tobytes())
        h.update((a[0] @ c[0]).numpy().tobytes())
    return h.hexdigest()


def fingerprint(pairs_dir: Path) -> dict[str, str]:
    """Per engine, a hash of every trial's final weights, scores and per-step gradient norms."""
    trials = [
        make_trial(variant, WIDTHS, TrainConfig(lr=lr, epochs=2), draw=0, seed=1)
        for variant, lr in (("pair", 0.1), ("siamese-2", 0.25), ("siamese-10", 0.1))
    ]
    out = {}
    for engine in ("loop", "lockstep"):
        h = sha256()
        for o in run_trials(trials, pairs_dir, engine=engine, record_grad_norms=True, keep_state=True, desc=engine):
            h.update(json.dumps(o.scores, sort_keys=True).encode())
            h.update(o.result.grad_norms.numpy().tobytes())
            for name, t in sorted(o.state.items()):
                h.update(name.encode() + t.contiguous().numpy().tobytes())
        out[engine] = h.hexdigest()
    out["gemm"] = gemm_digest()
    out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return out


if __name__ == "__main__":
    print(json.dumps(fingerprint(Path(sys.argv[1])), sort_keys=True))
