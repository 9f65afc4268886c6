"""The DVC pipeline end to end, in a temporary clone, on real MNIST and tiny params (the shared tiny
pipeline: conftest's ``tiny_built``, copied as ``tiny_repo`` where a test changes it)."""

from __future__ import annotations

import json
import sys

from digitpairs.report.findings import CLAIMS as FINDINGS

import pandas as pd
import pytest
import yaml

from tests.e2e import build_log, build_status, dvc, ran, set_params, sh

pytestmark = pytest.mark.slow

STAGES = [
    "check_params",
    "mnist",
    "pairs",
    "cv@pair",
    "cv@siamese",
    "loss_weights",
    "grad_norms",
    "recipe",
    "controls",
    "train",
    "evaluate",
    "findings",
    "figures",
]
# stages that read no train.seed: editing it must not rerun them
UPSTREAM_OF_TRAIN = {"mnist", "pairs", "cv@pair", "cv@siamese", "loss_weights", "grad_norms", "recipe"}


def test_repro_runs_every_stage_and_writes_every_output(tiny_built):
    repo, log = tiny_built, build_log(tiny_built)  # the first `dvc repro` of a fresh clone
    assert ran(log) == set(STAGES), log
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    for name, stage in dvc_yaml["stages"].items():
        for out in stage.get("outs", []) + stage.get("metrics", []):
            out = out if isinstance(out, str) else next(iter(out))
            for arch in ("pair", "siamese"):
                path = repo / out.replace("${item.arch}", arch)
                assert path.exists(), f"{name}: {path} missing"
    metrics = json.loads((repo / "models_out/metrics.json").read_text())
    assert set(metrics) == {"pair", "siamese-2", "siamese-10", "siamese-plus"}
    for m in metrics.values():
        assert (
            0.4 < m["accuracy_mean"] <= 1
            and m["n_draws"] == 2
            and m["ci95_low"] <= m["accuracy_mean"] <= m["ci95_high"]
        )
        assert m["config"]["lr"] in (0.1, 0.5)
    cv = pd.read_csv(repo / "data/cv/siamese.csv")
    assert len(cv) == 2 * 2 * 1 and set(cv["variant"]) == {"siamese-2", "siamese-10"}
    assert len(list((repo / "models_out/models").glob("*/draw_*.safetensors"))) == 4 * 2
    findings = json.loads((repo / "models_out/findings.json").read_text())
    assert set(findings["claims"]) == set(FINDINGS) and findings["ablation"]["all additions"]["change_n"] == 1
    # every generated file is git-ignored (DVC wrote the entries), except what is meant for git
    status = build_status(repo)  # `git status --porcelain --untracked-files=all` right after that repro
    untracked = {line[3:] for line in status.splitlines() if not line.endswith(".gitignore")}
    in_git = {"models_out/metrics.json", "models_out/test_accuracy.json", "models_out/findings.json"}
    assert untracked <= {"dvc.lock", "docs/figures/findings.png", *in_git}, untracked


def test_second_repro_does_nothing(tiny_repo):
    repo = tiny_repo
    log = dvc(repo, "repro").stdout
    assert ran(log) == set(), log
    assert "up to date" in dvc(repo, "status").stdout


def test_editing_a_train_value_reruns_only_what_it_invalidates(tiny_repo):
    repo = tiny_repo  # the first run is committed
    set_params(repo, {"train": {"seed": 7}})
    status = dvc(repo, "status", "--json").stdout
    changed = set(json.loads(status))
    assert {"train"} <= changed and not changed & UPSTREAM_OF_TRAIN
    diff = dvc(repo, "params", "diff").stdout
    assert "train.seed" in diff and "7" in diff
    log = dvc(repo, "repro").stdout
    assert {"train", "evaluate"} <= ran(log)
    assert not ran(log) & UPSTREAM_OF_TRAIN
    assert "models_out/test_accuracy.json" in dvc(repo, "metrics", "diff", "--all").stdout
    detail = dvc(repo, "metrics", "diff", "--all", "--targets", "models_out/metrics.json").stdout
    assert "models_out/metrics.json" in detail and "accuracy_std" in detail


def test_native_numerics_rerun_the_computing_stages_without_the_pins(tiny_repo):
    """train.numerics: native reruns every stage that computes, in processes without the pins (from a
    shell that holds them: this test's), on keys of their own: no portable checkpoint is reused."""
    repo = tiny_repo
    set_params(repo, {"train": {"numerics": "native"}})
    changed = set(json.loads(dvc(repo, "status", "--json").stdout))
    computing = {"cv@pair", "cv@siamese", "loss_weights", "grad_norms", "recipe", "controls", "train", "evaluate"}
    assert computing <= changed and not changed & {"mnist", "pairs", "findings", "figures"}, changed
    assert "train.numerics" in dvc(repo, "params", "diff").stdout
    probe = (
        "import stages, json, os; "
        "from digitpairs.core import numerics as n; print(json.dumps([dict(os.environ), n.backend()]))"
    )
    seen, products = json.loads(sh(repo, sys.executable, "-c", probe).stdout)
    assert seen["DIGITPAIRS_UNPINNED"] == "1" and products == "mkl"
    assert not {"MKL_CBWR", "ATEN_CPU_CAPABILITY", "OPENBLAS_CORETYPE"} & set(seen)
    assert (repo / "data/checkpoints/cv-pair.jsonl").stat().st_size  # the portable run's trials
    cp = dvc(repo, "repro", "cv@pair")
    assert "cv@pair" in ran(cp.stdout) and "cv@pair: resumed 0 of" in cp.stderr, cp.stdout + cp.stderr


def test_bad_param_stops_before_work_and_keeps_outputs(tiny_repo):
    repo = tiny_repo
    before = (repo / "data/cv/pair.csv").read_bytes()
    set_params(repo, {"cv": {"lr": [0.1, -1.0]}})
    cp = dvc(repo, "repro", check=False)
    assert cp.returncode != 0
    assert "cv.lr[1] must be > 0" in cp.stdout + cp.stderr
    assert (repo / "data/cv/pair.csv").read_bytes() == before


def test_every_draw_cross_validated_runs_to_the_findings(tiny_repo):
    """The original's draw layout (cv.n_draws = data.n_draws, as the full grid sets it): no draw is left
    for the test-selected controls, and the findings leave each draw out instead."""
    repo = tiny_repo
    set_params(repo, {"cv": {"n_draws": 2}})
    log = dvc(repo, "repro").stdout
    assert {"cv@pair", "controls", "findings"} <= ran(log), log
    controls = pd.read_csv(repo / "data/controls.csv")
    assert set(controls["kind"]) == {"no_aux"}
    claims = json.loads((repo / "models_out/findings.json").read_text())["claims"]
    assert all(claims[f"test_selection_{v}"]["n"] == 2 for v in ("pair", "siamese-2", "siamese-10"))
