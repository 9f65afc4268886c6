"""The DVC stages, run as ``python -m stages.<name>`` from the repository root (see dvc.yaml).

``python -m`` puts the working directory first on ``sys.path``, ahead of ``PYTHONPATH`` and of
every installed package, so a stage imports this checkout's ``digitpairs``: not another clone's
editable install, nor the main workspace's when DVC runs a queued experiment in a temporary copy.
Results then always come from the code whose hashes dvc.lock records. The check below turns any
other set-up into one clear error instead of a silent run of other code.
"""

import sys
from pathlib import Path

import digitpairs

ROOT = Path(__file__).resolve().parents[1]

if Path(digitpairs.__file__).resolve().parents[1] != ROOT:
    sys.exit(
        f"error: the stages in {ROOT} imported digitpairs from {Path(digitpairs.__file__).parent}; "
        f"run them from {ROOT} as `python -m stages.<name>` (as dvc.yaml does)."
    )
