"""Deterministic, atomic file output and the stage scripts' error handling."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from digitpairs.mnist import MnistUnavailable


def _atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(obj: object, path: Path) -> None:
    """Sorted keys and fixed indentation, so unchanged results give unchanged bytes (and hashes)."""
    _atomic_write(path, json.dumps(obj, sort_keys=True, indent=2) + "\n")


def write_csv(df: pd.DataFrame, path: Path) -> None:
    """A CSV written all at once, floats as their shortest exact repr, no index."""
    _atomic_write(path, df.to_csv(index=False, lineterminator="\n"))


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main``; turn expected failures into one clear line on stderr and exit 1."""
    try:
        main()
    except (ValueError, FileNotFoundError, MnistUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
