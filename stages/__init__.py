"""The DVC stages, run as ``python -m stages.<name>`` from the repository root (see dvc.yaml).

``python -m`` puts the working directory first on ``sys.path``, ahead of ``PYTHONPATH`` and of
every installed package, so a stage imports this checkout's ``digitpairs``: not another clone's
editable install, nor the main workspace's when DVC runs a queued experiment in a temporary copy.
Results then always come from the code whose hashes dvc.lock records. The check below turns any
other set-up into one clear error instead of a silent run of other code.
"""

import os
import signal
import sys
from pathlib import Path


def _failed_early(kind: type, err: BaseException, tb) -> None:
    """Whatever escapes before ``run_stage`` takes over (an import that fails: a broken install, a missing
    shared library, an address-space limit too small for torch) ends as every other failure does: one
    line, the outputs DVC deleted put back, a non-zero status (digitpairs.core.io.fail_unhandled). Python
    calls this instead of printing a traceback; it exits itself, since SystemExit is not allowed here."""
    try:
        from digitpairs.core.io import fail_unhandled

        fail_unhandled(err)
    except SystemExit as done:
        status = done.code if isinstance(done.code, int) else 1
    except BaseException as again:  # the failure path itself cannot load: say so, in one line all the same
        first = (str(err).strip().splitlines() or [""])[0][:300]
        print(
            f"error: {sys.argv[0]} failed while starting: {type(err).__name__}: {first}; its outputs were not "
            f"put back ({type(again).__name__}: {again}): `dvc checkout` restores the cached ones",
            file=sys.stderr,
        )
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


sys.excepthook = _failed_early


def _defer(signum, frame) -> None:
    """Ctrl-C, SIGTERM or SIGHUP while the stage is still importing its libraries: noted, and acted on
    as soon as ``run_stage`` takes over (it stops the stage and puts back the outputs DVC deleted),
    instead of a traceback from the middle of an import and outputs left deleted."""
    _defer.pending.append(signum)


_defer.pending = []
for _sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    if signal.getsignal(_sig) in (signal.SIG_DFL, signal.default_int_handler):
        signal.signal(_sig, _defer)


def undefer() -> None:
    """For a command that does not go through ``run_stage``: the usual signal handling back (a signal
    noted meanwhile ends it now)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    if _defer.pending:
        sys.exit(128 + _defer.pending[0])


import digitpairs  # noqa: E402
from digitpairs.core import numerics, params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

if Path(digitpairs.__file__).resolve().parents[1] != ROOT:
    sys.exit(
        f"error: the stages in {ROOT} imported digitpairs from {Path(digitpairs.__file__).parent}; "
        f"run them from {ROOT} as `python -m stages.<name>` (as dvc.yaml does)."
    )

# train.numerics, before any library that computes loads: this stage, its pool workers and its Ray tasks
# compute under the pins (portable) or without them (native), as params.yaml and with it dvc.lock say
numerics.use(params.numerics_mode(ROOT / "params.yaml"))
