"""scripts/run_stages.py, the pipeline without DVC (for the GPU machine, which has none): every stage
of dvc.yaml in dependency order, the bytes `dvc repro` writes, one clear line for an unknown stage."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from runpy import run_path

from digitpairs.core import numerics

import pytest

from tests.e2e import REPO, clone, pipeline_outputs, sh

script = run_path(str(REPO / "scripts/run_stages.py"))
ordered, outputs, paths, run = script["ordered"], script["outputs"], script["paths"], script["run"]
bring_dvc, removed = script["bring_dvc"], script["removed"]


def test_every_stage_comes_after_the_stages_it_reads():
    stages = ordered(REPO)
    assert {"cv@pair", "cv@siamese", "train", "figures"} <= set(stages)
    made_by = {out: name for name, s in stages.items() for out in outputs(s)}
    position = {name: i for i, name in enumerate(stages)}
    for name, stage in stages.items():
        for dep in paths(stage.get("deps", [])):
            if dep in made_by:
                assert position[made_by[dep]] < position[name], (dep, name)


def test_outputs_dvc_keeps_are_kept_here_too():
    """`dvc repro` deletes a stage's outputs before its command, except those dvc.yaml persists (the
    git-tracked results): so does run_stages."""
    stages = ordered(REPO)
    assert removed(stages["evaluate"]) == ["models_out/test_scores.csv", "models_out/confusion.csv"]
    assert removed(stages["figures"]) == ["plots"]
    assert removed(stages["cv@pair"]) == outputs(stages["cv@pair"])


def test_an_unknown_stage_is_named_and_nothing_runs():
    with pytest.raises(SystemExit, match=r"no stage cv@nope in dvc.yaml; stages: check_params, "):
        run(["cv@nope"], REPO)


def wheel(folder, name: str, package: str) -> None:
    """A wheel as pip builds one: the package's files and its .dist-info, in a zip."""
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as z:
        z.writestr(f"{package}/__init__.py", f"WHERE = {name!r}\n")
        z.writestr(f"{name}-1.0.dist-info/METADATA", f"Name: {name}\n")


def test_a_python_without_dvc_gets_the_missing_packages_from_wheels(tmp_path, monkeypatch):
    """What a missing package needs is unpacked and importable, in the stages' subprocesses too; a
    package this Python has is never shadowed; without wheels, one line says what to do."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    with pytest.raises(SystemExit, match=r"no dvc_stand_in or dvclive_stand_in, .* run `make gpu-wheels`"):
        bring_dvc(tmp_path, ("dvc_stand_in", "dvclive_stand_in"))
    wheel(tmp_path, "dvc_stand_in", "dvc_stand_in")
    wheel(tmp_path, "pyyaml", "yaml")  # present here: stays out
    bring_dvc(tmp_path, ("dvc_stand_in", "yaml"))
    assert sorted(p.name for p in (tmp_path / "site").iterdir()) == ["dvc_stand_in", "dvc_stand_in-1.0.dist-info"]
    code = f"import dvc_stand_in, yaml; print(dvc_stand_in.WHERE, yaml.__file__.startswith({str(tmp_path)!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["dvc_stand_in", "False"]


@pytest.mark.slow
@pytest.mark.system
def test_without_dvc_every_output_is_the_bytes_dvc_repro_wrote(tiny_built, tmp_path):
    repo = clone(tmp_path / "repo")  # the tiny params, no outputs
    # as a fresh shell runs it: no numeric pins from this process (each stage sets them on import)
    cp = sh(repo, sys.executable, "scripts/run_stages.py", **dict.fromkeys(numerics.PIN_VARS, ""))
    assert re.findall(r"Running stage '([^']+)'", cp.stdout) == list(ordered(repo))
    assert pipeline_outputs(repo) == pipeline_outputs(tiny_built)
