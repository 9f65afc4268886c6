"""Stage figures: the study's eight figures plus test accuracy, as PNG and SVG in plots/ (digitpairs.figures).

``python stages/figures.py --vendor-js`` instead writes the git-ignored offline Vega bundle that the
project's HTML template (.dvc/plots/index.html) loads, so ``dvc plots show`` renders without a network.
"""

import sys
from pathlib import Path

from digitpairs import figures, params
from digitpairs.io import run_stage
from digitpairs.paths import PLOTS_DIR

VENDOR_JS = Path(".dvc/plots/vendor/vega-offline.js")


def main() -> None:
    figures.make_all(Path("."), PLOTS_DIR, params.load()["figures"]["dpi"])


if __name__ == "__main__":
    if sys.argv[1:] == ["--vendor-js"]:
        print(figures.vendor_js(VENDOR_JS))
    else:
        run_stage(main)
