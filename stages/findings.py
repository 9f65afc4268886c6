"""Stage findings: the study's claims tested (effects, 95% CIs, Holm-corrected p-values), the cost of
selecting on the test set, and siamese-plus's ablation, into models_out/findings.json (a DVC metric,
committed with the code like metrics.json). See digitpairs.report.findings."""

from pathlib import Path

from digitpairs.core.io import run_stage, write_json
from digitpairs.core.paths import FINDINGS_JSON
from digitpairs.report.findings import compute


def main(p: dict) -> None:
    write_json(compute(Path(".")), FINDINGS_JSON)


if __name__ == "__main__":
    run_stage(main)
