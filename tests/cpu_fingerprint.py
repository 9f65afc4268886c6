"""Train a few trials of both engines and print one hash of everything they produced.

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
    out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return out


if __name__ == "__main__":
    print(json.dumps(fingerprint(Path(sys.argv[1])), sort_keys=True))
