"""Deterministic, atomic file output and the stage scripts' error handling."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from digitpairs.core import params as params_module


class StageError(RuntimeError):
    """An expected failure of a stage (MNIST unavailable, ...) whose message names the problem and
    the fix: :func:`run_stage` prints it as one line. Defined here so this module, which every stage
    runs, imports nothing from the data, training or report code."""


def _atomic_write(path: Path, text: str | bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text)
    tmp.replace(path)


def write_json(obj: object, path: Path) -> None:
    """Sorted keys and fixed indentation, so unchanged results give unchanged bytes (and hashes)."""
    _atomic_write(path, json.dumps(obj, sort_keys=True, indent=2) + "\n")


def write_csv(df: pd.DataFrame, path: Path) -> None:
    """A CSV written all at once, floats as their shortest exact repr, no index."""
    _atomic_write(path, df.to_csv(index=False, lineterminator="\n"))


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _put(src: Path, dest: Path, md5: str) -> None:
    """Copy a cached object into place, checked against its recorded hash, via a temporary name."""
    if _md5(src) != md5:
        raise FileNotFoundError(f"{src} does not hold {md5}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.copyfile(src, tmp)
    tmp.replace(dest)


def restore_outputs(stage: str) -> list[str]:
    """Put back the outputs of ``stage`` that DVC deleted before running its command.

    DVC removes a stage's outputs before it starts the command, and offers no hook before that;
    so when the command then refuses to run (a bad value in params.yaml, under ``dvc repro -s``),
    it restores every missing output from the DVC cache (or, for an uncached output such as the
    git-tracked metrics and the README's figure, from ``git HEAD``) exactly as dvc.lock records it,
    hash-checked. Outputs that exist are left alone. Returns the paths it could not restore.
    """
    lock_path = Path("dvc.lock")
    if not lock_path.is_file():
        return []
    try:
        entry = (params_module.parse(lock_path.read_text(), lock_path) or {}).get("stages", {}).get(stage) or {}
    except params_module.ParamError:
        return []
    missing = [o for o in entry.get("outs", []) if "md5" in o and not Path(o["path"]).exists()]
    if not missing:
        return []
    from dvc.repo import Repo

    cache = Repo(".").cache.local
    lost = []
    for out in missing:
        path, md5 = Path(out["path"]), out["md5"]
        try:
            if md5.endswith(".dir"):
                tmp = path.with_name(path.name + ".partial")
                shutil.rmtree(tmp, ignore_errors=True)
                for entry in json.loads(Path(cache.oid_to_path(md5)).read_text()):
                    _put(Path(cache.oid_to_path(entry["md5"])), tmp / entry["relpath"], entry["md5"])
                tmp.mkdir(parents=True, exist_ok=True)
                tmp.replace(path)
            elif Path(cache.oid_to_path(md5)).is_file():
                _put(Path(cache.oid_to_path(md5)), path, md5)
            else:  # an uncached output (cache: false) is committed to git
                blob = subprocess.run(["git", "show", f"HEAD:{out['path']}"], capture_output=True, check=False)
                if blob.returncode or hashlib.md5(blob.stdout).hexdigest() != md5:
                    raise FileNotFoundError(out["path"])
                _atomic_write(path, blob.stdout)  # bytes: the README's PNG is one
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            lost.append(out["path"])
    return lost


def run_stage(main: Callable[[dict], None]) -> None:
    """Validate params.yaml, then run a stage's ``main(params)``, turning expected failures into
    one clear line on stderr.

    Validation comes first, before the stage writes anything. Under DVC (``DVC_STAGE`` set) a bad
    value also puts back the outputs DVC deleted (:func:`restore_outputs`), so ``dvc repro -s``
    loses nothing either. Exit status: 1 for an error, 130 for an interrupt (Ctrl-C), which says
    what was kept and how to resume.
    """
    stage = os.environ.get("DVC_STAGE", "")
    try:
        try:
            p = params_module.load()
        except params_module.ParamError as err:
            lost = restore_outputs(stage) if stage else []
            note = f" (could not restore {', '.join(lost)}: run `dvc checkout {stage}`)" if lost else ""
            print(f"error: {err}{note}", file=sys.stderr)
            sys.exit(1)
        main(p)
    except (ValueError, FileNotFoundError, StageError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as err:
        print(f"interrupted: {err or 'stopped before finishing'}", file=sys.stderr)
        sys.exit(130)
