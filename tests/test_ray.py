"""The Ray executor on a local 2-CPU Ray instance gives exactly the local executor's results."""

from __future__ import annotations

import time

import pytest

from digitpairs.training.study import cv_table, cv_trials
from tests.test_runner import PARAMS, pairs_dir  # noqa: F401  (fixture)

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

GRID = {**PARAMS, "cv": {**PARAMS["cv"], "lr": [0.05, 0.1, 0.2, 0.5], "batch_norm": [True, False]}}


def test_ray_map_starts_and_stops_its_own_instance(pairs_dir):  # noqa: F811
    """Runs first (before the module's instance exists): ray_map starts a local instance itself."""
    from digitpairs.training.runner import run_trials

    assert not ray.is_initialized()
    ts = cv_trials("pair", PARAMS)[:2]
    assert [o.scores for o in run_trials(ts, pairs_dir, executor="ray")] == [
        o.scores for o in run_trials(ts, pairs_dir, workers=1)
    ]
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def local_ray():
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"\nray.init: {time.perf_counter() - t:.1f} s")
    yield
    ray.shutdown()


def timed(**kwargs):
    from digitpairs.training.runner import run_trials

    t = time.perf_counter()
    out = run_trials(cv_trials("siamese", GRID), kwargs.pop("pairs"), **kwargs)
    return out, time.perf_counter() - t


def test_ray_matches_local_exactly_and_costs_little(local_ray, pairs_dir):  # noqa: F811
    local, t_local = timed(pairs=pairs_dir, executor="local", workers=2)
    remote, t_ray = timed(pairs=pairs_dir, executor="ray", workers=2)
    _, t_one = timed(pairs=pairs_dir, executor="local", workers=1)
    assert [o.trial for o in remote] == [o.trial for o in local]
    assert [o.scores for o in remote] == [o.scores for o in local]
    assert cv_table(remote, "val").to_csv() == cv_table(local, "val").to_csv()
    n = len(local)
    ms = {k: f"{t / n * 1000:.0f} ms" for k, t in [("local x2", t_local), ("ray x2", t_ray), ("in-process", t_one)]}
    print(f"{n} trials, wall time per trial: {ms}")
    assert ray.is_initialized()  # ray_map leaves an instance it did not start running
