"""What else siamese-plus's recipe was tried with: each attempt is the committed recipe
(``data/recipe/selected.json``, searched by the ``recipe`` stage) with one change, trained on the
validation pairs of the first ``N`` draws, paired by draw with the recipe itself, the t-test
p-values Holm-corrected over the attempts. An attempt that earns its place goes into ``params.yaml``'s
``recipe`` section, where the pipeline's ablation keeps measuring it.

    python scripts/recipe_attempts.py 10     # after `dvc repro` (or `dvc pull`); writes results/recipe-attempts/

It builds the trials as the ``recipe`` stage's ablation does (``study.ablation_trials``) and computes
the same statistics (``findings.ablation``); the recipe's own rows come from the stage's checkpoint.
``scripts/readme.py`` writes the table of docs/siamese-plus.md from ``results/recipe-attempts/``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, whatever is installed

import digitpairs  # noqa: E402,F401  (numeric pins before torch computes)
from digitpairs.core import numerics, params  # noqa: E402
from digitpairs.core.io import run_stage, write_csv, write_json  # noqa: E402
from digitpairs.core.paths import CHECKPOINTS, CV_DIR, RECIPE_SELECTED  # noqa: E402
from digitpairs.core.variants import ALL_ADDITIONS  # noqa: E402
from digitpairs.report.findings import ablation  # noqa: E402
from digitpairs.training.study import ablation_table, ablation_trials, run  # noqa: E402

OUT = REPO / "results/recipe-attempts"
# name -> the change to the recipe's training (TrainConfig fields); lr relative to the selected one
ATTEMPTS = {
    "elastic distortion, strength 1.5, width 3": {"elastic": 1.5, "elastic_sigma": 3.0},
    "elastic distortion, strength 3": {"elastic": 3.0},
    "elastic distortion, strength 5": {"elastic": 5.0},
    "shifts of up to 2 pixels": {"shift": 2},
    "lr x 2": {"lr_factor": 2.0},
    "lr x 0.5": {"lr_factor": 0.5},
}


def attempt_trials(p: dict, selected: dict) -> tuple[list[str], list]:
    """The recipe's rows (named as the ablation names them), then one row per attempt on the same draws."""
    names, trials = ablation_trials(selected, p)
    recipe = [t for n, t in zip(names, trials, strict=True) if n == ALL_ADDITIONS]
    names, trials = [ALL_ADDITIONS] * len(recipe), list(recipe)
    for name, change in ATTEMPTS.items():
        factor = change.get("lr_factor", 1.0)
        fields = {k: v for k, v in change.items() if k != "lr_factor"}
        names += [name] * len(recipe)
        trials += [replace(t, train=replace(t.train, lr=t.train.lr * factor, **fields)) for t in recipe]
    return names, trials


def main(p: dict, n_draws: int) -> None:
    p = params.validate({**p, "recipe": {**p["recipe"], "ablation_draws": n_draws}})
    selected = json.loads(RECIPE_SELECTED.read_text()) | json.loads((CV_DIR / "siamese_selected.json").read_text())
    names, trials = attempt_trials(p, selected)
    start = time.perf_counter()
    outcomes = run(trials, p, p["recipe"]["executor"], "attempts", checkpoint=CHECKPOINTS / "recipe.jsonl")
    seconds = time.perf_counter() - start
    table = ablation_table(names, outcomes)
    write_csv(table, OUT / "attempts.csv")
    write_json(ablation(table), OUT / "attempts.json")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    provenance = {
        "command": f"python scripts/recipe_attempts.py {n_draws}",
        "commit": commit,
        "machine": numerics.machine(),
        "mkl_cbwr": numerics.ENV_PINS["MKL_CBWR"],
        "n_draws": n_draws,
        "trials": len(trials),
        "seconds": round(seconds, 1),
        "recipe": selected,
    }
    write_json(provenance, OUT / "provenance.json")
    print(f"{len(trials)} trials in {seconds:.0f} s; results in {OUT.relative_to(REPO)}/")


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python scripts/recipe_attempts.py N_DRAWS   (at most data.n_draws)")
    run_stage(lambda p: main(p, int(sys.argv[1])))  # its one failure path: a line, not a traceback
