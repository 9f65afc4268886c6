"""What a failure leaves behind, on one tiny finished pipeline (real MNIST, real dvc), copied per test.

- Every kind of stage (data: pairs; training: cv@pair; evaluate; findings; figures), given a truncated
  or garbage input under `dvc repro -s`, ends with one line naming the failure, the file and the command
  that fixes it, no traceback, a non-zero status, and every output byte-identical to before (DVC deleted
  them before the command; the stage puts them back from the cache, hash-checked).
- Ctrl-C (SIGINT to the process group, as a terminal sends it) and SIGTERM (to the stage) under
  `dvc repro -s cv@pair` do the same, with exit status 130 / 143; checkpoints are kept.
- Every failure ends within FAILS_WITHIN_S and leaves no process of the command alive (its session is
  empty). cv@pair fails with its trials in a process pool (``pooled``: 2 workers, 4 jobs), the case that
  once hung at exit.
- A missing data/pairs names the fix (`dvc repro pairs`), also when run by hand.
- Every JSON file the pipeline writes is strict JSON, on a grid with one value per switch (TINY), where
  the switch effects have no pairs: ``null`` with ``n`` 0, not NaN.
- `scripts/verify.py` never reports an output it did not recompute as matching, fails on a tampered
  uncommitted dvc.lock, and removes its temporary clone on every exit unless --keep.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from digitpairs.core.params import parse
from digitpairs.training.runner import make_jobs
from digitpairs.training.study import cv_trials

import pytest
import yaml

from tests.e2e import OUTPUT_DIRS, POOL_CPUS, copy_repo, dvc, finish, ran, set_params, sh, snapshot, start_dvc

pytestmark = pytest.mark.slow

FAILS_WITHIN_S = 60  # a failing stage ends within this, whatever its pool was doing (dvc's own start included)
# cv@pair with 4 trials, one job each: more jobs than the 2 workers a pool gets on POOL_CPUS CPUs
POOLED = {"train": {"engine": "loop"}, "cv": {"batch_norm": [True, False], "lr": [0.1, 0.5]}}


@pytest.fixture(scope="module")
def pooled(tiny_built, tmp_path_factory) -> Path:
    """``tiny_built`` with cv@pair rerun on POOLED params and committed (only cv@pair: the tests run it
    alone, with ``dvc repro -s``)."""
    if len(os.sched_getaffinity(0)) < POOL_CPUS:
        pytest.skip(f"a pool of 2 workers needs {POOL_CPUS} CPUs")
    repo = copy_repo(tiny_built, tmp_path_factory.mktemp("pooled") / "repo")
    set_params(repo, POOLED)
    params = parse((repo / "params.yaml").read_text())
    assert len(make_jobs(cv_trials("pair", params), "loop", 64)) == 2 * POOL_CPUS
    dvc(repo, "repro", "-s", "cv@pair")
    sh(repo, "git", "add", "params.yaml", "dvc.lock")
    sh(repo, "git", "commit", "-qm", "cv@pair in a pool")
    assert sh(repo, "git", "status", "--porcelain").stdout == ""
    return repo


def copy(repo: Path, tmp_path: Path) -> Path:
    return copy_repo(repo, tmp_path / "repo")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00\x01not a safetensors file" * 10)


def head(path: Path) -> None:
    """The first 100 bytes: the safetensors header itself cut short."""
    path.write_bytes(path.read_bytes()[:100])


# stage, the input broken, how, what the one line must name (file) and suggest (command)
BROKEN = [
    ("pairs", "data/mnist/MNIST/raw/train-images-idx3-ubyte", truncate, "dvc checkout --force data/mnist"),
    ("cv@pair", "data/pairs/draw_00.safetensors", truncate, "dvc checkout --force data/pairs"),
    ("cv@pair", "data/pairs/draw_00.safetensors", head, "dvc checkout --force data/pairs"),
    ("evaluate", "models_out/models/pair/draw_00.safetensors", garbage, "dvc checkout --force models_out/models"),
    ("findings", "data/controls.csv", truncate, "dvc checkout --force data/controls.csv"),
    ("figures", "data/grad_norms.csv", truncate, "dvc checkout --force data/grad_norms.csv"),
]


@pytest.mark.parametrize("stage,broken,how,fix", BROKEN, ids=[f"{b[0]}-{b[2].__name__}" for b in BROKEN])
def test_broken_input_under_repro_single_stage_restores_every_output(request, tmp_path, stage, broken, how, fix):
    repo = copy(request.getfixturevalue("pooled" if stage == "cv@pair" else "tiny_built"), tmp_path)
    before = snapshot(repo, skip=broken)
    how(repo / broken)
    started = time.monotonic()
    proc = start_dvc(repo, "repro", "-s", stage)
    log = finish(proc, FAILS_WITHIN_S, started)
    assert proc.returncode != 0 and ran(log) == {stage}, log
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, log
    assert broken in errors[0] and fix in errors[0] and "could not restore" not in errors[0], log
    assert ".;" not in errors[0], log  # one sentence's end, then the next clause
    assert snapshot(repo, skip=broken) == before
    assert not list(repo.rglob("*.partial")), "a half-written file was left"
    git = sh(repo, "git", "status", "--porcelain").stdout
    assert git == "", git  # the git-tracked metrics (evaluate, findings) are back too


def stage_process(parent: int, name: str) -> int | None:
    """The pid of a descendant of ``parent`` whose command line holds ``name``."""
    children: dict[int, list[int]] = {}
    cmdlines = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdlines[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(proc.name))
    todo = list(children.get(parent, []))
    while todo:
        pid = todo.pop()
        if name in cmdlines.get(pid, "") and "python" in cmdlines[pid].split()[0]:
            return pid
        todo += children.get(pid, [])
    return None


def catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (the SigCgt mask of /proc/<pid>/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(mask >> (sig - 1) & 1)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_stage_under_repro_single_stage_restores_its_outputs(pooled, tmp_path, sig):
    """Ctrl-C reaches the whole foreground process group (DVC ignores it while its command runs);
    SIGTERM goes to the stage alone, as a job manager's `kill` would. Both end the stage with one
    `interrupted` line, exit status 128 + signal, outputs restored, checkpoints kept, its pool gone."""
    repo = copy(pooled, tmp_path)
    before = snapshot(repo)
    ckpt = repo / "data/checkpoints/cv-pair.jsonl"
    kept = ckpt.read_bytes()
    params = (repo / "params.yaml").read_text()
    set_params(repo, {"train": {"epochs": 3000}})  # long enough to be interrupted mid-training
    # DVC runs the command through $SHELL, else /bin/sh. bash execs a lone command, so DVC sees the
    # stage's own status; dash (Debian's /bin/sh) stays in between, dies of the Ctrl-C itself and DVC
    # reports -2 (the stage still restores its outputs: asserted below either way).
    proc = start_dvc(repo, "repro", "-s", "cv@pair", SHELL=shutil.which("bash"))
    log = []
    for line in proc.stdout:
        log.append(line)
        if "cv@pair: resumed" in line:  # the stage is in its main(), training
            break
    time.sleep(1.0)  # the pool's workers are starting, or training
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        pid = stage_process(proc.pid, "stages.cv")
        assert pid, "".join(log)
        os.kill(pid, sig)
    text = "".join(log) + finish(proc, FAILS_WITHIN_S, time.monotonic())
    assert proc.returncode != 0, text
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "cv@pair" in lines[0] and "dvc repro" in lines[0], text
    assert "could not restore" not in lines[0], text
    assert f"exited with {128 + sig}" in text, text
    (repo / "params.yaml").write_text(params)
    assert snapshot(repo) == before
    assert ckpt.read_bytes().startswith(kept)  # checkpoints kept (and only ever appended to)
    assert not list(repo.rglob("*.partial"))


def test_sigterm_while_the_stage_is_still_importing_restores_too(tiny_built, tmp_path):
    """The first second of a stage is Python importing torch and pandas: a signal then is noted
    (stages/__init__.py) and acted on as soon as run_stage starts, not a traceback from an import."""
    repo = copy(tiny_built, tmp_path)
    before = snapshot(repo)
    proc = start_dvc(repo, "repro", "-f", "-s", "evaluate")
    pid, deadline = None, time.monotonic() + 60
    while pid is None and proc.poll() is None and time.monotonic() < deadline:
        pid = stage_process(proc.pid, "stages.evaluate")
        time.sleep(0.02)
    assert pid, "the stage never started"
    while not catches(pid, signal.SIGTERM) and time.monotonic() < deadline:  # stages/__init__.py ran
        time.sleep(0.005)
    os.kill(pid, signal.SIGTERM)
    out = finish(proc, FAILS_WITHIN_S, time.monotonic())
    assert proc.returncode != 0 and "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and lines[0].startswith("interrupted (SIGTERM): evaluate: "), out
    assert "exited with 143" in out, out
    assert snapshot(repo) == before
    assert sh(repo, "git", "status", "--porcelain").stdout == ""  # metrics.json (git-tracked) back too


def one_error(log: str) -> str:
    """The one `error:` line of a failed command's output, which must hold no traceback."""
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, log
    return errors[0]


ADDRESS_SPACE_KIB = 1_500_000  # `ulimit -v` too small to map torch's library, enough for Python, DVC and pandas


@pytest.mark.parametrize("cause", ["missing module", "ulimit -v"])
def test_a_stage_that_fails_while_importing_ends_with_one_line_and_loses_nothing(tiny_built, tmp_path, cause):
    """Before run_stage takes over, the stage imports torch: a missing module (a shadowing package on
    PYTHONPATH, as a broken install leaves one) or an address-space limit (real: `ulimit -v` around dvc) fails
    there. One line naming the cause, exit status 1, every output byte-identical."""
    repo = copy(tiny_built, tmp_path)
    before = snapshot(repo)
    extra, limit, said = {}, 0, "ModuleNotFoundError: No module named 'torch'"
    if cause == "missing module":
        (tmp_path / "shadow" / "torch").mkdir(parents=True)
        (tmp_path / "shadow" / "torch" / "__init__.py").write_text(
            "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
        )
        extra["PYTHONPATH"] = str(tmp_path / "shadow")
    else:
        limit, said = ADDRESS_SPACE_KIB, f"(`ulimit -v {ADDRESS_SPACE_KIB}`), too little for it: raise the limit"
    started = time.monotonic()
    proc = start_dvc(repo, "repro", "-f", "-s", "evaluate", limit_kib=limit, **extra)
    log = finish(proc, FAILS_WITHIN_S, started)
    print(f"\n{cause}: `dvc repro -s evaluate` failed in {time.monotonic() - started:.1f} s")
    assert proc.returncode != 0 and ran(log) == {"evaluate"}, log
    line = one_error(log)
    assert line.startswith("error: evaluate failed: ") and said in line, line
    assert "exited with 1" in log and "could not restore" not in line, log
    assert snapshot(repo) == before
    assert sh(repo, "git", "status", "--porcelain").stdout == ""


def test_uncached_outputs_survive_a_failed_stage_in_an_uncommitted_workspace(tiny_built, tmp_path):
    """After `dvc repro` with changed params, not committed, the metrics (cache: false) exist nowhere but in the
    workspace: not in DVC's cache, not in git HEAD (which has the committed run's). A corrupt model under
    `dvc repro -s evaluate` must leave them as they are (dvc.yaml persists them) and name no fix that fails."""
    repo = copy(tiny_built, tmp_path)
    set_params(repo, {"recipe": {"tta": 1}})  # siamese-plus's scores change, so do metrics.json and test_accuracy.json
    dvc(repo, "repro", "-s", "evaluate")  # the one stage: the others that read recipe.tta would retrain
    metrics = ("models_out/metrics.json", "models_out/test_accuracy.json")
    changed = sh(repo, "git", "status", "--porcelain").stdout
    assert all(m in changed for m in metrics), changed  # the workspace's run is not git HEAD's
    before = snapshot(repo, skip="models_out/models/pair/draw_00.safetensors")
    garbage(repo / "models_out/models/pair/draw_00.safetensors")
    started = time.monotonic()
    proc = start_dvc(repo, "repro", "-s", "evaluate")
    log = finish(proc, FAILS_WITHIN_S, started)
    assert proc.returncode != 0 and ran(log) == {"evaluate"}, log
    line = one_error(log)
    assert "dvc checkout --force models_out/models" in line and "could not restore" not in line, line
    assert snapshot(repo, skip="models_out/models/pair/draw_00.safetensors") == before
    assert sh(repo, "git", "status", "--porcelain").stdout == changed


class SilentListener:
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte (a wrong service, a
    stopped head, a proxy); it records where each connection came from."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.peers: list[str] = []
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:  # closed
                return
            self.open.append(conn)
            self.peers.append(peer[0])

    def close(self) -> None:
        for conn in [self.sock, *self.open]:
            conn.close()


@pytest.mark.system  # with the other Ray tests
def test_a_ray_address_that_accepts_and_never_answers_ends_with_one_line(tiny_built, tmp_path):
    """Ray alone waits for ever on such an address (a warning every 30 s). The stage gives up after
    ANSWER_TIMEOUT_S with one line naming the address and the fix, puts its outputs back, and only ever
    connected to the address as given, on loopback."""
    from digitpairs.training.ray_executor import ANSWER_TIMEOUT_S

    repo = copy(tiny_built, tmp_path)
    before = snapshot(repo)
    set_params(repo, {"cv": {"executor": "ray"}})
    (repo / "data/checkpoints/cv-pair.jsonl").unlink()  # else every trial resumes and Ray is never needed
    listener = SilentListener()
    address = f"127.0.0.1:{listener.port}"
    try:
        started = time.monotonic()
        proc = start_dvc(repo, "repro", "-s", "cv@pair", RAY_ADDRESS=address)
        log = finish(proc, FAILS_WITHIN_S, started)
        seconds = time.monotonic() - started
    finally:
        listener.close()
    print(f"\nsilent Ray address: `dvc repro -s cv@pair` failed in {seconds:.1f} s")
    assert proc.returncode != 0 and ran(log) == {"cv@pair"}, log
    assert seconds >= ANSWER_TIMEOUT_S, log
    line = one_error(log)
    said = f"error: RAY_ADDRESS={address}: {address} accepts connections but nothing there answers as a Ray head"
    assert line.startswith(said), line
    assert "unset RAY_ADDRESS" in line and "could not restore" not in line, line
    assert listener.peers and set(listener.peers) == {"127.0.0.1"}, listener.peers
    assert snapshot(repo) == before


def test_missing_pair_draws_name_the_fix(tiny_built, tmp_path):
    """Run by hand, outside DVC: the checkpoint key used to read the draw before load_draw could say
    what to do; now the first read says it."""
    repo = copy(tiny_built, tmp_path)
    shutil.move(repo / "data/pairs", tmp_path / "pairs-away")
    cp = sh(repo, sys.executable, "-m", "stages.cv", "pair", check=False)
    assert cp.returncode == 1, cp.stderr
    assert "Traceback" not in cp.stderr, cp.stderr
    errors = [line for line in cp.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: pair draw data/pairs/draw_00.safetensors does not exist; run `dvc repro pairs` first."], (
        cp.stderr
    )


class NotStrict(ValueError):
    pass


def strict(text: str):
    def refuse(constant: str):
        raise NotStrict(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_every_json_written_is_strict_and_an_effect_without_pairs_is_null(tiny_built):
    """TINY's grid has one value per switch: no on/off pairs for batch norm or skip connections."""
    written = [
        p for d in OUTPUT_DIRS for p in (tiny_built / d).rglob("*.json") if p.is_file() and "checkpoints" not in p.parts
    ]
    assert {"models_out/findings.json", "models_out/metrics.json"} <= {str(p.relative_to(tiny_built)) for p in written}
    for path in written:
        strict(path.read_text())  # raises on NaN / Infinity
    claims = strict((tiny_built / "models_out/findings.json").read_text())["claims"]
    for slug in ("batch_norm_pair", "skip_siamese-10"):
        assert claims[slug]["n"] == 0 and claims[slug]["mean"] is None, claims[slug]
    with pytest.raises(ValueError, match="NaN"):
        from digitpairs.core.io import write_json

        write_json({"mean": float("nan")}, tiny_built.parent / "refused.json")
    assert not (tiny_built.parent / "refused.json").exists()


def verify(repo: Path, tmpdir: Path, *args: str) -> subprocess.CompletedProcess:
    tmpdir.mkdir(exist_ok=True)
    return sh(repo, sys.executable, str(repo / "scripts/verify.py"), *args, check=False, TMPDIR=str(tmpdir))


def clones(tmpdir: Path) -> list[Path]:
    """verify's temporary folders (other programs, torch's compiler cache, may write there too)."""
    return list(tmpdir.glob("digitpairs-verify-*"))


@pytest.mark.system  # with the other tests of `make verify` (tests/test_verify.py)
def test_verify_quick_reports_what_it_did_not_recompute_and_a_tampered_uncommitted_lock(tiny_built, tmp_path):
    repo = copy(tiny_built, tmp_path)
    lock_path = repo / "dvc.lock"
    lock = yaml.safe_load(lock_path.read_text())
    lock["stages"]["pairs"]["outs"][0]["md5"] = "0" * 32 + ".dir"
    lock_path.write_text(yaml.safe_dump(lock, sort_keys=False))  # left uncommitted
    tmpdir = tmp_path / "tmp"
    cp = verify(repo, tmpdir, "--quick")
    out = cp.stdout
    assert cp.returncode == 1, out + cp.stderr
    assert re.search(r"^match +data/pairs \(pairs\)", out, re.M), out  # the commit's entry is right
    for path in ("models_out/metrics.json", "models_out/models", "data/cv/pair.csv", "plots"):
        assert re.search(rf"^not recomputed +{re.escape(path)} \(", out, re.M), out
    assert not re.search(r"^match +(models_out|data/cv|plots)", out, re.M), out
    assert not re.search(r"^all \d+ outputs match", out, re.M), out
    assert re.search(r"^3 of \d+ outputs recomputed: 3 match, 0 differ, \d+ not recomputed", out, re.M), out
    assert "not verified: the working tree's dvc.lock differs from the commit for 1 output(s) (data/pairs)" in out
    assert not clones(tmpdir), "the temporary clone was left behind"


def test_verify_removes_its_clone_on_failure_unless_kept(tiny_built, tmp_path):
    tmpdir = tmp_path / "tmp"
    cp = verify(tiny_built, tmpdir, "no-such-stage")
    assert cp.returncode == 1, cp.stdout + cp.stderr
    assert "removed; --keep keeps it" in cp.stderr, cp.stderr
    assert not clones(tmpdir)
    cp = verify(tiny_built, tmpdir, "--keep", "no-such-stage")
    assert cp.returncode == 1, cp.stdout + cp.stderr
    kept = re.search(r"clone kept in (\S+)", cp.stderr)
    assert kept and Path(kept.group(1)).is_dir(), cp.stderr
    shutil.rmtree(Path(kept.group(1)).parent)
