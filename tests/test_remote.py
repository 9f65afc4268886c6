"""The team workflow through a DVC remote: one clone computes and pushes (outputs and run-cache),
fresh clones of its git history pull and retrain nothing. Against a local-folder remote and an
S3-compatible server (moto, on 127.0.0.1), each set up as docs/remotes.md does (`verify true`); S3
credentials never reach a tracked file. A corrupt object in a remote is refused by `dvc pull`, and
`make check` (scripts/check_outputs.py) names a corrupt file that a remote without `verify` let through."""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.e2e import build_log, copy_repo, dvc, ran, sh

pytestmark = pytest.mark.slow

TARGET = "cv@pair"  # check_params, mnist, pairs and cv@pair: one training stage and its inputs
STAGES = {"check_params", "mnist", "pairs", "cv@pair"}
OUTS = ["data/params.ok", "data/mnist", "data/pairs", "data/cv/pair.csv", "data/cv/pair_selected.json"]
BUCKET, KEY_ID, SECRET = "results", "testing-key-id", f"secret-{uuid.uuid4().hex}"
LOOPBACK = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def files(root) -> dict[str, str]:
    """The digest of every file under the outputs, by path relative to ``root``."""
    out = {}
    for o in OUTS:
        p = root / o
        for f in [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()):
            out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def s3_credentials(repo, endpoint: str) -> None:
    """Endpoint and keys in the git-ignored .dvc/config.local, as a teammate would set them."""
    for option, value in [("endpointurl", endpoint), ("access_key_id", KEY_ID), ("secret_access_key", SECRET)]:
        dvc(repo, "remote", "modify", "--local", "s3", option, value)


@pytest.fixture(scope="module")
def origin(tmp_path_factory, tiny_built):
    """One pipeline run, committed and pushed (with its run-cache) to both remotes: a copy of the shared
    tiny pipeline (every stage run once from an empty cache, so its run-cache holds every stage)."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, region_name="us-east-1"
    ).create_bucket(Bucket=BUCKET)

    root = tmp_path_factory.mktemp("remote")
    repo = copy_repo(tiny_built, root / "origin")
    assert STAGES <= ran(build_log(repo))  # computed, not restored: the run-cache holds their runs
    log = dvc(repo, "repro", "--dry", "--force", TARGET).stdout
    assert ran(log) == STAGES, log  # TARGET with its upstream stages, and nothing else
    dvc(repo, "remote", "add", "store", str(root / "store"))
    dvc(repo, "remote", "add", "-d", "s3", f"s3://{BUCKET}/digitpairs")
    for remote in ("store", "s3"):
        dvc(repo, "remote", "modify", remote, "verify", "true")
    s3_credentials(repo, endpoint)
    changed = [line[3:] for line in sh(repo, "git", "status", "--porcelain", "-uall").stdout.splitlines()]
    assert set(changed) == {".dvc/config"}, changed  # the results were committed; config.local is ignored
    sh(repo, "git", "add", *changed)
    sh(repo, "git", "commit", "-qm", "remotes")
    for remote in ("store", "s3"):
        dvc(repo, "push", "-r", remote, "--run-cache", **LOOPBACK)
    yield {"repo": repo, "root": root, "endpoint": endpoint, "files": files(repo)}
    server.stop()


def fresh_clone(origin, remote: str, name: str):
    """A git clone of origin (no outputs, no config.local) set up to use ``remote`` by default."""
    repo = origin["root"] / f"{name}-{remote}"
    sh(origin["root"], "git", "clone", "-q", str(origin["repo"]), str(repo))
    if remote == "s3":
        s3_credentials(repo, origin["endpoint"])
    dvc(repo, "remote", "default", "--local", remote)
    return repo


REMOTES = ["store", "s3"]


@pytest.mark.parametrize("remote", REMOTES)
def test_pull_restores_every_output_and_nothing_retrains(origin, remote):
    repo = fresh_clone(origin, remote, "pull")
    assert not (repo / "data/pairs").exists()
    dvc(repo, "pull", "--with-deps", TARGET, **LOOPBACK)
    assert files(repo) == origin["files"]
    assert "up to date" in dvc(repo, "status", "--with-deps", TARGET).stdout
    log = dvc(repo, "repro", TARGET).stdout
    assert ran(log) == set(), log


@pytest.mark.parametrize("remote", REMOTES)
def test_repro_pull_fetches_instead_of_running(origin, remote):
    repo = fresh_clone(origin, remote, "repro-pull")
    log = dvc(repo, "repro", "--pull", TARGET, **LOOPBACK).stdout
    assert ran(log) == set(), log
    assert files(repo) == origin["files"]


@pytest.mark.parametrize("remote", REMOTES)
def test_run_cache_skips_stages_without_a_lock_file(origin, remote):
    """A teammate's branch with the same params but no dvc.lock: the run-cache names the outputs."""
    repo = fresh_clone(origin, remote, "run-cache")
    (repo / "dvc.lock").unlink()
    log = dvc(repo, "repro", "--pull", TARGET, **LOOPBACK).stdout
    assert ran(log) == set(), log
    assert set(re.findall(r"Stage '([^']+)' is cached - skipping run", log)) == STAGES, log
    assert files(repo) == origin["files"]
    lock = [yaml.safe_load((r / "dvc.lock").read_text())["stages"] for r in (repo, origin["repo"])]
    assert {s: lock[0][s] for s in STAGES} == {s: lock[1][s] for s in STAGES}  # the pushed run's hashes


def test_no_secret_in_tracked_files(origin):
    for repo in [origin["repo"], *origin["root"].glob("pull-*")]:
        tracked = sh(repo, "git", "ls-files", "-z").stdout.split("\0")
        leaks = [f for f in tracked if f and (repo / f).is_file() and SECRET.encode() in (repo / f).read_bytes()]
        assert not leaks, f"{repo}: secret in {leaks}"
    local = origin["repo"] / ".dvc/config.local"
    assert SECRET in local.read_text()  # it is where credentials live...
    sh(origin["repo"], "git", "check-ignore", "-q", ".dvc/config.local")  # ...and git ignores it


MODEL = "models_out/models/pair/draw_00.safetensors"


def check(repo: Path) -> subprocess.CompletedProcess:
    return sh(repo, sys.executable, "scripts/check_outputs.py", check=False)


def test_a_corrupt_object_in_the_remote_is_refused_by_pull_and_named_by_the_check(tiny_built, tmp_path):
    """One byte flipped in a folder remote's copy of a model. With `verify true` (docs/remotes.md),
    `dvc pull` refuses the object; without it the pull, `dvc status` and `dvc repro` all pass it, and
    `make check` names the file, with a fix that works once the remote holds the right bytes."""
    origin = copy_repo(tiny_built, tmp_path / "origin")
    dvc(origin, "remote", "add", "-d", "store", str(tmp_path / "store"))
    dvc(origin, "remote", "modify", "store", "verify", "true")
    sh(origin, "git", "commit", "-qam", "remote")
    dvc(origin, "push")
    md5 = hashlib.md5((origin / MODEL).read_bytes()).hexdigest()
    remote_copy = tmp_path / "store/files/md5" / md5[:2] / md5[2:]
    good = remote_copy.read_bytes()
    remote_copy.chmod(0o644)
    remote_copy.write_bytes(good[:1000] + bytes([good[1000] ^ 1]) + good[1001:])

    repo = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(origin), str(repo))
    cp = dvc(repo, "pull", "-v", check=False)
    log = cp.stdout + cp.stderr
    assert cp.returncode != 0, log
    assert re.search(rf"corrupted cache file '\S*{md5[:2]}/{md5[2:]}'", log), log  # -v names the object
    assert re.search(r"Checkout failed for following targets:\s+models_out/models\b", log), log
    assert not (repo / MODEL).exists()  # not used
    assert check(repo).returncode == 1

    dvc(repo, "remote", "modify", "--local", "store", "verify", "false")  # a remote set up without it
    dvc(repo, "pull")
    assert hashlib.md5((repo / MODEL).read_bytes()).hexdigest() != md5  # the corrupt bytes, unnoticed:
    assert "up to date" in dvc(repo, "status").stdout
    cp = check(repo)
    assert cp.returncode == 1, cp.stdout + cp.stderr
    wrong = [line for line in cp.stdout.splitlines() if line.startswith("wrong: ")]
    assert len(wrong) == 1 and wrong[0].startswith(f"wrong: train: {MODEL} not as dvc.lock records; fix: "), cp.stdout
    assert re.search(r"^\d+ of \d+ outputs match dvc.lock", cp.stdout, re.M), cp.stdout

    remote_copy.write_bytes(good)  # the remote repaired (pushed again from a good clone)
    fix = re.search(r"`(rm -rf [^`]+ && dvc pull [^`]+)`", wrong[0]).group(1)
    sh(repo, "bash", "-c", fix)
    assert hashlib.md5((repo / MODEL).read_bytes()).hexdigest() == md5
    cp = check(repo)
    assert cp.returncode == 0 and "wrong" not in cp.stdout, cp.stdout
