"""params.yaml: the schema of every hyper-parameter, and the one validation that names the bad key.

Every bound a stage would enforce later (MNIST's split sizes, the training checks, the figures'
resolution, the GPU) is checked here, so a bad value is refused before any stage starts. The file is
read with DVC's own YAML loader (ruamel.yaml, YAML 1.2), so the stages see the same numbers as DVC
does when it decides what changed (PyYAML's YAML 1.1 would read ``1e-3`` as a string).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from digitpairs.core.numerics import MODES as NUMERICS
from digitpairs.core.variants import STUDY_VARIANTS, VARIANTS, additions

GRID_KEYS = ("nbch1", "nbch2", "nbfch", "batch_norm", "skip_connections", "lr")
# Images in MNIST's official splits (torchvision checks the files' MD5s, so these never vary;
# tests/test_params.py compares them with the real files).
MNIST_IMAGES = {"train": 60000, "test": 10000}
# loss_weights.exponents: w10 = 10**e must stay a normal, meaningful float32 weight (10**400
# overflows, 10**-400 is exactly 0, which is the separate include_zero switch).
EXPONENT_RANGE = (-10.0, 10.0)
# figures.dpi: the largest figure is 10 x 7.5 inches; 600 dpi is 6000 x 4500 pixels (~100 MB RGBA).
DPI_RANGE = (20, 600)
# Layer widths: far above the study's grid, low enough that one model fits in memory.
MAX_WIDTH = 4096
# siamese-plus's augmentations (digitpairs.training.semantics), in pixels of a 14 x 14 digit image: a shift
# of up to MAX_SHIFT (also the test-time shifts' bound); a cutout's side; an elastic distortion's strength
# and its field's Gaussian width.
MAX_SHIFT = 4
MAX_CUTOUT = 14  # a cutout square's side: at most the whole image
ELASTIC_RANGE = (0.0, 20.0)
ELASTIC_SIGMA_RANGE = (0.5, 7.0)

Check = Callable[[str, Any], None]


class ParamError(ValueError):
    """A params.yaml value is unusable; the message names the key and what is expected."""


def images_needed(n_pairs: int) -> dict[str, int]:
    """Images a draw of ``n_pairs`` pairs per split takes from each MNIST split: train and
    validation pairs come from the train split (2 images each), test pairs from the test split."""
    return {"train": 4 * n_pairs, "test": 2 * n_pairs}


def max_pairs() -> int:
    """The largest ``data.n_pairs`` MNIST can supply."""
    return min(MNIST_IMAGES[s] // images_needed(1)[s] for s in MNIST_IMAGES)


def _int(minimum: int, maximum: int | None = None) -> Check:
    def check(key: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ParamError(f"{key} must be an integer, got {v!r}.")
        if v < minimum or (maximum is not None and v > maximum):
            bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise ParamError(f"{key} must be {bound}, got {v}.")

    return check


def _bool(key: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ParamError(f"{key} must be true or false, got {v!r}.")


def _number(key: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ParamError(f"{key} must be a number, got {v!r}.")
    if not math.isfinite(v):
        raise ParamError(f"{key} must be a finite number, got {v!r}.")


def _positive(key: str, v: Any) -> None:
    _number(key, v)
    if not v > 0:
        raise ParamError(f"{key} must be > 0, got {v}.")


def _exponent(key: str, v: Any) -> None:
    _number(key, v)
    low, high = EXPONENT_RANGE
    if not low <= v <= high:
        raise ParamError(f"{key} must be between {low:g} and {high:g} (the auxiliary loss weight is 10**e), got {v}.")


def _fraction(key: str, v: Any) -> None:
    _number(key, v)
    if not 0 <= v < 1:
        raise ParamError(f"{key} must be >= 0 and < 1, got {v}.")


def _non_negative(key: str, v: Any) -> None:
    _number(key, v)
    if v < 0:
        raise ParamError(f"{key} must be >= 0, got {v}.")


def _choice(*options: str) -> Check:
    def check(key: str, v: Any) -> None:
        if v not in options:
            raise ParamError(f"{key} must be one of {', '.join(options)}; got {v!r}.")

    return check


def _between(low: float, high: float) -> Check:
    def check(key: str, v: Any) -> None:
        _number(key, v)
        if not low <= v <= high:
            raise ParamError(f"{key} must be between {low:g} and {high:g}, got {v}.")

    return check


def check_device(key: str, v: Any) -> None:
    """``cpu`` or ``cuda``, never chosen for the user: a GPU gives other results than a CPU, so the
    device is a declared setting that dvc.lock records; cuda is refused where no GPU is available."""
    _choice(*DEVICES)(key, v)
    if v == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ParamError(f"{key} is cuda but this machine has no usable CUDA GPU; set {key}: cpu.")


def _list_of(item_check: Check) -> Check:
    def check(key: str, v: Any) -> None:
        if not isinstance(v, list) or not v:
            raise ParamError(f"{key} must be a non-empty list, got {v!r}.")
        for i, x in enumerate(v):
            item_check(f"{key}[{i}]", x)
        seen: list[Any] = []
        for x in v:  # by value: 1 and 1.0 are the same learning rate, so the same trial
            if x in seen:
                raise ParamError(f"{key} lists the value {x!r} twice: {v!r}; drop one.")
            seen.append(x)

    return check


ENGINES = ("lockstep", "loop")  # train.engine (digitpairs.training.runner)
DEVICES = ("cpu", "cuda")  # train.device
SCHEDULES = ("constant", "cosine")  # recipe.schedule (digitpairs.training.semantics.lr_factor)
EXECUTORS = ("local", "ray")  # cv/loss_weights/recipe/train.executor
ERROR_BARS = ("group", "grid")  # figures.error_bars: ours (n = the group's size) or the original's
ENGINE = _choice(*ENGINES)
EXECUTOR = _choice(*EXECUTORS)
WIDTH = _list_of(_int(1, MAX_WIDTH))
GRID_CHECKS: dict[str, Check] = {
    "nbch1": WIDTH,
    "nbch2": WIDTH,
    "nbfch": WIDTH,
    "batch_norm": _list_of(_bool),
    "skip_connections": _list_of(_bool),
    "lr": _list_of(_positive),
}

SCHEMA: dict[str, dict[str, Check]] = {
    "data": {"seed": _int(0), "n_draws": _int(1), "n_pairs": _int(1, max_pairs())},
    "train": {
        "seed": _int(0),
        "epochs": _int(1),
        "batch_size": _int(1),
        "shuffle": _bool,
        "relu_logits": _bool,
        "engine": ENGINE,
        "device": check_device,
        "numerics": _choice(*NUMERICS),
        "executor": EXECUTOR,
    },
    "cv": {
        "seed": _int(0),
        "n_draws": _int(1),
        "score_on": _choice("val", "test"),
        "executor": EXECUTOR,
        **GRID_CHECKS,
    },
    "loss_weights": {
        "seed": _int(0),
        "n_draws": _int(1),
        "exponents": _list_of(_exponent),
        "include_zero": _bool,
        "score_on": _choice("val", "test"),
        "executor": EXECUTOR,
    },
    "grad_norms": {"seed": _int(0), "draw": _int(0)},
    "recipe": {
        "seed": _int(0),
        "n_draws": _int(1),
        "ablation_draws": _int(1),
        "executor": EXECUTOR,
        **GRID_CHECKS,
        "batch_size": _int(1),
        "momentum": _fraction,
        "nesterov": _bool,
        "weight_decay": _non_negative,
        "schedule": _choice(*SCHEDULES),
        "label_smoothing": _fraction,
        "shift": _int(0, MAX_SHIFT),
        "elastic": _between(*ELASTIC_RANGE),
        "elastic_sigma": _between(*ELASTIC_SIGMA_RANGE),
        "cutout": _int(0, MAX_CUTOUT),
        "dropout": _fraction,
        "ema": _fraction,
        "tta": _int(0, MAX_SHIFT),
    },
    "figures": {"dpi": _int(*DPI_RANGE), "error_bars": _choice(*ERROR_BARS)},
    "limits": {"training_epochs": _int(1)},
}

# grad_norms trains two variants (pair, siamese-2) with each of the 4 (batch_norm, skip_connections) pairs
GRAD_NORM_TRIALS = 2 * 4


def trainings(params: dict) -> dict[str, int]:
    """Models each training stage trains with ``params``: the lengths of digitpairs.training.study's
    trial lists, counted without building them (or importing torch), so a run's cost is known before
    any stage starts. tests/test_params.py checks them against the lists themselves."""
    d, t, cv, lw, r = (params[s] for s in ("data", "train", "cv", "loss_weights", "recipe"))
    study = len(STUDY_VARIANTS)
    # the ablation's rows: the full recipe, the study's SGD, and one per addition the recipe makes
    ablation = 2 + len(additions(r, t["batch_size"]))
    return {
        "cv": math.prod(len(cv[k]) for k in GRID_KEYS) * study * cv["n_draws"],
        "recipe": math.prod(len(r[k]) for k in GRID_KEYS) * r["n_draws"] + ablation * r["ablation_draws"],
        "controls": d["n_draws"] + study * (d["n_draws"] - cv["n_draws"]),
        "loss_weights": (len(lw["exponents"]) + lw["include_zero"]) * lw["n_draws"],
        "grad_norms": GRAD_NORM_TRIALS,
        "train": len(VARIANTS) * d["n_draws"],
    }


def _check_cost(params: dict) -> None:
    """A run's cost, models trained x train.epochs over every stage, within limits.training_epochs: a
    slip (epochs: 1000000000, a grid list pasted a hundred times) is refused, not trained for days."""
    models, epochs = sum(trainings(params).values()), params["train"]["epochs"]
    limit = params["limits"]["training_epochs"]
    if models * epochs > limit:
        raise ParamError(
            f"this run would train {models:,} models x train.epochs={epochs:,} = {models * epochs:,} model-epochs, "
            f"more than limits.training_epochs={limit:,}; lower train.epochs, the draws or the grids, "
            "or raise limits.training_epochs in params.yaml if you mean it."
        )


def _cross_checks(params: dict) -> None:
    """Bounds that involve two keys (each message names the key to change)."""
    d, t, r = params["data"], params["train"], params["recipe"]
    for key in ("cv.n_draws", "loss_weights.n_draws", "recipe.n_draws", "recipe.ablation_draws"):
        section, name = key.split(".")
        if params[section][name] > d["n_draws"]:
            raise ParamError(
                f"{key}={params[section][name]} exceeds data.n_draws={d['n_draws']}; lower it or draw more pairs."
            )
    if params["grad_norms"]["draw"] >= d["n_draws"]:
        raise ParamError(f"grad_norms.draw={params['grad_norms']['draw']} must be < data.n_draws={d['n_draws']}.")
    n = d["n_pairs"]
    for key, bs in (("train.batch_size", t["batch_size"]), ("recipe.batch_size", r["batch_size"])):
        if bs > n:
            raise ParamError(f"{key}={bs} exceeds data.n_pairs={n} training pairs.")
        # grad_norms always trains with batch norm on, and batch norm needs >= 2 samples per mini-batch
        if bs < 2 or n % bs == 1:
            raise ParamError(
                f"{key}={bs} leaves a mini-batch of 1 pair out of data.n_pairs={n}, which batch norm "
                "cannot train on; choose a batch size >= 2 whose last mini-batch holds 2 or more pairs."
            )
    if r["nesterov"] and r["momentum"] == 0:
        raise ParamError("recipe.nesterov is true but recipe.momentum is 0; Nesterov needs a momentum > 0.")
    w10 = [10.0**e for e in params["loss_weights"]["exponents"]]
    if len(set(w10)) != len(w10):
        raise ParamError("loss_weights.exponents holds two exponents that give the same weight 10**e; drop one.")
    _check_cost(params)


def validate(params: Any) -> dict:
    """Check every section and key of ``params`` against :data:`SCHEMA` and the cross-key bounds;
    return ``params``. Raises :class:`ParamError` naming the first bad key."""
    if not isinstance(params, dict):
        raise ParamError("params.yaml must be a mapping of sections (data, train, cv, ...).")
    for section, value in params.items():
        if section not in SCHEMA:
            raise ParamError(f"unknown section {section!r} in params.yaml; known: {', '.join(SCHEMA)}.")
        if not isinstance(value, dict):
            raise ParamError(f"{section} must be a mapping of keys, got {value!r}.")
    for section, checks in SCHEMA.items():
        given = params.get(section)
        if given is None:
            raise ParamError(f"section {section!r} is missing from params.yaml.")
        for key in given:
            if key not in checks:
                raise ParamError(f"unknown key {section}.{key}; known keys: {', '.join(checks)}.")
        for key, check in checks.items():
            if key not in given:
                raise ParamError(f"{section}.{key} is missing from params.yaml.")
            check(f"{section}.{key}", given[key])
    _cross_checks(params)
    return params


def parse(text: str, path: Path = Path("params.yaml")) -> Any:
    """Parse params text exactly as DVC does (its own loader: ruamel.yaml, safe, YAML 1.2)."""
    from dvc.utils.serialize import ParseError, parse_yaml

    try:
        return parse_yaml(text, str(path))
    except ParseError as err:
        raise ParamError(f"{path} is not valid YAML: {err.__cause__ or err}") from None


def load(path: Path = Path("params.yaml")) -> dict:
    """Read and validate params.yaml (relative to the working directory: the repository root)."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path} not found; run the stages from the repository root.")
    return validate(_plain(parse(path.read_text(), path)))


def numerics_mode(path: Path = Path("params.yaml")) -> str:
    """``train.numerics`` of ``path``, read before numpy and torch load (stages/__init__.py): only this
    key, unchecked otherwise. Where the file or the key is unusable it is the default, ``portable``, and
    the stage's own :func:`load` then names the problem."""
    try:
        mode = _plain(parse(Path(path).read_text(), path))["train"]["numerics"]
    except (OSError, ParamError, KeyError, TypeError):
        return NUMERICS[0]
    return mode if mode in NUMERICS else NUMERICS[0]


def _plain(obj: Any) -> Any:
    """ruamel's mapping and sequence types to plain dicts and lists (values are already plain)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj
