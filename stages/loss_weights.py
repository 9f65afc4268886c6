"""Stage loss_weights: SPEC experiment 2, the siamese loss-weight sweep at the selected configuration."""

from digitpairs.core.io import run_stage, write_csv
from digitpairs.core.paths import CHECKPOINTS, CV_DIR, LOSS_WEIGHTS_CSV
from digitpairs.training.study import loss_weight_table, loss_weight_trials, read_selected, run


def main(p: dict) -> None:
    lw = p["loss_weights"]
    trials = loss_weight_trials(read_selected(CV_DIR), p)
    outcomes = run(trials, p, lw["executor"], "loss_weights", checkpoint=CHECKPOINTS / "loss_weights.jsonl")
    write_csv(loss_weight_table(outcomes, lw["exponents"], lw["score_on"]), LOSS_WEIGHTS_CSV)


if __name__ == "__main__":
    run_stage(main)
