"""What the pipeline refuses, on a tiny finished run in a temporary git+DVC clone (real MNIST, real dvc).

- Every key of params.yaml, given a value some stage would reject, stops `dvc repro` with a message
  naming the key, and no output file changes (hashed before and after). `dvc repro -s <stage>`, which
  skips check_params, stops too and leaves the outputs as they were.
- A stage imports this checkout's digitpairs, never a decoy first on PYTHONPATH.
- A `dvc exp run --temp` experiment (a temporary copy under .dvc/tmp/exps, as a queued one) runs the
  experiment's changed code, and finds MNIST through a relative MNIST_MIRROR.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import SHARED_MNIST
from tests.e2e import TINY, clone, dvc, sh

pytestmark = pytest.mark.slow

OUTPUT_DIRS = ("data", "models_out", "plots")


def snapshot(repo: Path) -> dict[str, str]:
    """md5 of every output file (checkpoints aside: they are not outputs), plus dvc.lock."""
    files = [p for d in OUTPUT_DIRS for p in (repo / d).rglob("*") if p.is_file() and "checkpoints" not in p.parts]
    files.append(repo / "dvc.lock")
    return {str(p.relative_to(repo)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(files)}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A clone with every stage run once on tiny params and the result committed."""
    repo = clone(tmp_path_factory.mktemp("guards") / "repo")
    dvc(repo, "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny run")
    return repo


PARAMS_TEXT: dict[Path, str] = {}


def with_value(repo: Path, key: str, value: str) -> None:
    """Set ``section.key`` to the YAML text ``value`` in the clone's params.yaml (a text edit, so YAML
    spellings such as .inf or yes reach DVC and the stages as written)."""
    from digitpairs.core.params import parse

    section, name = key.split(".")
    text = PARAMS_TEXT.setdefault(repo, (repo / "params.yaml").read_text())
    params = parse(text)
    params[section][name] = "BAD_VALUE_HERE"
    edited = yaml.safe_dump(params, sort_keys=False).replace("BAD_VALUE_HERE", value)
    (repo / "params.yaml").write_text(edited)


def reset(repo: Path) -> None:
    (repo / "params.yaml").write_text(PARAMS_TEXT[repo])


# One row per key: a value that some stage would reject (TINY: data.n_draws 2, n_pairs 1000).
BAD = [
    ("data.seed", "-1"),
    ("data.n_draws", "0"),
    ("data.n_pairs", "6000"),  # the test split holds 10000 images: at most 5000 pairs
    ("train.seed", "1.5"),
    ("train.epochs", "0"),
    ("train.batch_size", "999"),  # a last mini-batch of 1 pair: batch norm cannot train on it
    ("train.shuffle", "yes"),  # YAML 1.2: a string
    ("train.relu_logits", "1"),
    ("train.engine", "jax"),
    ("train.device", "cuda" if not os.environ.get("CUDA_VISIBLE_DEVICES") else "auto"),
    ("train.executor", "dask"),
    ("cv.seed", "-3"),
    ("cv.n_draws", "3"),  # more than data.n_draws
    ("cv.score_on", "train"),
    ("cv.executor", "slurm"),
    ("cv.nbch1", "[0]"),
    ("cv.nbch2", "[8.5]"),
    ("cv.nbfch", "[100000]"),
    ("cv.batch_norm", "[on]"),
    ("cv.skip_connections", "[true, true]"),
    ("cv.lr", "[1, 1.0]"),  # the same learning rate twice
    ("cv.lr", "[.inf]"),
    ("loss_weights.seed", "x"),
    ("loss_weights.n_draws", "5"),
    ("loss_weights.exponents", "[0, 400]"),  # 10**400 overflows
    ("loss_weights.include_zero", "no"),
    ("loss_weights.score_on", "best"),
    ("loss_weights.executor", "remote"),
    ("grad_norms.seed", "-1"),
    ("grad_norms.draw", "2"),  # draws are 0 and 1
    ("recipe.momentum", "1"),  # SGD diverges: must be < 1
    ("recipe.schedule", "step"),
    ("recipe.shift", "7"),  # more than half a digit
    ("recipe.batch_size", "999"),
    ("figures.dpi", "20000"),  # would exhaust memory
    ("figures.error_bars", "sem"),
]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("key,value", BAD, ids=[f"{k}={v}" for k, v in BAD])
def test_bad_value_stops_repro_and_changes_no_output(repo, key, value):
    if key == "train.device":
        value = "auto" if _cuda() else "cuda"
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


def ran(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", log))


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
        ("digitpairs/training/train.py", TRAINING),
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
