"""Stage figures: the study's eight figures plus test accuracy and the findings, as PNG and SVG in plots/
(digitpairs.report.figures), and a copy of plots/findings.png in docs/figures/ (git-tracked: the README's figure).

It also writes the git-ignored offline Vega bundle that the project's HTML template
(.dvc/plots/index.html) loads, so ``dvc plots show`` renders right after ``dvc repro``, without a
network. ``python -m stages.figures --vendor-js`` writes only the bundle (a checkout whose outputs
came from ``dvc pull`` or ``dvc checkout``, where the stage did not run).
"""

import sys
from pathlib import Path

from digitpairs.core.io import run_stage
from digitpairs.core.paths import HEADLINE_FIGURE, PLOTS_DIR, VENDOR_JS
from digitpairs.report import figures

from stages import undefer


def main(p: dict) -> None:
    figures.make_all(Path("."), PLOTS_DIR, p["figures"]["dpi"], p["figures"]["error_bars"], headline=HEADLINE_FIGURE)
    figures.vendor_js(VENDOR_JS)


if __name__ == "__main__":
    if sys.argv[1:] == ["--vendor-js"]:
        undefer()
        print(figures.vendor_js(VENDOR_JS))
    else:
        run_stage(main)
