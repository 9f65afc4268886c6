"""params.yaml: the schema of every hyper-parameter, and validation that names the bad key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

GRID_KEYS = ("nbch1", "nbch2", "nbfch", "batch_norm", "skip_connections", "lr")


class ParamError(ValueError):
    """A params.yaml value is unusable; the message names the key and what is expected."""


def _int(minimum: int):
    def check(key: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ParamError(f"{key} must be an integer, got {v!r}.")
        if v < minimum:
            raise ParamError(f"{key} must be >= {minimum}, got {v}.")

    return check


def _bool(key: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ParamError(f"{key} must be true or false, got {v!r}.")


def _number(key: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ParamError(f"{key} must be a number, got {v!r}.")


def _positive(key: str, v: Any) -> None:
    _number(key, v)
    if not v > 0:
        raise ParamError(f"{key} must be > 0, got {v}.")


def _choice(*options: str):
    def check(key: str, v: Any) -> None:
        if v not in options:
            raise ParamError(f"{key} must be one of {', '.join(options)}; got {v!r}.")

    return check


def _list_of(item_check):
    def check(key: str, v: Any) -> None:
        if not isinstance(v, list) or not v:
            raise ParamError(f"{key} must be a non-empty list, got {v!r}.")
        for i, x in enumerate(v):
            item_check(f"{key}[{i}]", x)
        if len(set(map(repr, v))) != len(v):
            raise ParamError(f"{key} lists a value twice: {v!r}.")

    return check


ENGINE = _choice("lockstep", "loop")
EXECUTOR = _choice("local", "ray")

SCHEMA: dict[str, dict[str, Any]] = {
    "data": {"seed": _int(0), "n_draws": _int(1), "n_pairs": _int(1)},
    "train": {
        "seed": _int(0),
        "epochs": _int(1),
        "batch_size": _int(1),
        "shuffle": _bool,
        "relu_logits": _bool,
        "engine": ENGINE,
        "device": _choice("cpu", "cuda"),
        "executor": EXECUTOR,
    },
    "cv": {
        "seed": _int(0),
        "n_draws": _int(1),
        "score_on": _choice("val", "test"),
        "executor": EXECUTOR,
        "nbch1": _list_of(_int(1)),
        "nbch2": _list_of(_int(1)),
        "nbfch": _list_of(_int(1)),
        "batch_norm": _list_of(_bool),
        "skip_connections": _list_of(_bool),
        "lr": _list_of(_positive),
    },
    "loss_weights": {
        "seed": _int(0),
        "n_draws": _int(1),
        "exponents": _list_of(_number),
        "include_zero": _bool,
        "score_on": _choice("val", "test"),
        "executor": EXECUTOR,
    },
    "grad_norms": {"seed": _int(0), "draw": _int(0)},
    "figures": {"dpi": _int(20)},
}


def validate(params: dict) -> dict:
    """Check every section and key of ``params`` against :data:`SCHEMA`; return ``params``."""
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
    d, t = params["data"], params["train"]
    for section in ("cv", "loss_weights"):
        if params[section]["n_draws"] > d["n_draws"]:
            raise ParamError(
                f"{section}.n_draws={params[section]['n_draws']} exceeds data.n_draws={d['n_draws']}; "
                "lower it or draw more pairs."
            )
    if params["grad_norms"]["draw"] >= d["n_draws"]:
        raise ParamError(f"grad_norms.draw={params['grad_norms']['draw']} must be < data.n_draws={d['n_draws']}.")
    if t["batch_size"] > d["n_pairs"]:
        raise ParamError(f"train.batch_size={t['batch_size']} exceeds data.n_pairs={d['n_pairs']} training pairs.")
    if 4 * d["n_pairs"] > 60000:
        raise ParamError(f"data.n_pairs={d['n_pairs']} needs more than MNIST's 60000 training images; at most 15000.")
    return params


def load(path: Path = Path("params.yaml")) -> dict:
    """Read and validate params.yaml (the way DVC's example projects read it)."""
    try:
        params = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise ParamError(f"{path} is not valid YAML: {err}") from err
    return validate(params)
