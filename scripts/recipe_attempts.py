"""What else siamese-plus's recipe was tried with: each attempt is the committed recipe
(``data/recipe/selected.json``, searched by the ``recipe`` stage) with one change, trained on the
validation pairs of the first ``N`` draws, paired by draw with the recipe itself, the t-test
p-values Holm-corrected over the attempts. An attempt that earns its place goes into ``params.yaml``'s
``recipe`` section, where the pipeline's ablation keeps measuring it.

The frontier: the recipe itself trained for 1, 2 and 4 times the study's epochs (25, 50, 100 by
default) on the same draws, what a larger budget buys (``frontier.json``).

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
from digitpairs.core.stats import ci95, mean_std  # noqa: E402
from digitpairs.core.variants import ALL_ADDITIONS, PLUS, VARIANTS  # noqa: E402
from digitpairs.report.findings import ablation, pair_over_draws  # noqa: E402
from digitpairs.training.study import ablation_table, ablation_trials, run  # noqa: E402

import pandas as pd  # noqa: E402

OUT = REPO / "results/recipe-attempts"
# name -> the change to the recipe's training (TrainConfig fields); lr relative to the selected one
ATTEMPTS = {
    "elastic distortion, strength 1.5, width 3": {"elastic": 1.5, "elastic_sigma": 3.0},
    "elastic distortion, strength 3": {"elastic": 3.0},
    "elastic distortion, strength 5": {"elastic": 5.0},
    "shifts of up to 2 pixels": {"shift": 2},
    "lr x 2": {"lr_factor": 2.0},
    "lr x 0.5": {"lr_factor": 0.5},
    "weight averaging (EMA), decay 0.9": {"ema": 0.9},
    "weight averaging (EMA), decay 0.98": {"ema": 0.98},
    "test-time shifts of 1 pixel": {"tta": 1},
    "dropout 0.25 before the classifier": {"dropout": 0.25},
    "dropout 0.5 before the classifier": {"dropout": 0.5},
    "mini-batches of 50, lr x 0.5": {"batch_size": 50, "lr_factor": 0.5},
    "mini-batches of 25, lr x 0.25": {"batch_size": 25, "lr_factor": 0.25},
    "cutout, 4 pixels": {"cutout": 4},
    "cutout, 7 pixels": {"cutout": 7},
}
FRONTIER = (1, 2, 4)  # the recipe's epochs, in multiples of the study's (train.epochs)


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


def frontier_trials(names: list[str], trials: list) -> list:
    """The recipe's trials (the rows named ``ALL_ADDITIONS``) at :data:`FRONTIER`'s larger budgets."""
    recipe = [t for n, t in zip(names, trials, strict=True) if n == ALL_ADDITIONS]
    return [replace(t, train=replace(t.train, epochs=t.train.epochs * f)) for f in FRONTIER[1:] for t in recipe]


def frontier(outcomes: list) -> dict[str, dict]:
    """Per budget (epochs): the recipe's validation accuracy over draws (siamese-plus's decision), its
    95% CI, and the change from the study's budget (the fewest epochs) paired by draw."""
    rule = VARIANTS[PLUS].metric
    scores: dict[int, dict[int, float]] = {}
    for o in outcomes:
        scores.setdefault(o.trial.train.epochs, {})[o.trial.draw] = o.scores["val"][rule]
    series = {e: pd.Series(v).sort_index() for e, v in sorted(scores.items())}
    base = series[min(series)]
    out = {}
    for epochs, values in series.items():
        (mean, std), (low, high) = mean_std(values), ci95(values)
        out[str(epochs)] = {"val_mean": mean, "val_std": std, "ci95_low": low, "ci95_high": high, "n": len(values)}
        if epochs != min(series):
            change = pair_over_draws(values, base)
            out[str(epochs)] |= {f"change_{k}": change[k] for k in ("mean", "ci95_low", "ci95_high", "p_t")}
    return out


def main(p: dict, n_draws: int) -> None:
    p = params.validate({**p, "recipe": {**p["recipe"], "ablation_draws": n_draws}})
    selected = json.loads(RECIPE_SELECTED.read_text()) | json.loads((CV_DIR / "siamese_selected.json").read_text())
    names, trials = attempt_trials(p, selected)
    longer = frontier_trials(names, trials)
    start = time.perf_counter()
    outcomes = run(trials + longer, p, p["recipe"]["executor"], "attempts", checkpoint=CHECKPOINTS / "recipe.jsonl")
    seconds = time.perf_counter() - start
    table = ablation_table(names, outcomes[: len(trials)])
    write_csv(table, OUT / "attempts.csv")
    write_json(ablation(table), OUT / "attempts.json")
    recipe = [o for n, o in zip(names, outcomes[: len(trials)], strict=True) if n == ALL_ADDITIONS]
    write_json(frontier(recipe + outcomes[len(trials) :]), OUT / "frontier.json")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    provenance = {
        "command": f"python scripts/recipe_attempts.py {n_draws}",
        "commit": commit,
        "machine": numerics.machine(),
        "mkl_cbwr": numerics.ENV_PINS["MKL_CBWR"],
        "gemm": numerics.products(),
        "n_draws": n_draws,
        "trials": len(trials) + len(longer),
        "frontier_epochs": [p["train"]["epochs"] * f for f in FRONTIER],
        "seconds": round(seconds, 1),
        "recipe": selected,
    }
    write_json(provenance, OUT / "provenance.json")
    print(f"{len(trials) + len(longer)} trials in {seconds:.0f} s; results in {OUT.relative_to(REPO)}/")


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python scripts/recipe_attempts.py N_DRAWS   (at most data.n_draws)")
    run_stage(lambda p: main(p, int(sys.argv[1])))  # its one failure path: a line, not a traceback
