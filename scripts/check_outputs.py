"""Check the workspace's outputs against dvc.lock by hashing their bytes again (`make check`).

    python scripts/check_outputs.py            # from the repository root; exit status 1 if any differs

`dvc status` trusts the hashes DVC noted when it wrote or checked out a file (its state database in
.dvc/tmp, keyed by inode, size and modification time), and `dvc pull` from a remote without
`verify true` trusts the remote's bytes: a corrupt object pulled from a remote then looks up to date.
This recomputes every output's md5 as DVC defines it, with DVC's own hashing (dvc_data's ``build``: a
folder's hash is that of its ``.dir`` manifest) and no state, and names each output whose bytes are
not those dvc.lock records, with the file at fault and the command that puts it right.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml


def recompute(repo, path: str) -> tuple[str, dict[str, str]]:
    """``(md5, files)``: output ``path``'s hash as dvc.lock writes it (``<md5>.dir`` for a folder) and,
    for a folder, ``{relpath: md5}`` of its files; every byte read again (no state database)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB

    scratch = HashFileDB(repo.fs, repo.cache.local.path)  # the cache's place without its state: no trust
    _, _, obj = build(scratch, str(Path(path).absolute()), repo.fs, "md5", dry_run=True, ignore=repo.dvcignore)
    files = {e["relpath"]: e["md5"] for e in obj.as_list()} if hasattr(obj, "as_list") else {}
    return obj.hash_info.value, files


def cached_md5(cache, md5: str) -> str | None:
    """The md5 of the bytes the DVC cache holds under the name ``md5`` (None if it holds none)."""
    from dvc_data.hashfile.hash import file_md5

    path = Path(cache.oid_to_path(md5))
    return file_md5(str(path)) if path.is_file() else None


def manifest(cache, md5: str) -> dict[str, str]:
    """``{relpath: md5}`` of a folder output from its ``.dir`` object, if the cache holds it intact."""
    if not md5.endswith(".dir") or cached_md5(cache, md5) != md5.removesuffix(".dir"):
        return {}
    return {e["relpath"]: e["md5"] for e in json.loads(Path(cache.oid_to_path(md5)).read_text())}


def diagnose(repo, stage: str, path: str, md5: str) -> str | None:
    """None if output ``path`` holds exactly the bytes dvc.lock's ``md5`` names, else one line naming the
    files at fault (the output itself if it is missing) and the fix."""
    expected = manifest(repo.cache.local, md5)
    if not Path(path).exists():
        bad = {path: md5 if not md5.endswith(".dir") else None}
        wanted = list(expected.values()) or [md5]
    else:
        actual, files = recompute(repo, path)
        if actual == md5:
            return None
        rels = sorted(r for r in expected.keys() | files.keys() if expected.get(r) != files.get(r))
        bad = {f"{path}/{r}": expected.get(r) for r in rels} if expected else {path: md5}
        wanted = [m for m in bad.values() if m]
    cure = fix(repo.cache.local, stage, path, md5, sorted(bad), wanted)
    return f"{stage}: {', '.join(bad)} not as dvc.lock records; fix: {cure}"


def fix(cache, stage: str, path: str, md5: str, bad: list[str], wanted: list[str]) -> str:
    """The commands that put output ``path`` back, given its ``bad`` files and the md5s it lacks (``wanted``).
    DVC's state database believes the files it checked out hold what their names say, so a checkout or
    pull does not replace them: the bad files go first, and so do corrupt copies in the cache (which a
    pull would keep, as present)."""
    if not md5.endswith(".dir") and cached_md5(cache, md5) is None and _in_git(path):
        return f"`git checkout -- {path}`"
    wanted = wanted + ([md5] if md5.endswith(".dir") else [])
    corrupt = [
        os.path.relpath(cache.oid_to_path(m))
        for m in wanted
        if cached_md5(cache, m) not in (None, m.removesuffix(".dir"))
    ]
    remove = " ".join([p for p in bad if Path(p).exists()] + sorted(corrupt))
    rm = f"rm -rf {remove} && " if remove else ""
    if not corrupt and all(cached_md5(cache, m) for m in wanted):
        return f"`{rm}dvc checkout {path}` (the cache holds the right bytes)"
    pull = f"`{rm}dvc pull {path}` (a remote with `verify true` refuses a corrupt copy)"
    return f"{pull}, or `dvc repro -s {stage}`"


def _in_git(path: str) -> bool:
    import subprocess

    return subprocess.run(["git", "ls-files", "--error-unmatch", path], capture_output=True).returncode == 0


def main() -> int:
    from dvc.repo import Repo

    lock = Path("dvc.lock")
    if not lock.is_file():
        print("error: no dvc.lock here; run this from the repository root (`make check`).", file=sys.stderr)
        return 1
    repo = Repo(".")
    stages = yaml.safe_load(lock.read_text())["stages"]
    outs = [(s, o["path"], o["md5"]) for s, e in stages.items() for o in e.get("outs", []) if "md5" in o]
    problems = [line for s, p, m in outs if (line := diagnose(repo, s, p, m))]
    for line in problems:
        print(f"wrong: {line}")
    print(f"{len(outs) - len(problems)} of {len(outs)} outputs match dvc.lock (every byte hashed again)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
