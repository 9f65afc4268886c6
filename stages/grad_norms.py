"""Stage grad_norms: SPEC experiment 3, per-mini-batch gradient norms with and without BN / skips."""

from digitpairs.core.io import run_stage, write_csv
from digitpairs.core.paths import CV_DIR, GRAD_NORMS_CSV
from digitpairs.training.study import grad_norm_table, grad_norm_trials, read_selected, run


def main(p: dict) -> None:
    outcomes = run(grad_norm_trials(read_selected(CV_DIR), p), p, "local", "grad_norms", record_grad_norms=True)
    write_csv(grad_norm_table(outcomes), GRAD_NORMS_CSV)


if __name__ == "__main__":
    run_stage(main)
