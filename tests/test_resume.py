"""A real `python -m stages.cv pair`, interrupted (Ctrl-C, SIGKILL), resumes from its checkpoint
and writes the same CSV, byte for byte, as an uninterrupted run, training only what is missing.
Ctrl-C ends the stage with one line saying what is kept and how to resume, and exit status 130.
A `dvc repro` SIGKILLed mid-stage leaves DVC's lock file behind; `make repro`'s first step
(scripts/stale_lock.py) removes it with one line, and `dvc repro` resumes."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.e2e import TINY, copy_repo, dvc, env, set_params, sh, start_dvc

pytestmark = pytest.mark.slow

GRID = {
    **TINY,
    # the loop engine records trials one by one, so a signal reliably lands mid-run (lockstep
    # records whole groups at once and can finish this small grid before the signal arrives)
    "train": {"epochs": 4, "engine": "loop"},
    "cv": {**TINY["cv"], "batch_norm": [True, False], "skip_connections": [True, False], "lr": [0.05, 0.1, 0.2, 0.5]},
}
N = 16  # pair trials in GRID
CKPT = "data/checkpoints/cv-pair.jsonl"
CSV = "data/cv/pair.csv"


def cv_pair(repo) -> tuple[str, float]:
    """Run the stage to the end; return its stderr and wall time."""
    t = time.perf_counter()
    cp = sh(repo, sys.executable, "-m", "stages.cv", "pair")
    return cp.stderr, time.perf_counter() - t


def resumed(err: str) -> tuple[int, int]:
    n, m = re.search(r"cv@pair: resumed (\d+) of (\d+) trials from data/checkpoints/cv-pair.jsonl", err).groups()
    return int(n), int(m)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_built):
    """A clone with pairs drawn, and the uninterrupted run's CSV and time: a copy of the shared tiny
    pipeline (GRID draws the same pairs: its data section is TINY's), set to GRID, without the tiny run's
    cv@pair checkpoint and CSV."""
    assert GRID["data"] == TINY["data"]
    repo = copy_repo(tiny_built, tmp_path_factory.mktemp("resume") / "repo")
    set_params(repo, GRID)
    fresh(repo)
    err, seconds = cv_pair(repo)
    assert resumed(err) == (0, N)
    return repo, (repo / CSV).read_bytes(), seconds


def fresh(repo) -> None:
    (repo / CKPT).unlink(missing_ok=True)
    (repo / CSV).unlink(missing_ok=True)


def lines(repo) -> int:
    path = repo / CKPT
    return len(path.read_text().splitlines()) if path.exists() else 0


def interrupt(repo, sig: signal.Signals, after: int) -> tuple[int, str, int]:
    """Start the stage, send ``sig`` once the checkpoint holds ``after`` lines; return the lines kept,
    the stage's stderr and its exit status. SIGINT goes to the whole process group, as a terminal's
    Ctrl-C does (the stage's worker processes included)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.cv", "pair"],
        cwd=repo,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # a shell that starts jobs in the background (as CI may) leaves SIGINT ignored, and children
        # inherit that: give the stage the default disposition, as a terminal's Ctrl-C would find it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )
    deadline = time.monotonic() + 120
    while lines(repo) < after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, "the run finished before it could be interrupted"
    assert not (repo / CSV).exists()
    kept = lines(repo)
    assert after <= kept < N
    return kept, err.decode(), proc.returncode


def test_sigint_then_sigkill_then_resume_gives_the_same_csv(repo):
    repo, reference, full = repo
    fresh(repo)
    after_int, err, status = interrupt(repo, signal.SIGINT, 2)
    # one line after the start-up line: what is kept and how to resume; no traceback, from any process
    assert status == 130, err
    assert err.strip().splitlines()[1:] == [
        f"interrupted: cv@pair: {after_int} of {N} trials are checkpointed in {CKPT}; `dvc repro` resumes from there."
    ], err
    after_kill, _, _ = interrupt(repo, signal.SIGKILL, after_int + 2)
    err, seconds = cv_pair(repo)
    done, total = resumed(err)
    assert total == N and after_kill <= done < N  # every recorded trial is reused
    assert lines(repo) == N  # and only the missing ones were trained and appended
    assert (repo / CSV).read_bytes() == reference
    print(
        f"\nresumed {done}/{N} trials (SIGINT at {after_int}, SIGKILL at {after_kill}): rerun {seconds:.1f} s, "
        f"uninterrupted {full:.1f} s"
    )


def test_a_killed_dvc_repro_leaves_a_lock_that_make_repro_removes_then_it_resumes(repo, tiny_built, tmp_path):
    """SIGKILL to `dvc repro` and its stage (a lost machine, the OOM killer) mid-stage. DVC skips a lock entry
    whose process id is gone, but not one whose id another program has taken since (after a reboot, in a
    container): a `sleep` stands for it here. DVC then refuses to start; scripts/stale_lock.py removes the lock."""
    done_repo, reference, _ = repo
    if lines(done_repo) != N:  # the uninterrupted run's checkpoint, whole
        fresh(done_repo)
        cv_pair(done_repo)
    work = copy_repo(tiny_built, tmp_path / "repo")
    set_params(work, GRID)
    fresh(work)
    first = (done_repo / CKPT).read_text().splitlines(keepends=True)[: N - 4]
    (work / CKPT).write_text("".join(first))  # 4 trials left to train: the stage is killed among them
    proc = start_dvc(work, "repro", "-s", "cv@pair")
    deadline = time.monotonic() + 120
    while lines(work) < N - 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    kept = lines(work)
    assert N - 3 <= kept < N and not (work / CSV).exists()
    rwlock = work / ".dvc/tmp/rwlock"
    other = subprocess.Popen(["sleep", "120"])
    try:
        text = rwlock.read_text()
        assert json.loads(text)["write"], text  # the killed dvc's entries
        rwlock.write_text(re.sub(r'"pid": \d+', f'"pid": {other.pid}', text))
        refused = dvc(work, "repro", "-s", "cv@pair", check=False)
        assert refused.returncode != 0 and "is busy" in refused.stderr, refused.stderr
        started = time.monotonic()
        note = sh(work, sys.executable, "scripts/stale_lock.py").stderr.strip().splitlines()
        assert len(note) == 1 and note[0].startswith("stale_lock: removed .dvc/tmp/rwlock"), note
        assert "dvc repro -s cv@pair" in note[0] and time.monotonic() - started < 60, note
    finally:
        other.kill()
        other.wait()
    cp = dvc(work, "repro", "-s", "cv@pair")
    done, total = resumed(cp.stderr + cp.stdout)
    assert total == N and kept <= done < N
    assert (work / CSV).read_bytes() == reference
    assert sh(work, sys.executable, "scripts/stale_lock.py").stderr == ""  # nothing left to say


def test_corrupt_lines_are_recomputed_and_a_new_grid_value_trains_only_its_trials(repo):
    repo, reference, _ = repo
    if lines(repo) != N:
        fresh(repo)
        cv_pair(repo)
    path = repo / CKPT
    text = path.read_text().splitlines()
    text[3] = text[3].replace('"accuracy": 0.', '"accuracy": 0.0', 1)  # checksum no longer matches
    path.write_text("\n".join(text) + "\n" + text[5][: len(text[5]) // 2])  # and a torn last line
    set_params(repo, {"cv": {"lr": GRID["cv"]["lr"] + [1.0]}})
    try:
        err, _ = cv_pair(repo)
    finally:
        set_params(repo, {"cv": GRID["cv"]})
    assert "2 corrupt or truncated checkpoint line(s) ignored" in err
    assert resumed(err) == (N - 1, N + N // 4)  # line 3 and the lr=1.0 trials are trained
    table = pd.read_csv(repo / CSV)
    old = table[table["lr"] != 1.0].reset_index(drop=True)
    pd.testing.assert_frame_equal(old, pd.read_csv(io.BytesIO(reference)), check_exact=True)
    assert len(table) == N + N // 4
