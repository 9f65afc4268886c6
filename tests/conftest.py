"""Shared fixtures: real MNIST from ../shared/mnist, served on 127.0.0.1 or read as a folder; the tiny
pipeline, built once per test run and shared (``tiny_built``), or copied for a test that changes it
(``tiny_repo``)."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path

import pytest

from digitpairs.data import mnist
from digitpairs.data.pairs import make_draw

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


class _Build(threading.Thread):
    """The tiny pipeline's build (subprocesses: git, dvc and the stages), in a thread of its own."""

    def __init__(self, repo: Path):
        super().__init__(name="tiny_built", daemon=True)
        self.repo, self.error = repo, None
        self.start()

    def run(self) -> None:
        from tests.e2e import build_tiny

        try:
            build_tiny(self.repo)
        except BaseException as e:  # raised again by result(), in every test that needs the pipeline
            self.error = e

    def result(self) -> Path:
        self.join()
        if self.error is not None:
            raise self.error
        return self.repo


@pytest.fixture(scope="session", autouse=True)
def _tiny_build(request, tmp_path_factory):
    """In a run that collected a test needing ``tiny_built``, its build starts with the first test and
    runs beside the tests that come before (subprocesses, mostly waiting on one core while those use the
    other). The stages' environment does not depend on them: e2e.env() sets MNIST_MIRROR, the one
    variable a test changes (test_mnist, by monkeypatch)."""
    if any("tiny_built" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("shared_mnist")
        return _Build(tmp_path_factory.mktemp("tiny") / "repo")
    return None


@pytest.fixture(scope="session")
def tiny_built(_tiny_build, tmp_path_factory, shared_mnist) -> Path:
    """The committed tiny pipeline: clone() with TINY params, `dvc repro` (run natively, as a fresh shell
    would), `git add -A && git commit`. Built once per test run and shared: tests must not change it
    (take ``tiny_repo`` for that). ``e2e.build_log(repo)`` is its build's `dvc repro` output,
    ``e2e.build_status(repo)`` the git status the build left before the commit."""
    build = _tiny_build or _Build(tmp_path_factory.mktemp("tiny") / "repo")
    return build.result()


@pytest.fixture
def tiny_repo(tmp_path_factory, tiny_built) -> Path:
    """A private copy of ``tiny_built`` (work tree, .git, .dvc/cache) that the test may change."""
    from tests.e2e import copy_repo

    return copy_repo(tiny_built, tmp_path_factory.mktemp("tiny-copy") / "repo")
