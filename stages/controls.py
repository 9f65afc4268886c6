"""Stage controls: the trainings the findings need beyond the study's own runs (see
``study.control_trials``): siamese-2 without its auxiliary loss on every draw, and each variant's
configuration selected the original's way (on test pairs) on the draws cross-validation never saw.
"""

from digitpairs.core.io import read_cv_tables, run_stage, write_csv
from digitpairs.core.paths import CHECKPOINTS, CONTROLS_CSV, CV_DIR
from digitpairs.training.study import control_table, control_trials, read_selected, run, select_on_test


def main(p: dict) -> None:
    cv = read_cv_tables(CV_DIR)
    kinds, trials = control_trials(read_selected(CV_DIR), select_on_test(cv), p)
    outcomes = run(trials, p, p["cv"]["executor"], "controls", checkpoint=CHECKPOINTS / "controls.jsonl")
    write_csv(control_table(kinds, outcomes), CONTROLS_CSV)


if __name__ == "__main__":
    run_stage(main)
