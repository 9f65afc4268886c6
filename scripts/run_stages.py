"""Run the pipeline without DVC, for a machine that has none (our GPU machine: its own Python and
torch, no DVC, no network): each stage's ``cmd`` from dvc.yaml, in dependency order, in this
repository, after removing the stage's outputs as ``dvc repro`` does. Nothing is cached and no
dvc.lock is written: every stage runs, and the training stages resume from their checkpoints.
The outputs are the bytes ``dvc repro`` writes (tests/test_run_stages.py).

    python scripts/run_stages.py [STAGE ...]     # every stage, or only these (as named by dvc.yaml)

Params come from params.yaml: edit it (or copy one in) first, as ``dvc exp run -S`` would. The stages
import two of DVC's packages (``dvc`` reads params.yaml as DVC does, ``dvclive`` logs the training
curves); where this Python lacks them, ``make gpu-wheels`` (on a machine with DVC and a package index)
puts them with their dependencies in ``.gpu-wheels/``, and this script unpacks there what is missing.
"""

from __future__ import annotations

import graphlib
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from importlib.util import find_spec
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".gpu-wheels"  # `make gpu-wheels`: DVC and dvclive with every dependency, as wheels
NEEDED = ("dvc", "dvclive")


def bring_dvc(wheels: Path = WHEELS, needed: tuple[str, ...] = NEEDED) -> None:
    """Make ``dvc`` and ``dvclive`` importable by the stages where this Python lacks them: every wheel of
    ``wheels`` whose packages are missing here is unpacked (a wheel is a zip of its installed files) into
    ``wheels/site``, which goes on PYTHONPATH; a package this Python has is never shadowed."""
    if all(find_spec(m) for m in needed):
        return
    if not any(wheels.glob("*.whl")):
        raise SystemExit(
            f"error: this Python has no {' or '.join(needed)}, which the stages import, and {wheels} holds no "
            "wheels: run `make gpu-wheels` on a machine with DVC and bring the folder along"
        )
    site = wheels / "site"
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            tops = {
                n.split("/")[0].split(".")[0]
                for n in z.namelist()
                if not n.split("/")[0].endswith((".dist-info", ".data"))
            }
            if not all(find_spec(t) for t in tops):
                z.extractall(site)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))


def paths(entries: list) -> list[str]:
    """dvc.yaml's dependency or output entries, ``path`` or ``{path: options}``, as paths."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


def expand(name: str, stage: dict) -> dict[str, dict]:
    """The stage, or one per value of its one-key ``matrix``, named ``name@value`` as DVC names them."""
    if "matrix" not in stage:
        return {name: stage}
    ((key, values),) = stage["matrix"].items()
    text = yaml.safe_dump({k: v for k, v in stage.items() if k != "matrix"})
    return {f"{name}@{v}": yaml.safe_load(text.replace(f"${{item.{key}}}", str(v))) for v in values}


def outputs(stage: dict) -> list[str]:
    return paths(stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []))


def removed(stage: dict) -> list[str]:
    """The outputs ``dvc repro`` deletes before the stage's command: all but those marked ``persist: true``."""
    entries = stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", [])
    return [e for e in paths(entries) if not any(isinstance(x, dict) and x.get(e, {}).get("persist") for x in entries)]


def ordered(root: Path = ROOT) -> dict[str, dict]:
    """Every stage of ``root``/dvc.yaml, each after the stages whose outputs it depends on."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    stages = {n: s for name, stage in spec.items() for n, s in expand(name, stage).items()}
    maker = {out: name for name, s in stages.items() for out in outputs(s)}
    after = {
        name: {maker[o] for d in paths(s.get("deps", [])) for o in maker if d == o or d.startswith(o + "/")}
        for name, s in stages.items()
    }
    return {name: stages[name] for name in graphlib.TopologicalSorter(after).static_order()}


def run(names: list[str], root: Path = ROOT) -> None:
    """Run ``names`` (every stage when empty) in dependency order; stop at the first that fails."""
    bring_dvc()
    stages = ordered(root)
    unknown = sorted(set(names) - set(stages))
    if unknown:
        raise SystemExit(f"error: no stage {', '.join(unknown)} in dvc.yaml; stages: {', '.join(stages)}")
    for name, stage in stages.items():
        if names and name not in names:
            continue
        for out in removed(stage):
            if (root / out).is_dir():
                shutil.rmtree(root / out)
            else:
                (root / out).unlink(missing_ok=True)
        print(f"Running stage '{name}':\n> {stage['cmd']}", flush=True)
        # dvc.yaml says `python`: this interpreter runs it, exec'ed by the shell, so the stage is this
        # process's child (a signal to it stops the stage, which keeps its checkpoint: full_grid.py)
        program, _, rest = stage["cmd"].partition(" ")
        cmd = f"exec {shlex.quote(sys.executable)} {rest}" if program == "python" else stage["cmd"]
        status = subprocess.run(cmd, shell=True, cwd=root).returncode
        if status:
            raise SystemExit(f"error: stage {name} failed (exit status {status}); fix it and rerun this command")


if __name__ == "__main__":
    run(sys.argv[1:])
