"""Stage evaluate: test accuracy of every trained model; metrics.json with means and 95% CIs, and the
headline metric test_accuracy.json (the mean per variant only, what `dvc metrics show` prints)."""

from digitpairs.core.io import run_stage, write_csv, write_json
from digitpairs.core.paths import (
    CONFUSION_CSV,
    CV_DIR,
    METRICS_JSON,
    MODELS_DIR,
    PAIRS_DIR,
    RECIPE_SELECTED,
    TEST_ACCURACY_JSON,
    TEST_SCORES_CSV,
)
from digitpairs.core.variants import PLUS, VARIANTS, variant_score
from digitpairs.data.pairs import draw_path, load_draw, split
from digitpairs.training.models import load_model
from digitpairs.training.study import final_metrics, read_selected
from digitpairs.training.train import evaluate

import pandas as pd
import torch


def main(p: dict) -> None:
    rows, confusion = [], []
    for draw in range(p["data"]["n_draws"]):
        x, t, c = split(load_draw(draw_path(PAIRS_DIR, draw)), "test")
        for variant in VARIANTS:
            model, cfg = load_model(MODELS_DIR / variant / f"draw_{draw:02d}")
            tta = p["recipe"]["tta"] if variant == PLUS else 0  # siamese-plus's scoring, from its recipe
            rows.append(
                {
                    "variant": variant,
                    "draw": draw,
                    "accuracy": variant_score(variant, evaluate(model, cfg.arch, x, t, c, tta=tta)),
                }
            )
            if variant == "siamese-10":
                with torch.no_grad():
                    predicted = model(x)[1].argmax(-1)
                confusion.append(pd.DataFrame({"actual": c.flatten(), "predicted": predicted.flatten()}))
    scores = pd.DataFrame(rows)
    write_csv(scores, TEST_SCORES_CSV)
    write_csv(pd.concat(confusion, ignore_index=True), CONFUSION_CSV)
    metrics = final_metrics(scores, read_selected(CV_DIR, RECIPE_SELECTED))
    write_json(metrics, METRICS_JSON)
    write_json({v: m["accuracy_mean"] for v, m in metrics.items()}, TEST_ACCURACY_JSON)


if __name__ == "__main__":
    run_stage(main)
