"""The Ray executor on a real multi-node cluster: a head and two worker nodes started with
``ray start``, with token authentication, inside a network namespace whose only interface is
loopback (tests/ray_cluster.py runs there). cv@pair through RAY_ADDRESS gives the local executor's
bytes; a worker node killed mid-grid costs nothing; a killed head or a closed port stops the stage
with one line; the pins reach every node before torch loads."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from digitpairs.core import numerics

import pytest

from tests.e2e import REPO, TINY, clone, dvc, env

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.system]

# Eight trials of one model each (loop engine), long enough to kill a node while they run.
GRID = {**TINY, "train": {**TINY["train"], "engine": "loop", "epochs": 5}}
GRID["cv"] = {**TINY["cv"], "n_draws": 2, "lr": [0.05, 0.1, 0.2, 0.5]}
N_TRIALS = 8
NAMESPACE = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    """Every scenario in one namespace (tests/ray_cluster.py); returns (the local run, report)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.fail("tests/test_ray_cluster.py needs `unshare` (util-linux) and `ip` (iproute2)")
    check = subprocess.run([*NAMESPACE, "true"], capture_output=True, text=True)
    if check.returncode:
        pytest.fail(f"cannot create a network namespace (`unshare --net --pid` needs root): {check.stderr.strip()}")
    base = tmp_path_factory.mktemp("raycluster")
    repo = clone(base / "repo", GRID)
    dvc(repo, "repro", "pairs")
    work = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    report_path = base / "report.json"
    try:
        cp = subprocess.run(
            [
                *NAMESPACE,
                sys.executable,
                str(REPO / "tests" / "ray_cluster.py"),
                str(repo),
                str(work),
                str(report_path),
            ],
            env=env(),
            capture_output=True,
            text=True,
            timeout=600,  # then unshare is killed, and with it every process in the namespace
        )
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        if cp.returncode:
            pytest.fail(f"tests/ray_cluster.py failed ({cp.returncode}):\n{cp.stderr[-6000:]}\nreport: {report}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report["local"], report


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "interrupted:"))]


def test_nodes_are_on_loopback_and_separate(cluster_run):
    _, r = cluster_run
    assert r["interfaces"] == ["lo"]
    nodes = r["start"]["nodes"]
    assert len(nodes) == 3 and sum(n["head"] for n in nodes) == 1
    assert {n["address"] for n in nodes} == {"127.0.0.1"}
    assert set(r["start"]["listening"]) <= {"127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"}
    assert r["node_imports_digitpairs"] == ["ModuleNotFoundError: No module named 'digitpairs'"]


def test_pins_reach_every_node_before_torch_loads(cluster_run):
    _, r = cluster_run
    workers = {n["id"] for n in r["start"]["nodes"] if not n["head"]}
    stage = r["start"]["tasks"]
    assert {t["node"] for t in stage} == workers
    for t in stage:  # torch imported first thing in the task: the pins were in its environment already
        assert t["cpu_capability"] == "AVX2"
        assert {k: t["pins"][k] for k in numerics.PIN_VARS} == numerics.env()
        assert t["digest"] == r["start"]["driver_digest"]
        assert "/runtime_resources/py_modules_files/" in t["digitpairs"]  # shipped, not found on the node
        assert "/runtime_resources/working_dir_files/" in t["cwd"]  # not the driver's folder
    for t in r["unpinned"]["tasks"]:  # the same nodes without the runtime environment's pins
        assert t["pins"]["ATEN_CPU_CAPABILITY"] is None
        if t["cpu_capability"] != "AVX2":  # a CPU with more than AVX2: digitpairs refuses to compute
            assert "digest" not in t and "torch already runs with CPU capability" in t["refused"]


def test_cluster_gives_the_local_bytes_on_the_worker_nodes(cluster_run):
    local, r = cluster_run
    ray_run = r["ray"]
    assert ray_run["rc"] == 0, ray_run["stderr"]
    assert ray_run["md5"] == local["md5"]
    assert ray_run["keys"] == local["keys"]  # a remote trial's checkpoint key is the local one
    (line,) = [x for x in ray_run["stderr"].splitlines() if x.startswith("ray: ")]
    ran_on = set(re.findall(r"([0-9a-f]{56}) \(\d+\)", line))
    assert f"ray: {N_TRIALS} jobs ran on" in line
    assert ran_on and ran_on <= {n["id"] for n in r["start"]["nodes"] if not n["head"]}


def test_a_worker_node_killed_mid_grid_costs_nothing(cluster_run):
    local, r = cluster_run
    k = r["worker_killed"]
    assert k["was_training"] and 0 < k["rows_at_kill"] < N_TRIALS
    assert k["rc"] == 0, k["stderr"]
    assert k["md5"] == local["md5"]
    assert k["rows"] == len(set(k["keys"])) == N_TRIALS  # no finished trial trained (recorded) twice


def test_a_killed_head_stops_the_stage_with_one_line_and_the_rerun_resumes(cluster_run):
    local, r = cluster_run
    h = r["head_killed"]
    assert h["rc"] != 0 and h["kill_to_exit_s"] < 60  # Ray alone would end the driver, wordless, after 60 s
    (line,) = error_lines(h["stderr"])
    n = h["rows"]
    assert "lost the Ray cluster" in line and f"{n} of {N_TRIALS} trials are checkpointed" in line
    assert "`dvc repro` resumes" in line and 0 < n < N_TRIALS
    rerun = r["rerun"]
    assert rerun["rc"] == 0, rerun["stderr"]
    assert f"resumed {n} of {N_TRIALS} trials" in rerun["stderr"]
    assert rerun["md5"] == local["md5"] and rerun["rows"] == N_TRIALS


def test_a_closed_port_fails_fast_with_one_line(cluster_run):
    _, r = cluster_run
    c = r["closed_port"]
    assert c["rc"] != 0 and c["seconds"] < 60  # Ray by itself retries for over 10 minutes
    (line,) = error_lines(c["stderr"])
    assert f"RAY_ADDRESS={c['address']}: nothing answers" in line


def test_a_closed_port_puts_the_outputs_back(cluster_run):
    local, r = cluster_run
    assert r["closed_port"]["md5"] == local["md5"]


def test_overhead_per_trial(cluster_run):
    """Not a limit: the measured cost, for docs/clusters.md."""
    local, r = cluster_run
    assert local["rc"] == 0, local["stderr"]
    per_trial = (r["ray"]["seconds"] - local["seconds"]) / N_TRIALS
    print(
        f"\nstage wall time, {N_TRIALS} trials: local x2 {local['seconds']:.1f} s, "
        f"cluster (2 x 1-CPU workers) {r['ray']['seconds']:.1f} s: {per_trial * 1000:+.0f} ms per trial; "
        f"cluster start {r['start']['seconds']:.0f} s; worker killed: next trial recorded "
        f"{r['worker_killed']['kill_to_next_row_s']} s after, "
        f"stage done {r['worker_killed']['kill_to_end_s']} s after; "
        f"head killed: stage stopped {r['head_killed']['kill_to_exit_s']} s after"
    )
