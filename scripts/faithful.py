"""The study the original's way, as one DVC experiment, and its results beside ours.

    python scripts/faithful.py          # `make faithful`: run the experiment, then export its results
    python scripts/faithful.py --export # only export an experiment named `faithful` that already ran

Faithful mode changes five params and nothing else: the ReLU on every head's logits
(``train.relu_logits``), no shuffling (``train.shuffle``), selection on the test pairs
(``cv.score_on``, ``loss_weights.score_on``) and the original's error bars (``figures.error_bars``).
It runs as ``dvc exp run --temp`` in a temporary copy, so the workspace and its committed results
stay as they are; `dvc exp show` lists it afterwards.
The export copies the experiment's ``metrics.json`` and ``findings.json`` (git-tracked, so part of
the experiment's commit) to ``results/faithful/`` with a ``provenance.json``, from which
``scripts/readme.py`` writes the comparison table of docs/faithful.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, whatever is installed

from digitpairs.core import numerics  # noqa: E402

OUT = REPO / "results/faithful"
NAME = "faithful"
OVERRIDES = {
    "train.relu_logits": "true",
    "train.shuffle": "false",
    "cv.score_on": "test",
    "loss_weights.score_on": "test",
    "figures.error_bars": "grid",
}
FILES = ("models_out/metrics.json", "models_out/findings.json", "params.yaml")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def experiment_ref(name: str) -> str:
    """The git ref of the newest experiment called ``name`` (DVC keeps them under refs/exps)."""
    refs = [r for r in git("for-each-ref", "--sort=-creatordate", "--format=%(refname)", "refs/exps").splitlines()]
    named = [r for r in refs if r.rsplit("/", 1)[-1] == name]
    if not named:
        raise SystemExit(f"no DVC experiment named {name!r}; run `make faithful` first.")
    return named[0]


def run() -> float:
    cmd = ["dvc", "exp", "run", "--temp", "--force", "-n", NAME]
    for key, value in OVERRIDES.items():
        cmd += ["-S", f"{key}={value}"]
    print("+", " ".join(cmd), flush=True)
    start = time.monotonic()
    subprocess.run(cmd, cwd=REPO, check=True)
    return time.monotonic() - start


def export(wall_s: float | None) -> None:
    ref = experiment_ref(NAME)
    OUT.mkdir(parents=True, exist_ok=True)
    for f in FILES[:2]:
        (OUT / Path(f).name).write_text(git("show", f"{ref}:{f}") + "\n")
    provenance = {
        "experiment": NAME,
        "baseline_commit": git("rev-parse", f"{ref}^"),
        "overrides": OVERRIDES,
        "command": "make faithful",
        "wall_s": None if wall_s is None else round(wall_s),
        "machine": numerics.machine(),
    }
    (OUT / "provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True, allow_nan=False) + "\n")
    print(f"exported {ref} to {OUT.relative_to(REPO)}/")


if __name__ == "__main__":
    export(None if "--export" in sys.argv[1:] else run())
