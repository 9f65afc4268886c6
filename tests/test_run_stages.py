"""scripts/run_stages.py, the pipeline without DVC (for the GPU machine, which has none): every stage
of dvc.yaml in dependency order, the bytes `dvc repro` writes, one clear line for an unknown stage."""

from __future__ import annotations

import re
import sys
from runpy import run_path

import pytest

from digitpairs.core import numerics
from tests.e2e import REPO, clone, sh, snapshot

script = run_path(str(REPO / "scripts/run_stages.py"))
ordered, outputs, paths, run = script["ordered"], script["outputs"], script["paths"], script["run"]


def test_every_stage_comes_after_the_stages_it_reads():
    stages = ordered(REPO)
    assert {"cv@pair", "cv@siamese", "train", "figures"} <= set(stages)
    made_by = {out: name for name, s in stages.items() for out in outputs(s)}
    position = {name: i for i, name in enumerate(stages)}
    for name, stage in stages.items():
        for dep in paths(stage.get("deps", [])):
            if dep in made_by:
                assert position[made_by[dep]] < position[name], (dep, name)


def test_an_unknown_stage_is_named_and_nothing_runs():
    with pytest.raises(SystemExit, match=r"no stage cv@nope in dvc.yaml; stages: check_params, "):
        run(["cv@nope"], REPO)


@pytest.mark.slow
@pytest.mark.system
def test_without_dvc_every_output_is_the_bytes_dvc_repro_wrote(tiny_built, tmp_path):
    repo = clone(tmp_path / "repo")  # the tiny params, no outputs
    # as a fresh shell runs it: no numeric pins from this process (each stage sets them on import)
    cp = sh(repo, sys.executable, "scripts/run_stages.py", **{k: "" for k in numerics.ENV_PINS})
    assert re.findall(r"Running stage '([^']+)'", cp.stdout) == list(ordered(repo))

    def outs(r):  # DVC's own files aside: dvc.lock and the .gitignore files it writes
        return {k: v for k, v in snapshot(r).items() if k != "dvc.lock" and not k.endswith(".gitignore")}

    assert outs(repo) == outs(tiny_built)
