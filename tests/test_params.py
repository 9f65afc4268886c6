"""params.yaml validation, and the stage scripts' one-line errors."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

from digitpairs.core.params import (
    GRID_KEYS,
    MNIST_IMAGES,
    ParamError,
    max_pairs,
    numerics_mode,
    parse,
    trainings,
    validate,
)

import pytest
import yaml

from tests.e2e import REPO, TINY, edited_text, full_grid_module, merged

DEFAULTS = parse((REPO / "params.yaml").read_text())


def test_committed_params_are_valid():
    assert validate(copy.deepcopy(DEFAULTS)) == DEFAULTS


def edited(section: str, key: str, value) -> dict:
    p = copy.deepcopy(DEFAULTS)
    p[section][key] = value
    return p


@pytest.mark.parametrize(
    "section,key,value,message",
    [
        ("cv", "nbch3", [8], "unknown key cv.nbch3"),
        ("cv", "lr", [], "cv.lr must be a non-empty list"),
        ("cv", "lr", [0.1, 0.0], r"cv.lr\[1\] must be > 0"),
        ("cv", "lr", [0.1, -1], r"cv.lr\[1\] must be > 0"),
        ("cv", "lr", 0.1, "cv.lr must be a non-empty list"),
        ("cv", "nbch1", [8, "16"], r"cv.nbch1\[1\] must be an integer"),
        ("cv", "batch_norm", ["yes"], r"cv.batch_norm\[0\] must be true or false"),
        ("cv", "nbfch", [64, 64], "cv.nbfch lists the value 64 twice"),
        ("data", "n_draws", 0, "data.n_draws must be >= 1"),
        ("cv", "n_draws", 0, "cv.n_draws must be >= 1"),
        ("cv", "n_draws", 11, "cv.n_draws=11 exceeds data.n_draws=10"),
        ("loss_weights", "n_draws", 11, "loss_weights.n_draws=11 exceeds data.n_draws=10"),
        ("train", "epochs", 2.5, "train.epochs must be an integer"),
        ("train", "batch_size", 5000, "train.batch_size=5000 exceeds data.n_pairs"),
        ("train", "engine", "jax", "train.engine must be one of"),
        ("cv", "score_on", "train", "cv.score_on must be one of val, test"),
        ("grad_norms", "draw", 10, "grad_norms.draw=10 must be < data.n_draws"),
        # the cases: bounds a later stage would enforce, duplicates by value, finite numbers
        ("data", "n_pairs", 6000, "data.n_pairs must be between 1 and 5000"),
        ("loss_weights", "exponents", [0, 400], r"loss_weights.exponents\[1\] must be between -10 and 10"),
        ("loss_weights", "exponents", [0, 0.0], "loss_weights.exponents lists the value 0.0 twice"),
        ("figures", "dpi", 20000, "figures.dpi must be between 20 and 600"),
        ("cv", "lr", [1, 1.0], "cv.lr lists the value 1.0 twice"),
        ("cv", "lr", [float("inf")], r"cv.lr\[0\] must be a finite number"),
        ("cv", "lr", [float("nan")], r"cv.lr\[0\] must be a finite number"),
        ("cv", "nbfch", [10**6], r"cv.nbfch\[0\] must be between 1 and 4096"),
        ("train", "device", "auto", "train.device must be one of cpu, cuda"),
        ("train", "numerics", "fast", "train.numerics must be one of portable, native"),
        ("train", "batch_size", 999, "train.batch_size=999 leaves a mini-batch of 1 pair"),
        ("train", "batch_size", 1, "train.batch_size=1 leaves a mini-batch of 1 pair"),
        ("recipe", "n_draws", 11, "recipe.n_draws=11 exceeds data.n_draws=10"),
        ("recipe", "lr", [0.1, 0.1], "recipe.lr lists the value 0.1 twice"),
        ("recipe", "momentum", 1.0, "recipe.momentum must be >= 0 and < 1"),
        ("recipe", "nesterov", "yes", "recipe.nesterov must be true or false"),
        ("recipe", "weight_decay", -1e-4, "recipe.weight_decay must be >= 0"),
        ("recipe", "schedule", "step", "recipe.schedule must be one of constant, cosine"),
        ("recipe", "label_smoothing", 1, "recipe.label_smoothing must be >= 0 and < 1"),
        ("recipe", "shift", 5, "recipe.shift must be between 0 and 4"),
        ("recipe", "ablation_draws", 11, "recipe.ablation_draws=11 exceeds data.n_draws=10"),
        ("recipe", "elastic", -1, "recipe.elastic must be between 0 and 20"),
        ("recipe", "elastic_sigma", 0.1, "recipe.elastic_sigma must be between 0.5 and 7"),
        ("recipe", "cutout", 15, "recipe.cutout must be between 0 and 14"),
        ("recipe", "dropout", 1.0, "recipe.dropout must be >= 0 and < 1"),
        ("recipe", "ema", -0.5, "recipe.ema must be >= 0 and < 1"),
        ("recipe", "tta", 2.5, "recipe.tta must be"),
        ("recipe", "batch_size", 999, "recipe.batch_size=999 leaves a mini-batch of 1 pair"),
        ("recipe", "executor", "dask", "recipe.executor must be one of local, ray"),
        ("figures", "error_bars", "sem", "figures.error_bars must be one of group, grid"),
    ],
)
def test_bad_values_name_the_key(section, key, value, message):
    with pytest.raises(ParamError, match=message):
        validate(edited(section, key, value))


# One row per key: a value, as YAML text in params.yaml, that some stage would reject, on the tiny params
# the end-to-end tests run (TINY: data.n_draws 2, n_pairs 1000). tests/test_guards.py runs one row per
# section through `dvc repro` (and every `dvc repro -s` path).
BAD = [
    ("data.seed", "-1"),
    ("data.n_draws", "0"),
    ("data.n_pairs", "6000"),  # the test split holds 10000 images: at most 5000 pairs
    ("train.seed", "1.5"),
    ("train.epochs", "0"),
    ("train.batch_size", "999"),  # a last mini-batch of 1 pair: batch norm cannot train on it
    ("train.shuffle", "yes"),  # YAML 1.2: a string
    ("train.relu_logits", "1"),
    ("train.engine", "jax"),
    ("train.device", "cuda"),  # refused without a GPU; "auto" (never valid) where there is one
    ("train.executor", "dask"),
    ("cv.seed", "-3"),
    ("cv.n_draws", "3"),  # more than data.n_draws
    ("cv.score_on", "train"),
    ("cv.executor", "slurm"),
    ("cv.nbch1", "[0]"),
    ("cv.nbch2", "[8.5]"),
    ("cv.nbfch", "[100000]"),
    ("cv.batch_norm", "[on]"),
    ("cv.skip_connections", "[true, true]"),
    ("cv.lr", "[1, 1.0]"),  # the same learning rate twice
    ("cv.lr", "[.inf]"),
    ("loss_weights.seed", "x"),
    ("loss_weights.n_draws", "5"),
    ("loss_weights.exponents", "[0, 400]"),  # 10**400 overflows
    ("loss_weights.include_zero", "no"),
    ("loss_weights.score_on", "best"),
    ("loss_weights.executor", "remote"),
    ("grad_norms.seed", "-1"),
    ("grad_norms.draw", "2"),  # draws are 0 and 1
    ("recipe.momentum", "1"),  # SGD diverges: must be < 1
    ("recipe.schedule", "step"),
    ("recipe.shift", "7"),  # more than half a digit
    ("recipe.batch_size", "999"),
    ("recipe.ablation_draws", "3"),  # more than data.n_draws
    ("recipe.elastic", "30"),
    ("recipe.elastic_sigma", "0"),
    ("figures.dpi", "20000"),  # would exhaust memory
    ("figures.error_bars", "sem"),
    ("train.epochs", "1000000000"),  # beyond limits.training_epochs: would train for years
    ("limits.training_epochs", "0"),
]
TINY_TEXT = merged((REPO / "params.yaml").read_text(), TINY)  # the end-to-end clones' params.yaml


def test_tiny_params_text_is_valid():
    assert validate(parse(TINY_TEXT))


@pytest.mark.parametrize("key,value", BAD, ids=[f"{k}={v}" for k, v in BAD])
def test_every_bad_value_names_its_key(key, value):
    """The params.yaml text DVC and check_params read, with one bad value: refused, in one line naming
    the key (the error check_params prints before any stage runs)."""
    if key == "train.device" and value == "cuda":
        import torch

        value = "auto" if torch.cuda.is_available() else "cuda"
    with pytest.raises(ParamError) as refused:
        validate(parse(edited_text(TINY_TEXT, key, value)))
    message = str(refused.value)
    assert key in message and "\n" not in message, message


def test_nesterov_needs_momentum():
    p = edited("recipe", "momentum", 0.0)
    with pytest.raises(ParamError, match="recipe.nesterov is true but recipe.momentum is 0"):
        validate(p)
    p["recipe"]["nesterov"] = False
    validate(p)


def test_yaml_is_read_as_dvc_reads_it():
    """YAML 1.2 (DVC's ruamel loader): 1e-3 is a float, .inf is infinity and refused, yes is a string."""
    text = (REPO / "params.yaml").read_text()
    p = parse(text.replace("lr: [0.01, 0.1, 0.25, 1.0]", "lr: [1e-3, 1]"))
    assert validate(p)["cv"]["lr"] == [0.001, 1]
    with pytest.raises(ParamError, match=r"cv.lr\[0\] must be a finite number, got inf"):
        validate(parse(text.replace("lr: [0.01, 0.1, 0.25, 1.0]", "lr: [.inf]")))
    with pytest.raises(ParamError, match=r"train.shuffle must be true or false, got 'yes'"):
        validate(parse(text.replace("shuffle: true", "shuffle: yes")))


def test_cuda_is_refused_without_a_gpu():
    import torch

    p = edited("train", "device", "cuda")
    if torch.cuda.is_available():
        assert validate(p) == p
    else:
        with pytest.raises(ParamError, match="train.device is cuda but this machine has no usable CUDA GPU; set"):
            validate(p)


def test_pair_bound_comes_from_the_real_mnist_splits(mnist_splits):
    """MNIST_IMAGES is what the downloaded files hold, and the largest allowed n_pairs draws."""
    from digitpairs.data.pairs import make_draw

    train_images, _, test_images, _ = mnist_splits
    assert MNIST_IMAGES == {"train": len(train_images), "test": len(test_images)}
    assert max_pairs() == 5000
    assert validate(edited("data", "n_pairs", 5000))
    tensors, _ = make_draw(*mnist_splits, seed=1, draw=0, n_pairs=max_pairs())
    assert len(tensors["test_target"]) == 5000
    with pytest.raises(ValueError, match="needs more images than MNIST has"):
        make_draw(*mnist_splits, seed=1, draw=0, n_pairs=max_pairs() + 1)


def test_unknown_and_missing_sections():
    p = copy.deepcopy(DEFAULTS)
    p["optimizer"] = {}
    with pytest.raises(ParamError, match="unknown section 'optimizer'"):
        validate(p)
    p = copy.deepcopy(DEFAULTS)
    del p["train"]["seed"]
    with pytest.raises(ParamError, match="train.seed is missing"):
        validate(p)


def stage(tmp: Path, name: str, **env) -> subprocess.CompletedProcess:
    """``python -m stages.<name>`` with the working directory ``tmp`` and this checkout importable."""
    import os

    return subprocess.run(
        [sys.executable, "-m", f"stages.{name}"],
        cwd=tmp,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
    )


def test_check_params_stage_fails_with_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(edited("cv", "lr", [0.1, -1])))
    cp = stage(tmp_path, "check_params")
    assert cp.returncode == 1
    assert cp.stderr.strip().splitlines() == ["error: cv.lr[1] must be > 0, got -1."]
    assert not (tmp_path / "data/params.ok").exists()


def test_mnist_stage_offline_fails_cleanly(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())  # every stage validates first
    cp = stage(tmp_path, "mnist", MNIST_MIRROR=f"http://127.0.0.1:{port}/")
    assert cp.returncode == 1
    lines = cp.stderr.strip().splitlines()
    assert lines[-1].startswith("error: Could not download MNIST file train-images-idx3-ubyte.gz")
    assert "MNIST_MIRROR" in lines[-1]
    assert not list((tmp_path / "data/mnist").rglob("*ubyte*"))


def model_epochs(p: dict) -> int:
    return sum(trainings(p).values()) * p["train"]["epochs"]


def full_grid() -> dict:
    """params.yaml with scripts/full_grid.py's FULL_GRID keys."""
    p = copy.deepcopy(DEFAULTS)
    for key, value in full_grid_module().FULL_GRID.items():
        section, name = key.split(".")
        p[section][name] = value
    return p


def test_the_defaults_pass_the_cost_bound_with_margin_and_the_full_grid_passes_too():
    limit = DEFAULTS["limits"]["training_epochs"]
    assert model_epochs(DEFAULTS) * 50 < limit  # 24,050 of 2,000,000
    grid = validate(full_grid())  # the original's grid, docs/full-grid.md: 966,000
    assert limit / 4 < model_epochs(grid) < limit


def test_a_runaway_count_is_refused_with_the_bound_and_how_to_raise_it():
    p = edited("train", "epochs", 10**9)  # the value
    message = "train 962 models x train.epochs=1,000,000,000 = 962,000,000,000 model-epochs, more than "
    with pytest.raises(ParamError, match=message + "limits.training_epochs=2,000,000; .* raise limits"):
        validate(p)
    for section, key, value in [("data", "n_draws", 10**6), ("cv", "lr", [i / 1000 for i in range(1, 1001)])]:
        with pytest.raises(ParamError, match="more than limits.training_epochs=2,000,000"):
            validate(edited(section, key, value))
    p["limits"]["training_epochs"] = 10**12  # raised on purpose
    assert validate(p) == p


def some_selection(p: dict) -> dict:
    """A selected configuration for every variant (the first value of each grid list): counts only."""
    from digitpairs.core.variants import PLUS, VARIANTS

    return {v: {k: p["recipe" if v == PLUS else "cv"][k][0] for k in GRID_KEYS} for v in VARIANTS}


ALL_ADDITIONS = {
    "schedule": "cosine",
    "elastic": 1.0,
    "batch_size": 50,
    "cutout": 4,
    "dropout": 0.2,
    "ema": 0.9,
    "tta": 1,
}


@pytest.mark.parametrize("name", ["defaults", "tiny", "every addition"])
def test_trainings_are_the_lengths_of_the_stages_trial_lists(name):
    from digitpairs.core.variants import GRID_ARCHS
    from digitpairs.training import study

    p = parse(TINY_TEXT) if name == "tiny" else copy.deepcopy(DEFAULTS)
    if name == "every addition":
        p["recipe"].update(ALL_ADDITIONS)
    s = some_selection(p)
    assert trainings(p) == {
        "cv": sum(len(study.cv_trials(arch, p)) for arch in GRID_ARCHS),
        "recipe": len(study.recipe_trials(p)) + len(study.ablation_trials(s, p)[1]),
        "controls": len(study.control_trials(s, s, p)[1]),
        "loss_weights": len(study.loss_weight_trials(s, p)),
        "grad_norms": len(study.grad_norm_trials(s, p)),
        "train": len(study.final_trials(s, p)),
    }


def test_docs_state_the_bound_and_what_the_defaults_and_the_full_grid_cost():
    text = " ".join((REPO / "docs/validation.md").read_text().split())
    assert f"`limits.training_epochs` ({DEFAULTS['limits']['training_epochs']:,})" in text
    for p in (DEFAULTS, full_grid()):
        assert f"{sum(trainings(p).values()):,}" in text and f"{model_epochs(p):,} model-epochs" in text


def test_numerics_mode_is_read_alone_and_falls_back_to_portable(tmp_path):
    path = tmp_path / "params.yaml"
    assert numerics_mode(path) == "portable"  # no file: the stage's own load says so
    for text, mode in (
        ("train: {numerics: native}", "native"),
        ("train: {numerics: fast}", "portable"),
        ("[", "portable"),
    ):
        path.write_text(text)
        assert numerics_mode(path) == mode
