"""Free space for a run, checked before it starts (stage check_params).

When DVC cannot save a stage's outputs into its cache (a full disk), it still records them in
dvc.lock and goes on to the next stage, which overwrites its own outputs: the previous results are
then in the cache but no longer named by dvc.lock (docs/resume.md). So a run is refused upfront
when the cache's filesystem cannot hold what it may save.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from digitpairs.core.io import StageError, _lock_stages


def needed(stages: dict) -> int:
    """Bytes a run can add to the DVC cache: the size dvc.lock records for every output. A stage that
    reruns saves each output it changes once more (the cache keeps the previous version, which is what
    lets them be restored), so a full rerun of outputs of about the recorded sizes needs this much.
    Outputs that grow with the params (more draws, more trials) need proportionally more."""
    return sum(o.get("size", 0) for entry in stages.values() for o in (entry or {}).get("outs", []))


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on the filesystem holding ``path`` (or, if it does
    not exist yet, its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def check_free_space() -> None:
    """Refuse to start (StageError, with the numbers and the fix) when the filesystem of the DVC cache
    has less free space than :func:`needed` for the outputs in ./dvc.lock. No dvc.lock: nothing to lose."""
    need = needed(_lock_stages())
    if not need:
        return
    from dvc.repo import Repo

    cache = Path(Repo(".").cache.local_cache_dir)
    free = free_bytes(cache)
    if free < need:
        where = cache.relative_to(Path.cwd()) if cache.is_relative_to(Path.cwd()) else cache
        raise StageError(
            f"the DVC cache ({where}) has {_mb(free)} free on its filesystem, and a run can need {_mb(need)} "
            "there (the size of the outputs dvc.lock records: each output a stage rewrites is saved once more); "
            "free some space there, or move the cache (`dvc cache dir PATH`), then run `dvc repro` again."
        )
