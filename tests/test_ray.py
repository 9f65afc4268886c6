"""The Ray executor on a local 2-CPU Ray instance gives exactly the local executor's results."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from digitpairs.training.study import cv_table, cv_trials

import pytest

from tests.test_runner import PARAMS, pairs_dir  # noqa: F401  (fixture)

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.system]

GRID = {**PARAMS, "cv": {**PARAMS["cv"], "lr": [0.05, 0.1, 0.2, 0.5], "batch_norm": [True, False]}}
HOME_TOKEN = Path.home() / ".ray" / "auth_token"


def reset_auth_token_state() -> None:
    """Ray's own test helper (ray._private.authentication_test_utils), with a fallback spelled out."""
    try:
        from ray._private.authentication_test_utils import reset_auth_token_state as reset
    except ImportError:  # pragma: no cover - another Ray version

        def reset() -> None:
            from ray._raylet import AuthenticationTokenLoader, Config

            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()

    reset()


@pytest.fixture(scope="module", autouse=True)
def temporary_token(tmp_path_factory):
    """Ray 2.60 turns token authentication on for a local instance and, unless told otherwise,
    writes the token to ~/.ray/auth_token, where a cluster started later by the user would require
    it. Give this module's instances a temporary token instead; check that the home stays clean."""
    had = HOME_TOKEN.exists()
    token = tmp_path_factory.mktemp("ray") / "auth_token"
    token.write_text(secrets.token_hex(32))
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    os.environ.pop("RAY_AUTH_TOKEN", None)
    reset_auth_token_state()  # Ray read its auth settings at import: make it read them again
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    reset_auth_token_state()
    assert had or not HOME_TOKEN.exists(), f"a Ray test wrote {HOME_TOKEN}"


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


def test_an_address_where_nothing_listens_fails_within_the_timeout():
    import socket

    from digitpairs.core.io import StageError
    from digitpairs.training import ray_executor

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        t = time.perf_counter()
        with pytest.raises(StageError, match=f"RAY_ADDRESS=ray://127.0.0.1:{port}: nothing answers"):
            ray_executor._reachable(f"ray://127.0.0.1:{port}", 2.0)
    assert time.perf_counter() - t < 5
    assert ray_executor._hostport("auto") is None
    assert ray_executor._hostport("[::1]:6379") == ("::1", 6379)


def test_a_driver_told_loopback_stays_on_loopback():
    """Ray replaces 127.0.0.1 by this machine's network address, for the head it connects to and for the
    driver's own; ray_map keeps both on loopback (in a fresh process, where ray is not imported yet, as in a
    stage), and leaves any other address to Ray."""
    import subprocess
    import sys

    code = (
        "import sys; from digitpairs.training.ray_executor import _keep_loopback; _keep_loopback(sys.argv[1]); "
        "from ray._private import services; "
        "print(services.canonicalize_bootstrap_address(sys.argv[1]), services.get_node_ip_address())"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    for address, expect in [
        ("127.0.0.1:6379", "127.0.0.1:6379 127.0.0.1"),
        ("localhost:6379", "127.0.0.1:6379 127.0.0.1"),
    ]:
        out = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == expect.split(), out.stderr
    out = subprocess.run([sys.executable, "-c", code, "192.0.2.7:6379"], env=env, capture_output=True, text=True)
    assert out.stdout.split()[0] == "192.0.2.7:6379", out.stderr


def test_the_runtime_environment_carries_the_pins_and_the_package():
    from digitpairs.core import numerics
    from digitpairs.training.ray_executor import runtime_env

    local, cluster = runtime_env(cluster=False), runtime_env(cluster=True)
    blas = numerics.OPENBLAS_PINS if numerics.avx2_fma() else {}
    assert local == {"env_vars": {**numerics.ENV_PINS, **blas, numerics.UNPINNED_ENV: "0"}}
    assert cluster["env_vars"] == local["env_vars"]
    (pkg,) = cluster["py_modules"]
    assert Path(pkg, "__init__.py").is_file() and Path(pkg).name == "digitpairs"


def test_a_node_with_other_numeric_settings_refuses_to_compute(local_ray, pairs_dir, monkeypatch):  # noqa: F811
    """The driver's checkpoint key names its own fingerprint: a worker whose fingerprint differs
    (another torch, no pins) must not fill it. Here the driver pretends to another fingerprint."""
    from digitpairs.core import numerics
    from digitpairs.core.io import StageError
    from digitpairs.training.runner import run_trials

    monkeypatch.setattr(numerics, "digest", lambda device="cpu": "elsewhere")
    with pytest.raises(StageError, match=r"node \w+ computes with other numeric settings than the driver"):
        run_trials(cv_trials("pair", PARAMS)[:1], pairs_dir, executor="ray")
