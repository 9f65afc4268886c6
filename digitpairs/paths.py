"""Where each stage reads and writes, relative to the repository root (as dvc.yaml declares)."""

from pathlib import Path

MNIST_DIR = Path("data/mnist")
PAIRS_DIR = Path("data/pairs")
CV_DIR = Path("data/cv")
CHECKPOINTS = Path("data/checkpoints")  # resumable trial records; git-ignored, not a DVC output
LOSS_WEIGHTS_CSV = Path("data/loss_weights.csv")
GRAD_NORMS_CSV = Path("data/grad_norms.csv")
MODELS_DIR = Path("models_out/models")
LIVE_DIR = Path("models_out/live")
METRICS_JSON = Path("models_out/metrics.json")
TEST_SCORES_CSV = Path("models_out/test_scores.csv")
CONFUSION_CSV = Path("models_out/confusion.csv")
PLOTS_DIR = Path("plots")
