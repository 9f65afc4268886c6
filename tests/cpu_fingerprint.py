"""Train a few trials of both engines, multiply a battery of matrices, and print one hash of each.

Run by ``tests/test_cpus.py`` natively and under ``qemu-x86_64 -cpu MODEL`` (another CPU, emulated):
equal hashes mean the numeric pins hold on that CPU. ``python -m tests.cpu_fingerprint PAIRS_DIR``.
"""

from __future__ import annotations

import json
import sys
from hashlib import sha256
from pathlib import Path

import digitpairs  # noqa: F401  (numeric pins before torch computes)
from digitpairs.core import gemm, numerics
from digitpairs.training.runner import run_trials
from digitpairs.training.semantics import TrainConfig
from digitpairs.training.trials import make_trial

import torch

WIDTHS = dict(nbch1=4, nbch2=8, nbfch=16, batch_norm=True, skip_connections=True)
# Batched products of the shapes the loop engine's MKL GEMMs take at the study's widths (conv1's 9 or 72
# im2col columns into 8-32 channels, the wider layers): the tiny trainings above do not reach every MKL
# kernel, and under MKL_CBWR=AVX2,STRICT the first four shapes round differently on an emulated AMD
# EPYC than on Intel CPUs.
GEMMS = [(2, 100, 9, 8), (2, 100, 72, 8), (4, 100, 200, 16), (2, 32, 256, 100), (2, 100, 800, 256), (6, 576, 72, 32)]
# The lockstep engine's products (core/gemm.py) at the pipeline's largest widths, 32/256/256 with skips, a
# mini-batch of 100 pairs (200 digit images, conv1 on 36 pooled positions x 4 members), each layer's
# forward (m, k, n) and both backward products (grad_h: (m, n, k); grad_w: (k, m, n), its first operand
# a transposed view): small trainings never reach the kernels and blockings that large sizes take.
LAYERS = [(7200, 9, 32), (3600, 18, 32), (200, 1152, 256), (200, 196, 1152), (200, 196, 256), (200, 256, 256)]
LAYERS += [(200, 256, 10), (100, 20, 2), (100, 256, 2)]


def _products(g: torch.Generator):
    """Operands of every product :data:`LAYERS` makes, as the engine lays them out (one model)."""
    for m, k, n in LAYERS:
        h, w, grad = (
            torch.randn(1, m, k, generator=g),
            torch.randn(1, k, n, generator=g),
            torch.randn(1, m, n, generator=g),
        )
        yield h, w
        yield grad, w.mT
        yield h.mT, grad


def gemm_digest() -> dict[str, str]:
    """Hashes of :data:`GEMMS` through torch (MKL, batched and single) and of the lockstep products
    of :data:`LAYERS` through :func:`digitpairs.core.gemm.bmm`, on fixed random operands."""
    g = torch.Generator().manual_seed(0)
    mkl, road = sha256(), sha256()
    for b, m, k, n in GEMMS:
        a, c = torch.randn(b, m, k, generator=g), torch.randn(b, k, n, generator=g)
        mkl.update(torch.bmm(a, c).numpy().tobytes())
        mkl.update((a[0] @ c[0]).numpy().tobytes())
    for a, c in _products(g):
        road.update(gemm.bmm(a, c).numpy().tobytes())
    return {"gemm_mkl": mkl.hexdigest(), "gemm": road.hexdigest()}


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
    out |= gemm_digest()
    out["openblas"] = json.dumps(numerics.openblas(), sort_keys=True)
    out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return out


if __name__ == "__main__":
    print(json.dumps(fingerprint(Path(sys.argv[1])), sort_keys=True))
