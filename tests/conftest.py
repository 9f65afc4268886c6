"""Shared fixtures: real MNIST from ../shared/mnist, served on 127.0.0.1 or read as a folder; the tiny
pipeline, built once per test run and shared (``tiny_built``), or copied for a test that changes it
(``tiny_repo``)."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path

from digitpairs.data import mnist
from digitpairs.data.pairs import make_draw

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = Path(os.environ.get("SHARED_MNIST", REPO.parent / "shared" / "mnist")).resolve()


def serve(folder: Path):
    """A loopback HTTP server for ``folder``; returns (url, server)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/", server


@pytest.fixture(scope="session")
def shared_mnist() -> Path:
    if not SHARED_MNIST.is_dir():
        pytest.fail(f"{SHARED_MNIST} is missing: tests need the four official MNIST files there.")
    return SHARED_MNIST


@pytest.fixture(scope="session")
def mnist_url(shared_mnist):
    url, server = serve(shared_mnist)
    yield url
    server.shutdown()


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory, shared_mnist) -> Path:
    root = tmp_path_factory.mktemp("mnist")
    old = os.environ.get(mnist.MIRROR_ENV)
    os.environ[mnist.MIRROR_ENV] = str(shared_mnist)
    try:
        mnist.download(root)
    finally:
        if old is None:
            os.environ.pop(mnist.MIRROR_ENV)
        else:
            os.environ[mnist.MIRROR_ENV] = old
    return root


@pytest.fixture(scope="session")
def mnist_splits(mnist_root):
    return (*mnist.load(mnist_root, train=True), *mnist.load(mnist_root, train=False))


@pytest.fixture(scope="session")
def draw0(mnist_splits):
    tensors, _ = make_draw(*mnist_splits, seed=1, draw=0)
    return tensors


@pytest.fixture(scope="session")
def tiny_built(tmp_path_factory, shared_mnist) -> Path:
    """The committed tiny pipeline: clone() with TINY params, `dvc repro` (run natively, as a fresh shell
    would), `git add -A && git commit`. Built once per test run and shared: tests must not change it
    (take ``tiny_repo`` for that). ``e2e.build_log(repo)`` is its build's `dvc repro` output,
    ``e2e.build_status(repo)`` the git status the build left before the commit."""
    from filelock import FileLock

    from tests.e2e import build_tiny

    # under pytest-xdist every worker has its own basetemp below one shared folder: the first worker to
    # ask builds the pipeline there, the others wait for it and share it
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    repo, done = shared / "tiny" / "repo", shared / "tiny" / "built"
    with FileLock(str(shared / "tiny.lock")):
        if not done.exists():
            repo.parent.mkdir(exist_ok=True)
            build_tiny(repo)
            done.touch()
    return repo


@pytest.fixture
def tiny_repo(tmp_path_factory, tiny_built) -> Path:
    """A private copy of ``tiny_built`` (work tree, .git, .dvc/cache) that the test may change."""
    from tests.e2e import copy_repo

    return copy_repo(tiny_built, tmp_path_factory.mktemp("tiny-copy") / "repo")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the modules for `pytest -n N --dist loadfile --no-loadscope-reorder`: one module that needs
    the tiny pipeline first (its worker builds it), then every module that needs none (the other workers
    run them meanwhile instead of waiting), then the rest."""
    needs = {}
    for item in items:
        needs[item.path] = needs.get(item.path, False) or "tiny_built" in item.fixturenames
    first = next((path for path, n in needs.items() if n), None)
    rank = {path: 0 if path == first else (2 if n else 1) for path, n in needs.items()}
    items.sort(key=lambda item: rank[item.path])  # stable: each module's own order is kept
