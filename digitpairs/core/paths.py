"""Where each stage reads and writes, relative to the repository root (as dvc.yaml declares)."""

import os
from pathlib import Path

MNIST_DIR = Path("data/mnist")
PAIRS_DIR = Path("data/pairs")
CV_DIR = Path("data/cv")
RECIPE_DIR = Path("data/recipe")  # siamese-plus: search.csv, selected.json, ablation.csv
RECIPE_SELECTED = RECIPE_DIR / "selected.json"
CONTROLS_CSV = Path("data/controls.csv")
FINDINGS_JSON = Path("models_out/findings.json")
CHECKPOINTS = Path("data/checkpoints")  # resumable trial records; git-ignored, not a DVC output
LOSS_WEIGHTS_CSV = Path("data/loss_weights.csv")
GRAD_NORMS_CSV = Path("data/grad_norms.csv")
MODELS_DIR = Path("models_out/models")
LIVE_DIR = Path("models_out/live")
METRICS_JSON = Path("models_out/metrics.json")
# the one declared metric (test accuracy per variant), what `dvc metrics show` prints; the detail: metrics.json
TEST_ACCURACY_JSON = Path("models_out/test_accuracy.json")
TEST_SCORES_CSV = Path("models_out/test_scores.csv")
CONFUSION_CSV = Path("models_out/confusion.csv")
PLOTS_DIR = Path("plots")
# a copy of plots/findings.png committed to git, so the README shows it (a `cache: false` output of figures)
HEADLINE_FIGURE = Path("docs/figures/findings.png")
# The offline Vega bundle of `dvc plots show` pages (git-ignored, outside DVC's outputs)
VENDOR_JS = Path(".dvc/plots/vendor/vega-offline.js")


def repo_root() -> Path:
    """The user's repository root, against which user-given relative paths (``MNIST_MIRROR``) resolve.

    Under DVC it is ``DVC_ROOT``, which DVC sets for every stage command and which, in a queued or
    ``--temp`` experiment (run in a copy under ``.dvc/tmp/exps/``), still names the user's folder,
    not the copy. Otherwise it is the nearest folder, from the working directory up, holding dvc.yaml.
    """
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"])
    here = Path.cwd()
    return next((d for d in (here, *here.parents) if (d / "dvc.yaml").is_file()), here)
