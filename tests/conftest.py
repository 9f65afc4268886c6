"""Shared fixtures: real MNIST from ../shared/mnist, served on 127.0.0.1 or read as a folder."""

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
