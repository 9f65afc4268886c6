"""MNIST acquisition through torchvision's real download path, and its failure modes."""

from __future__ import annotations

import shutil
import socket

from digitpairs.data import mnist

import pytest
import torch
from torchvision.datasets import MNIST

from tests.conftest import serve

FILES = [name for name, _ in MNIST.resources]


def no_partial_left(root):
    """Nothing a later run could trust: no raw folder, no temporary folder."""
    return (
        not mnist.is_complete(root) and not list(root.glob(".mnist-partial-*")) and not mnist.raw_folder(root).exists()
    )


def test_download_over_http_matches_folder(tmp_path, monkeypatch, mnist_url, mnist_root):
    monkeypatch.setenv(mnist.MIRROR_ENV, mnist_url)
    mnist.download(tmp_path)
    assert mnist.is_complete(tmp_path)
    for train in (True, False):
        x_http, y_http = mnist.load(tmp_path, train)
        x_dir, y_dir = mnist.load(mnist_root, train)
        assert torch.equal(x_http, x_dir) and torch.equal(y_http, y_dir)
    x, y = mnist.load(tmp_path, True)
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8 and y.shape == (60000,)
    assert sorted(p.name for p in mnist.raw_folder(tmp_path).iterdir()) == sorted(f[:-3] for f in FILES)


def test_second_download_is_a_no_op(mnist_root, monkeypatch):
    monkeypatch.setenv(mnist.MIRROR_ENV, "/nonexistent")  # would fail if it tried again
    assert mnist.download(mnist_root) == mnist_root


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_unreachable_mirror_names_file_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(mnist.MIRROR_ENV, closed_port_url())
    with pytest.raises(mnist.MnistUnavailable) as err:
        mnist.download(tmp_path)
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg and "MNIST_MIRROR" in msg and "\n" not in msg
    assert no_partial_left(tmp_path)


def corrupt_copy(src, dst, victim, how):
    shutil.copytree(src, dst)
    path = dst / victim
    path.chmod(0o644)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else data[:-1] + bytes([data[-1] ^ 1]))
    return dst


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_bad_md5_in_folder(tmp_path, monkeypatch, shared_mnist, how):
    mirror = corrupt_copy(shared_mnist, tmp_path / "mirror", "t10k-labels-idx1-ubyte.gz", how)
    monkeypatch.setenv(mnist.MIRROR_ENV, str(mirror))
    root = tmp_path / "root"
    with pytest.raises(mnist.MnistUnavailable, match="t10k-labels-idx1-ubyte.gz.*MD5.*MNIST_MIRROR"):
        mnist.download(root)
    assert no_partial_left(root)


def test_bad_md5_over_http(tmp_path, monkeypatch, shared_mnist):
    mirror = corrupt_copy(shared_mnist, tmp_path / "mirror", "train-labels-idx1-ubyte.gz", "truncate")
    url, server = serve(mirror)
    try:
        monkeypatch.setenv(mnist.MIRROR_ENV, url)
        root = tmp_path / "root"
        with pytest.raises(mnist.MnistUnavailable, match="train-labels-idx1-ubyte.gz.*MD5"):
            mnist.download(root)
        assert no_partial_left(root)
    finally:
        server.shutdown()


def test_folder_missing_a_file(tmp_path, monkeypatch, shared_mnist):
    mirror = tmp_path / "mirror"
    shutil.copytree(shared_mnist, mirror)
    (mirror / "train-images-idx3-ubyte.gz").unlink()
    monkeypatch.setenv(mnist.MIRROR_ENV, str(mirror))
    with pytest.raises(mnist.MnistUnavailable, match="train-images-idx3-ubyte.gz is missing.*MNIST_MIRROR"):
        mnist.download(tmp_path / "root")
    assert no_partial_left(tmp_path / "root")


def test_mirror_that_is_neither_url_nor_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(mnist.MIRROR_ENV, str(tmp_path / "nope"))
    with pytest.raises(mnist.MnistUnavailable, match="neither an http"):
        mnist.download(tmp_path / "root")


def test_load_before_download_says_how(tmp_path):
    with pytest.raises(mnist.MnistUnavailable, match="dvc repro mnist"):
        mnist.load(tmp_path, True)
