"""Stage recipe: siamese-plus, the fourth variant. Searches the ``recipe`` grid on validation pairs,
then trains the selected recipe without one addition at a time (the ablation).

Writes data/recipe/search.csv, data/recipe/selected.json and data/recipe/ablation.csv.
"""

import json

from digitpairs.core.io import run_stage, write_csv, write_json
from digitpairs.core.paths import CHECKPOINTS, CV_DIR, RECIPE_DIR
from digitpairs.training.study import (
    ablation_table,
    ablation_trials,
    cv_table,
    recipe_trials,
    run,
    select,
)


def main(p: dict) -> None:
    executor = p["recipe"]["executor"]
    checkpoint = CHECKPOINTS / "recipe.jsonl"  # shared: the ablation's full-recipe row reuses the search's
    table = cv_table(run(recipe_trials(p), p, executor, "recipe", checkpoint=checkpoint), "val")
    selected = select(table)
    siamese = json.loads((CV_DIR / "siamese_selected.json").read_text())  # siamese-10's lr (a declared dep)
    names, trials = ablation_trials(siamese | selected, p)
    ablation = run(trials, p, executor, "ablation", checkpoint=checkpoint)
    write_csv(table, RECIPE_DIR / "search.csv")
    write_json(selected, RECIPE_DIR / "selected.json")
    write_csv(ablation_table(names, ablation), RECIPE_DIR / "ablation.csv")


if __name__ == "__main__":
    run_stage(main)
