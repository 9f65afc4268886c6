"""What the pipeline refuses, on a tiny finished run in a temporary git+DVC clone (real MNIST, real dvc).

- A key of params.yaml given a value some stage would reject stops `dvc repro` with a message naming the
  key, and no output file changes (hashed before and after): four representative values here, through
  DVC (every one stops in check_params, the first stage); every key's bad value is checked in-process by
  tests/test_params.py
  (``test_every_bad_value_names_its_key``, the same table, on the same tiny params). `dvc repro -s
  <stage>`, which skips check_params, stops too and leaves the outputs as they were.
- A run whose outputs may not fit in the DVC cache's filesystem (a small tmpfs in a private mount
  namespace) is refused by check_params, with the numbers, before any stage runs.
- A stage imports this checkout's digitpairs, never a decoy first on PYTHONPATH.
- A `dvc exp run --temp` experiment (a temporary copy under .dvc/tmp/exps, as a queued one) runs the
  experiment's changed code, and finds MNIST through a relative MNIST_MIRROR.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from digitpairs.core.params import parse
from digitpairs.core.space import needed

import pytest

from tests.conftest import SHARED_MNIST
from tests.e2e import TINY, copy_repo, dvc, edited_text, env, ran, set_params, sh, snapshot
from tests.test_params import BAD

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_built) -> Path:
    """A clone with every stage run once on tiny params and the result committed: a copy of the shared
    tiny pipeline, for this module's tests (each puts back what it changes)."""
    return copy_repo(tiny_built, tmp_path_factory.mktemp("guards") / "repo")


PARAMS_TEXT: dict[Path, str] = {}


def with_value(repo: Path, key: str, value: str) -> None:
    """Set ``section.key`` to the YAML text ``value`` in the clone's params.yaml (a text edit, so YAML
    spellings such as .inf or yes reach DVC and the stages as written)."""
    text = PARAMS_TEXT.setdefault(repo, (repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(edited_text(text, key, value))


def reset(repo: Path) -> None:
    (repo / "params.yaml").write_text(PARAMS_TEXT[repo])


# Through DVC, four bad values, all stopped by check_params (the same path for any key): a YAML 1.2
# spelling that DVC and the stage must read alike, a bound from the real MNIST files, a bound from another
# key, a run's cost beyond limits.training_epochs. Every row of BAD is checked in-process by
# tests/test_params.py; every `-s` path below.
THROUGH_DVC = {
    "train.shuffle": "yes",
    "data.n_pairs": "6000",
    "grad_norms.draw": "2",
    "train.epochs": "1000000000",
}
DVC_CASES = [(k, v) for k, v in BAD if THROUGH_DVC.get(k) == v]
assert len(DVC_CASES) == len(THROUGH_DVC), "each representative is a row of tests/test_params.py's BAD"


@pytest.mark.parametrize("key,value", DVC_CASES, ids=[f"{k}={v}" for k, v in DVC_CASES])
def test_bad_value_stops_repro_and_changes_no_output(repo, key, value):
    before = snapshot(repo)
    with_value(repo, key, value)
    try:
        cp = dvc(repo, "repro", check=False)
    finally:
        reset(repo)
    log = cp.stdout + cp.stderr
    assert cp.returncode != 0, log
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and key in errors[0], log
    assert "Traceback" not in log, log
    assert ran(log) == {"check_params"}, log
    assert snapshot(repo) == before


@pytest.mark.parametrize(
    "stage,key,value",
    [
        ("cv@pair", "cv.lr", "[.inf]"),
        ("loss_weights", "loss_weights.exponents", "[0, 400]"),
        ("figures", "figures.dpi", "20000"),
        ("pairs", "data.n_pairs", "6000"),
        ("evaluate", "data.n_draws", "0"),  # metrics.json is uncached (in git): restored from HEAD
        ("check_params", "cv.lr", "[1e400]"),  # YAML 1.2 reads 1e400 as an infinite float
    ],
)
def test_repro_single_stage_stops_and_keeps_outputs(repo, stage, key, value):
    """`dvc repro -s` skips check_params and DVC deletes the stage's outputs before its command
    starts; the stage refuses the value first thing and puts its outputs back from the cache."""
    before = snapshot(repo)
    with_value(repo, key, value)
    try:
        cp = dvc(repo, "repro", "-s", stage, check=False)
    finally:
        reset(repo)
    log = cp.stdout + cp.stderr
    assert cp.returncode != 0 and ran(log) == {stage}, log
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and key in errors[0] and "could not restore" not in errors[0], log
    assert snapshot(repo) == before
    assert "up to date" in dvc(repo, "status").stdout


def in_mount_namespace(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """``script`` (bash) in a private mount namespace (``unshare -rm``: no root needed where user namespaces
    are allowed): what it mounts is gone when it ends. Skips the test where the machine cannot."""
    unshare = shutil.which("unshare")
    if not unshare or subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no private mount namespace here (unshare -rm): the tmpfs test cannot run")
    return subprocess.run([unshare, "-rm", "bash", "-euc", script], cwd=cwd, env=env(), capture_output=True, text=True)


def test_a_cache_without_room_for_the_run_is_refused_before_any_stage(tiny_repo):
    """The DVC cache on a tmpfs with half the room the run can need (the outputs' sizes in dvc.lock): a
    params change reruns check_params, which refuses with both numbers and the fix; nothing changes."""
    repo = tiny_repo
    need = needed(parse((repo / "dvc.lock").read_text())["stages"])
    cache_bytes = sum(f.stat().st_size for f in (repo / ".dvc/cache").rglob("*") if f.is_file())
    before = snapshot(repo)
    set_params(repo, {"train": {"epochs": 2}})
    (repo / ".dvc/cache").rename(repo / ".dvc/cache.disk")
    (repo / ".dvc/cache").mkdir()
    try:
        cp = in_mount_namespace(
            f"""mount -t tmpfs -o size={cache_bytes + need + 2**24} tmpfs .dvc/cache
            cp -a .dvc/cache.disk/. .dvc/cache/
            free=$(df -B1 --output=avail .dvc/cache | tail -1)
            head -c $((free - {need // 2})) /dev/zero > .dvc/cache/filler  # leaves half of what is needed
            {Path(sys.executable).parent / "dvc"} repro""",
            repo,
        )
    finally:
        (repo / ".dvc/cache").rmdir()
        (repo / ".dvc/cache.disk").rename(repo / ".dvc/cache")
    log = cp.stdout + cp.stderr
    assert cp.returncode != 0 and ran(log) == {"check_params"}, log
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, log
    numbers = re.search(r"has ([\d.,]+) MB free .* can need ([\d.,]+) MB", errors[0]).groups()
    free, can_need = (float(n.replace(",", "")) for n in numbers)
    assert free < can_need == round(need / 1e6, 1), errors[0]
    assert "the DVC cache (.dvc/cache)" in errors[0] and "`dvc cache dir PATH`" in errors[0], errors[0]
    set_params(repo, {"train": {"epochs": TINY["train"]["epochs"]}})
    assert snapshot(repo) == before


def test_stage_imports_this_checkout_not_a_decoy_first_on_pythonpath(repo, tmp_path):
    """A `digitpairs` package first on PYTHONPATH (as another clone's would be) is never imported."""
    decoy = tmp_path / "decoy" / "digitpairs"
    decoy.mkdir(parents=True)
    marker = tmp_path / "decoy-imported"
    (decoy / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('yes')\nraise SystemExit('decoy')\n")
    before = snapshot(repo)
    cp = dvc(repo, "repro", "-f", "-s", "check_params", PYTHONPATH=str(decoy.parent))
    assert not marker.exists(), cp.stdout + cp.stderr
    assert snapshot(repo) == before


def test_temp_experiment_runs_its_own_code_and_finds_a_relative_mnist_mirror(repo, tmp_path):
    """`dvc exp run --temp` copies the repository under .dvc/tmp/exps and runs there, with the
    workspace's package installed in editable mode in this venv. The experiment changes the mnist
    stage's code (so that stage reruns and downloads MNIST again, through a mirror path relative to
    the repository root) and the changed code reports which digitpairs it imported."""
    marker = tmp_path / "imported-from"
    stage = repo / "stages/mnist.py"
    original = stage.read_text()
    stage.write_text(
        original.replace(
            'if __name__ == "__main__":',
            "import os, pathlib, digitpairs\n"
            f"pathlib.Path({str(marker)!r}).write_text(digitpairs.__file__ + '\\n' + os.getcwd())\n\n"
            'if __name__ == "__main__":',
        )
    )
    relative = os.path.relpath(SHARED_MNIST, repo)
    assert not relative.startswith("/")
    try:
        cp = dvc(repo, "exp", "run", "--temp", "-n", "codechange", MNIST_MIRROR=relative, check=False)
    finally:
        stage.write_text(original)
    log = cp.stdout + cp.stderr
    assert cp.returncode == 0, log
    assert ran(log) >= {"mnist"}, log
    imported, cwd = marker.read_text().splitlines()
    assert ".dvc/tmp/exps" in cwd, cwd  # the stage ran in the experiment's temporary copy ...
    assert Path(imported).resolve().is_relative_to(Path(cwd).resolve()), (imported, cwd)  # ... with its code
    assert "codechange" in dvc(repo, "exp", "list", "--name-only").stdout
    dvc(repo, "exp", "remove", "codechange")


def test_relative_mnist_mirror_in_the_workspace_is_taken_from_the_repository_root(repo, tmp_path):
    """The same relative mirror, run by hand from a sub-folder: it still means the root's sibling."""
    data = tmp_path / "mnist-root"
    cp = sh(
        repo / "stages",
        sys.executable,
        "-c",
        f"from digitpairs.data import mnist; mnist.download({str(data)!r}); print('ok')",
        MNIST_MIRROR=os.path.relpath(SHARED_MNIST, repo),
        PYTHONPATH=str(repo),
    )
    assert cp.stdout.strip() == "ok"
    assert mnist_complete(data)


def mnist_complete(root: Path) -> bool:
    from digitpairs.data import mnist

    return mnist.is_complete(root)


def test_tiny_params_are_valid():
    """TINY is the params the end-to-end tests run on: keep it valid under the one validation."""
    import copy

    from digitpairs.core.params import parse, validate

    from tests.e2e import REPO

    p = parse((REPO / "params.yaml").read_text())
    for section, values in copy.deepcopy(TINY).items():
        p[section].update(values)
    validate(p)


TRAINING = {"cv@pair", "cv@siamese", "loss_weights", "grad_norms", "recipe", "controls", "train", "evaluate"}


@pytest.mark.parametrize(
    "path,expected",
    [
        ("digitpairs/report/figures.py", {"findings", "figures"}),  # one folder: report
        ("digitpairs/training/semantics.py", TRAINING),
        ("digitpairs/training/lockstep.py", TRAINING),
    ],
)
def test_a_code_change_invalidates_exactly_the_stages_that_run_it(repo, path, expected):
    """`dvc status` after editing one source file: the figure code reruns only figures; the training
    code reruns the training stages (and evaluate, which loads the models with it), nothing upstream.
    A byte-code cache written beside the code changes nothing (.dvcignore)."""
    import json

    source = repo / path
    original = source.read_text()
    cache = repo / "digitpairs" / "__pycache__" / "stray.cpython-311.pyc"
    cache.parent.mkdir(exist_ok=True)
    cache.write_bytes(b"not a dependency")
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}
    source.write_text(original + "\n# an edit\n")
    try:
        changed = set(json.loads(dvc(repo, "status", "--json").stdout))
    finally:
        source.write_text(original)
        cache.unlink()
    assert changed == expected
