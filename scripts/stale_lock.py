"""Before `dvc repro` (`make repro` runs this first): a `.dvc/tmp/rwlock` left by a DVC command that was
killed (SIGKILL: the OOM killer, a lost machine) is removed, with one line saying so.

DVC records in that file the process id and command line of every command working on the pipeline's
files, and removes its entry when the command ends; a killed command cannot. DVC itself skips an entry
whose process id no longer exists, but not one whose id now belongs to another process (after a reboot,
in a container, where ids are small and soon reused) or to a killed process not yet reaped (a zombie): the
next `dvc repro` then refuses to start ("is busy, it is being written to by ..."). Here such an entry is
stale too; the file goes only when every entry is, and only while this script holds DVC's repository lock,
so that no DVC command is running meanwhile. Otherwise it says what runs, and the command that removes
the file once nothing does.

    python scripts/stale_lock.py        # from the repository root
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psutil

RWLOCK = Path(".dvc/tmp/rwlock")


def entries(lock: dict) -> list[dict]:
    """Every ``{"pid", "cmd"}`` entry of the lock file, readers and writers."""
    found = []
    for mode in ("read", "write"):
        for held in (lock.get(mode) or {}).values():
            found += held if isinstance(held, list) else [held]
    return found


def running(entry: dict) -> bool:
    """Whether the entry's process still runs the command that wrote it (a zombie does not: it was killed)."""
    try:
        proc = psutil.Process(int(entry["pid"]))
        return proc.status() != psutil.STATUS_ZOMBIE and " ".join(proc.cmdline()).endswith(entry["cmd"])
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def check(root: Path) -> str:
    """Remove ``root``/.dvc/tmp/rwlock if every process it names is gone; return what to tell the user ("" when
    there is nothing to say)."""
    from dvc.lock import LockError
    from dvc.repo import Repo

    path = root / RWLOCK
    if not path.is_file():
        return ""
    try:
        with Repo(str(root)).lock:  # DVC's repository lock: no DVC command runs while this holds it
            held = entries(json.loads(path.read_text() or "{}"))
            live = [e for e in held if running(e)]
            if not held:  # what every DVC command leaves when it ends: nothing held
                return ""
            if not live:
                path.unlink()
                names = ", ".join(sorted({f"`{e.get('cmd')}` (PID {e.get('pid')})" for e in held}))
                return f"removed {RWLOCK}, the lock of DVC command(s) killed before they could release it: {names}"
    except (LockError, ValueError) as err:  # another DVC command holds the repository, or the file is not JSON
        return f"{RWLOCK} is held or unreadable ({err}); if no DVC command is running here: `rm {RWLOCK}`"
    pids = ", ".join(str(e["pid"]) for e in live)
    return f"{RWLOCK}: DVC process(es) {pids} still run here; wait for them, or if they are not DVC: `rm {RWLOCK}`"


if __name__ == "__main__":
    note = check(Path.cwd())
    if note:
        print(f"stale_lock: {note}", file=sys.stderr)
