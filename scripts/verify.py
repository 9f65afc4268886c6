"""Recompute the committed pipeline from scratch and check every output against dvc.lock.

    python scripts/verify.py               # the whole pipeline (the default grid: about 15 min on 2 cores)
    python scripts/verify.py --quick       # mnist and the pair draws only (about a minute)
    python scripts/verify.py cv@pair       # one stage and what it needs

The last commit is cloned into a temporary folder with a DVC cache of its own; `dvc repro
--no-run-cache` then computes every targeted stage (nothing is pulled or restored from a cache), and
each output's hash is compared with the committed `dvc.lock`. One line per output; the exit status is
1 if any output differs or is missing. This is how a reader checks the published numbers on their own
machine. `MNIST_MIRROR` is passed on (a relative path is taken from the repository root).
"""

from __future__ import annotations

import argparse
import os
import shutil
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
        sys.exit(f"error: `{' '.join(cmd)}` failed in {cwd} (exit {cp.returncode}).")
    return cp.stdout if capture else ""


def outputs(lock: dict, stages: set[str] | None = None) -> dict[str, tuple[str, str]]:
    """``{path: (stage, md5)}`` of every output in a parsed dvc.lock (of ``stages`` only, if given)."""
    found = {}
    for stage, entry in (lock or {}).get("stages", {}).items():
        if stages is None or stage in stages:
            for out in entry.get("outs", []):
                found[out["path"]] = (stage, out.get("md5", "?"))
    return found


def compare(committed: dict, recomputed: dict) -> list[str]:
    """Report lines, one per output of every recomputed stage; a line starting 'DIFFERS' or 'MISSING'
    is a failure."""
    ran = set((recomputed or {}).get("stages", {}))
    want, got = outputs(committed, ran), outputs(recomputed, ran)
    lines = []
    for path in sorted(want.keys() | got.keys()):
        stage = (want.get(path) or got[path])[0]
        md5, new = (want.get(path, (stage, None))[1], got.get(path, (stage, None))[1])
        if md5 is None:
            lines.append(f"MISSING  {path} ({stage}): not in the committed dvc.lock")
        elif new is None:
            lines.append(f"MISSING  {path} ({stage}): not recomputed")
        elif new == md5:
            lines.append(f"match    {path} ({stage}) {md5}")
        else:
            lines.append(f"DIFFERS  {path} ({stage}): committed {md5}, recomputed {new}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stages", nargs="*", help="stages to recompute, with their upstream stages (default: all)")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)} and its upstream stages")
    ap.add_argument("--keep", action="store_true", help="keep the temporary clone (kept anyway on a difference)")
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
    sh("git", "clone", "-q", "--no-hardlinks", str(repo), str(clone), cwd=tmp)
    sh(dvc, "config", "--local", "cache.dir", str(tmp / "cache"), cwd=clone)
    committed = yaml.safe_load(sh("git", "show", "HEAD:dvc.lock", cwd=clone))
    commit = sh("git", "rev-parse", "--short", "HEAD", cwd=clone).strip()
    print(f"verifying commit {commit} in {clone}: dvc repro --no-run-cache {' '.join(targets) or '(all stages)'}")
    t0 = time.perf_counter()
    sh(dvc, "repro", "--no-run-cache", *targets, cwd=clone, env=env, capture=False)
    minutes = (time.perf_counter() - t0) / 60
    recomputed = yaml.safe_load((clone / "dvc.lock").read_text())
    lines = compare(committed, recomputed)
    print("\n".join(lines))
    bad = sum(not line.startswith("match") for line in lines)
    if bad or not lines:
        print(f"{bad} of {len(lines)} outputs differ from dvc.lock ({minutes:.1f} min); clone kept in {clone}")
        return 1
    print(f"all {len(lines)} outputs match dvc.lock ({minutes:.1f} min)")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
