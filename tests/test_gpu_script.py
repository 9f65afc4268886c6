"""`scripts/gpu_full_grid.py`, the GPU machine's procedure, run on the CPU with the tiny params of
tests/e2e.py: a first run that its budget stops, a second that resumes from the first's checkpoint archive
on a fresh copy (a machine that kept nothing) and writes the bytes `dvc repro` writes, then `publish`."""

import json
import re
import sys
import tarfile
from pathlib import Path

from digitpairs.core import numerics

import pytest

from tests.conftest import SHARED_MNIST
from tests.e2e import REPO, TINY, gpu_script_module, pipeline_outputs, sh

pytestmark = [pytest.mark.slow, pytest.mark.system]
# the tiny params as `-S KEY=VALUE` over the script's full grid (JSON is YAML), on the CPU
TINY_SETTINGS = [
    f"-S{section}.{key}={json.dumps(value)}"
    for section, values in (TINY | {"train": TINY["train"] | {"device": "cpu"}}).items()
    for key, value in values.items()
]


def gpu_script(tmp_path: Path, *args: str):
    # as a fresh shell runs it: no numeric pins from this process (the script and each stage set them)
    return sh(
        tmp_path, sys.executable, str(REPO / "scripts/gpu_full_grid.py"), *args, **dict.fromkeys(numerics.PIN_VARS, "")
    )


def archived(path: Path, name: str) -> dict:
    with tarfile.open(path) as tar:
        return json.load(tar.extractfile(name))


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)).removesuffix(".gz") for p in folder.rglob("*") if p.is_file()}


def test_stopped_by_its_budget_then_resumed_it_writes_what_dvc_repro_writes(tiny_built, tmp_path):
    common = ["--mnist", str(SHARED_MNIST), *TINY_SETTINGS]
    # a deadline 25 s after the start (the budget less the archives' reserve): past the first training
    # stage on a 2-core machine twice as slow as those measured, yet short of the whole run (43 s on a
    # 2-core Intel Xeon with AVX-512, more on a 2-core AMD EPYC)
    budget = str(gpu_script_module().RESERVE + 25)
    first = gpu_script(tmp_path, "run", "--root", str(tmp_path / "root1"), "--out", str(tmp_path / "out1"),
                       "--budget", budget, "--skip-check", *common)  # fmt: skip
    assert "budget reached" in first.stdout, first.stdout[-2000:]
    assert archived(tmp_path / "out1/results.tar.gz", "provenance.json")["complete"] is False
    with tarfile.open(tmp_path / "out1/state.tar.gz") as tar:  # the trials the first run checkpointed
        kept = sum(len(tar.extractfile(m).read().splitlines()) for m in tar.getmembers() if m.isfile())
    assert kept > 0

    second = gpu_script(tmp_path, "run", "--root", str(tmp_path / "root2"), "--out", str(tmp_path / "out2"),
                        "--resume", str(tmp_path / "out1/state.tar.gz"), *common)  # fmt: skip
    assert sum(int(n) for n in re.findall(r"resumed (\d+) of", second.stderr)) >= kept
    assert pipeline_outputs(tmp_path / "root2") == pipeline_outputs(tiny_built)
    assert archived(tmp_path / "out2/results.tar.gz", "provenance.json")["complete"] is True
    rows = archived(tmp_path / "out2/results.tar.gz", "tuning.json")["equivalence"]["1"]
    assert len(rows) == 6 and all(r["cpu_test"] == pytest.approx(r["gpu_test"], abs=0.02) for r in rows)

    dest = tmp_path / "published"
    gpu_script(tmp_path, "publish", str(tmp_path / "out1"), str(tmp_path / "out2"), "--dest", str(dest),
               "--default-cv", str(tiny_built / "data/cv"))  # fmt: skip
    assert files(dest) == files(REPO / "results/full-grid") - {"profile.txt"}  # what each run writes now
    grid = json.loads((dest / "provenance.json").read_text())["grid"]
    assert grid["complete"] and grid["trainings_finished"] == 6 and len(grid["runs"]) == 2
