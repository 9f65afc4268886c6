"""siamese-plus's ablation on more draws than the pipeline's ``recipe.n_draws``: the committed recipe
(``data/recipe/selected.json``, searched by the ``recipe`` stage), trained without one addition at a
time on the validation pairs of ``N`` draws, each row paired by draw with the full recipe, the
t-test p-values Holm-corrected over the rows.

    python scripts/ablation_draws.py 10     # after `dvc repro` (or `dvc pull`); writes results/ablation/

It runs the ``recipe`` stage's own trials (``study.ablation_trials``) and statistics
(``findings.ablation``) and shares the stage's checkpoint, so the rows of the first
``recipe.n_draws`` draws are reused. ``scripts/readme.py`` writes the table of docs/siamese-plus.md
from ``results/ablation/ablation.json``.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, whatever is installed

import digitpairs  # noqa: E402,F401  (numeric pins before torch computes)
from digitpairs.core import numerics, params  # noqa: E402
from digitpairs.core.io import run_stage, write_csv, write_json  # noqa: E402
from digitpairs.core.paths import CHECKPOINTS, CV_DIR, RECIPE_SELECTED  # noqa: E402
from digitpairs.core.stats import holm  # noqa: E402
from digitpairs.core.variants import ALL_ADDITIONS  # noqa: E402
from digitpairs.report.findings import ablation  # noqa: E402
from digitpairs.training import runner  # noqa: E402
from digitpairs.training.study import ablation_table, ablation_trials, run  # noqa: E402

OUT = Path("results/ablation")


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")


def main(p: dict, n_draws: int) -> None:
    p = params.validate({**p, "recipe": {**p["recipe"], "n_draws": n_draws}})
    selected = json.loads(RECIPE_SELECTED.read_text()) | json.loads((CV_DIR / "siamese_selected.json").read_text())
    names, trials = ablation_trials(selected, p)
    t = time.perf_counter()
    outcomes = run(trials, p, p["recipe"]["executor"], "ablation", checkpoint=CHECKPOINTS / "recipe.jsonl")
    seconds = time.perf_counter() - t
    table = ablation_table(names, outcomes)
    rows = ablation(table)
    tested = [n for n in rows if n != ALL_ADDITIONS]
    for name, p_holm in zip(tested, holm([rows[n]["change_p_t"] for n in tested]), strict=True):
        rows[name]["change_p_holm"] = p_holm
    write_csv(table, OUT / "ablation.csv")
    write_json(rows, OUT / "ablation.json")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    provenance = {
        "command": f"python scripts/ablation_draws.py {n_draws}",
        "commit": commit,
        "machine": f"{platform.machine()}, {runner.cpu_count()} CPUs, {cpu_model()}",
        "mkl_cbwr": numerics.ENV_PINS["MKL_CBWR"],
        "n_draws": n_draws,
        "trials": len(trials),
        "seconds": round(seconds, 1),
        "recipe": selected,
    }
    write_json(provenance, OUT / "provenance.json")
    print(f"{len(trials)} trials in {seconds:.0f} s; results in {OUT}/")


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python scripts/ablation_draws.py N_DRAWS   (at most data.n_draws)")
    run_stage(lambda p: main(p, int(sys.argv[1])))  # its one failure path: a line, not a traceback
