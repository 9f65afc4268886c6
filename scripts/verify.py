"""Recompute the committed pipeline from scratch and check every output against dvc.lock.

    python scripts/verify.py               # the whole pipeline (the default grid: about 15 min on 2 cores)
    python scripts/verify.py --quick       # mnist and the pair draws only (about a minute)
    python scripts/verify.py cv@pair       # one stage and what it needs
    python scripts/verify.py --keep ...    # keep the temporary clone (its path is printed)

The last commit is cloned into a temporary folder with a DVC cache of its own and without its
dvc.lock; `dvc repro --no-run-cache` then computes every targeted stage (nothing is pulled or
restored from a cache), and the dvc.lock it writes, which holds exactly the stages that ran, is
compared, output by output, with the committed one. One line per output of the committed dvc.lock:
`match` (recomputed, same hash), `DIFFERS` (recomputed, another hash), `not recomputed` (its stage
was not run: --quick or named stages), or `MISSING` (recomputed but absent from the committed
dvc.lock, or the reverse); then a summary that counts each. The exit status is 0 only when every
recomputed output matches; outputs not recomputed are counted, never reported as matching. If the
working tree's dvc.lock has uncommitted entries that differ from the commit, those outputs are named
and the exit status is 1: what was verified is not the dvc.lock in hand. The temporary clone is
removed on every exit (error, interrupt, difference) unless --keep is given. This is how a reader
checks the published numbers on their own machine. `MNIST_MIRROR` is passed on (a relative path is
taken from the repository root).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

QUICK = ["pairs"]  # with its upstream stages: check_params, mnist


def sh(*cmd: str, cwd: Path, env: dict | None = None, capture: bool = True) -> str:
    """Run a command; on failure print its output and exit 1."""
    cp = subprocess.run(cmd, cwd=cwd, env=env, capture_output=capture, text=True)
    if cp.returncode != 0:
        if capture:
            sys.stderr.write(cp.stdout + cp.stderr)
        print(f"error: `{' '.join(cmd)}` failed in {cwd} (exit {cp.returncode}).", file=sys.stderr)
        sys.exit(1)
    return cp.stdout if capture else ""


def outputs(lock: dict, stages: set[str] | None = None) -> dict[str, tuple[str, str]]:
    """``{path: (stage, md5)}`` of every output in a parsed dvc.lock (of ``stages`` only, if given)."""
    found = {}
    for stage, entry in (lock or {}).get("stages", {}).items():
        if stages is None or stage in stages:
            for out in entry.get("outs", []):
                found[out["path"]] = (stage, out.get("md5", "?"))
    return found


WIDTH = len("not recomputed") + 2


def compare(committed: dict, recomputed: dict) -> list[str]:
    """Report lines, one per output of the committed dvc.lock (plus any only the recomputed one holds).

    Only the stages ``recomputed`` holds were run: their outputs are ``match`` or ``DIFFERS``; every other
    committed output is ``not recomputed``. A line starting ``DIFFERS`` or ``MISSING`` is a failure."""
    ran = set((recomputed or {}).get("stages", {}))
    want, got = outputs(committed), outputs(recomputed, ran)
    lines = []
    for path in sorted(want.keys() | got.keys()):
        stage = (want.get(path) or got[path])[0]
        md5, new = want.get(path, (stage, None))[1], got.get(path, (stage, None))[1]
        if md5 is None:
            lines.append(f"{'MISSING':<{WIDTH}}{path} ({stage}): recomputed, not in the committed dvc.lock")
        elif stage not in ran:
            lines.append(f"{'not recomputed':<{WIDTH}}{path} ({stage})")
        elif new is None:
            lines.append(f"{'MISSING':<{WIDTH}}{path} ({stage}): its stage ran but did not record it")
        elif new == md5:
            lines.append(f"{'match':<{WIDTH}}{path} ({stage}) {md5}")
        else:
            lines.append(f"{'DIFFERS':<{WIDTH}}{path} ({stage}): committed {md5}, recomputed {new}")
    return lines


def summary(lines: list[str], minutes: float, stale: list[str] = ()) -> tuple[str, bool]:
    """The closing line, and whether the run verified everything it recomputed (and the dvc.lock in
    hand: ``stale`` lists the outputs whose uncommitted entry differs from the commit)."""
    count = {k: sum(line.startswith(k) for line in lines) for k in ("match", "DIFFERS", "not recomputed", "MISSING")}
    recomputed = count["match"] + count["DIFFERS"] + count["MISSING"]
    ok = recomputed > 0 and count["DIFFERS"] == count["MISSING"] == 0 and not stale
    if ok and not count["not recomputed"]:
        return f"all {len(lines)} outputs match dvc.lock ({minutes:.1f} min)", True
    parts = [f"{count['match']} match", f"{count['DIFFERS']} differ"]
    if count["MISSING"]:
        parts.append(f"{count['MISSING']} missing")
    parts.append(f"{count['not recomputed']} not recomputed")
    text = f"{recomputed} of {len(lines)} outputs recomputed: {', '.join(parts)} ({minutes:.1f} min)"
    if count["not recomputed"]:
        text += "; the outputs not recomputed are not verified (run without --quick or stage names to verify them)"
    if stale:
        text += (
            f"\nnot verified: the working tree's dvc.lock differs from the commit for {len(stale)} output(s) "
            f"({', '.join(stale[:5])}{', ...' if len(stale) > 5 else ''}); "
            "commit it (or `git checkout dvc.lock`) and verify again"
        )
    return text, ok


def uncommitted(repo: Path, committed: dict) -> list[str]:
    """Outputs whose entry in the working tree's dvc.lock differs from the committed one."""
    path = repo / "dvc.lock"
    if not path.is_file():
        return []
    try:
        local = outputs(yaml.safe_load(path.read_text()))
    except yaml.YAMLError:
        return ["dvc.lock (not valid YAML)"]
    want = outputs(committed)
    return sorted(p for p in want.keys() | local.keys() if want.get(p) != local.get(p))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stages", nargs="*", help="stages to recompute, with their upstream stages (default: all)")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)} and its upstream stages")
    ap.add_argument("--keep", action="store_true", help="keep the temporary clone (removed otherwise, on every exit)")
    args = ap.parse_args()
    targets = QUICK if args.quick else args.stages

    repo = Path(sh("git", "rev-parse", "--show-toplevel", cwd=Path.cwd()).strip())
    if sh("git", "status", "--porcelain", "--untracked-files=no", cwd=repo).strip():
        print("note: uncommitted changes are not verified; the last commit is.", file=sys.stderr)
    env = dict(os.environ)
    mirror = env.get("MNIST_MIRROR")
    if mirror and "://" not in mirror:
        env["MNIST_MIRROR"] = str((repo / mirror).resolve())
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    dvc = str(Path(sys.executable).with_name("dvc"))

    tmp = Path(tempfile.mkdtemp(prefix="digitpairs-verify-"))
    clone = tmp / "clone"
    # SIGTERM and SIGHUP end the run through the same `finally` as Ctrl-C and errors do
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    status = 1
    try:
        status = verify(repo, clone, tmp, targets, env, dvc)
        return status
    finally:  # also on an error, Ctrl-C, SIGTERM
        if args.keep:
            print(f"clone kept in {clone} (its DVC cache: {tmp / 'cache'})", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            if status:
                print(f"temporary clone {clone} removed; --keep keeps it to inspect.", file=sys.stderr)


def verify(repo: Path, clone: Path, tmp: Path, targets: list[str], env: dict, dvc: str) -> int:
    sh("git", "clone", "-q", "--no-hardlinks", str(repo), str(clone), cwd=tmp)
    sh(dvc, "config", "--local", "cache.dir", str(tmp / "cache"), cwd=clone)
    committed = yaml.safe_load(sh("git", "show", "HEAD:dvc.lock", cwd=clone))
    commit = sh("git", "rev-parse", "--short", "HEAD", cwd=clone).strip()
    # without dvc.lock, the one `dvc repro` writes holds exactly the stages it ran
    (clone / "dvc.lock").unlink(missing_ok=True)
    print(f"verifying commit {commit} in {clone}: dvc repro --no-run-cache {' '.join(targets) or '(all stages)'}")
    t0 = time.perf_counter()
    sh(dvc, "repro", "--no-run-cache", *targets, cwd=clone, env=env, capture=False)
    minutes = (time.perf_counter() - t0) / 60
    lock = clone / "dvc.lock"
    recomputed = yaml.safe_load(lock.read_text()) if lock.is_file() else {}
    lines = compare(committed, recomputed)
    print("\n".join(lines))
    text, ok = summary(lines, minutes, uncommitted(repo, committed))
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: nothing verified.", file=sys.stderr)
        sys.exit(130)
