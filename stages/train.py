"""Stage train: SPEC experiment 4, every variant at its selected configuration on every draw.

Models go to models_out/models/<variant>/draw_XX.{safetensors,json}; training curves (mean loss
over draws, per epoch) are logged with dvclive into models_out/live.
"""

import shutil

from digitpairs.core.io import run_stage
from digitpairs.core.paths import CV_DIR, LIVE_DIR, MODELS_DIR, RECIPE_SELECTED
from digitpairs.core.variants import VARIANTS
from digitpairs.training.models import save_model
from digitpairs.training.study import final_trials, read_selected, run

from dvclive import Live


def main(p: dict) -> None:
    outcomes = run(
        final_trials(read_selected(CV_DIR, RECIPE_SELECTED), p), p, p["train"]["executor"], "train", keep_state=True
    )
    shutil.rmtree(MODELS_DIR, ignore_errors=True)
    for o in outcomes:
        save_model(o.model(), o.trial.model, MODELS_DIR / o.trial.variant / f"draw_{o.trial.draw:02d}")
    with Live(str(LIVE_DIR), dvcyaml=None, save_dvc_exp=False) as live:
        for epoch in range(p["train"]["epochs"]):
            for variant in VARIANTS:
                losses = [o.result.epoch_loss[epoch] for o in outcomes if o.trial.variant == variant]
                live.log_metric(f"{variant}/train_loss", sum(losses) / len(losses))
            live.next_step()


if __name__ == "__main__":
    run_stage(main)
