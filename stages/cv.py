"""Stage cv@<arch>: SPEC experiment 1, the cross-validation grid of one architecture.

Writes data/cv/<arch>.csv (one row per combination, variant and draw) and
data/cv/<arch>_selected.json (the best configuration of each variant).
"""

import sys

from digitpairs.core.io import run_stage, write_csv, write_json
from digitpairs.core.paths import CHECKPOINTS, CV_DIR
from digitpairs.training.models import ARCHS
from digitpairs.training.study import cv_table, cv_trials, run, select


def main(p: dict, arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"usage: python -m stages.cv {{{'|'.join(ARCHS)}}}; got {arch!r}.")
    outcomes = run(
        cv_trials(arch, p), p, p["cv"]["executor"], f"cv@{arch}", checkpoint=CHECKPOINTS / f"cv-{arch}.jsonl"
    )
    table = cv_table(outcomes, p["cv"]["score_on"])
    write_csv(table, CV_DIR / f"{arch}.csv")
    write_json(select(table), CV_DIR / f"{arch}_selected.json")


if __name__ == "__main__":
    run_stage(lambda p: main(p, sys.argv[1] if len(sys.argv) > 1 else ""))
