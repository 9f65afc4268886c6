"""MNIST through torchvision's own download path, with an offline mirror and no half-written files."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from urllib.error import URLError

from digitpairs.core.io import StageError
from digitpairs.core.paths import repo_root

import torch
from torchvision.datasets import MNIST
from torchvision.datasets.utils import check_integrity, download_and_extract_archive, extract_archive

MIRROR_ENV = "MNIST_MIRROR"
FIX = (
    f"Fix: set {MIRROR_ENV} to an http(s) URL or a local folder that holds the four official "
    "MNIST .gz files (for example MNIST_MIRROR=../shared/mnist), then rerun."
)


class MnistUnavailable(StageError):
    """MNIST could not be obtained or verified; the message says which file and how to fix it."""


def raw_folder(root: Path) -> Path:
    """Where torchvision keeps the extracted files under ``root``."""
    return Path(root) / MNIST.__name__ / "raw"


def is_complete(root: Path) -> bool:
    """True when every extracted MNIST file is present (torchvision's own notion of 'downloaded')."""
    raw = raw_folder(root)
    return all((raw / Path(name).stem).is_file() for name, _ in MNIST.resources)


def _from_folder(folder: Path, dest: Path) -> None:
    for name, md5 in MNIST.resources:
        src = folder / name
        if not src.is_file():
            raise MnistUnavailable(f"MNIST file {name} is missing from the mirror folder {folder}. {FIX}")
        if not check_integrity(str(src), md5):
            raise MnistUnavailable(
                f"MNIST file {src} is corrupt or truncated: its MD5 is not the official {md5}. "
                f"Replace it with the official file. {FIX}"
            )
        extract_archive(str(src), str(dest))


def _from_urls(mirrors: list[str], dest: Path) -> None:
    for name, md5 in MNIST.resources:
        reasons = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            try:
                download_and_extract_archive(url, download_root=str(dest), filename=name, md5=md5, remove_finished=True)
                break
            except (URLError, OSError, RuntimeError, EOFError) as err:
                reasons.append(f"{url}: {err}")
                (dest / name).unlink(missing_ok=True)
        else:
            raise MnistUnavailable(
                f"Could not download MNIST file {name} with a matching MD5 ({md5}); tried "
                + "; ".join(reasons)
                + f". The machine may be offline or the mirror may serve a corrupt file. {FIX}"
            )


def download(root: Path) -> Path:
    """Make ``root`` hold verified, extracted MNIST; return ``root``.

    ``MNIST_MIRROR`` (URL or folder) replaces torchvision's mirror list; a relative folder is taken
    from the repository root (:func:`digitpairs.core.paths.repo_root`), also in a queued experiment.
    Everything is fetched into a temporary folder beside the destination and moved into place only
    once all four files passed their MD5 check and parse, so a failure never leaves files a later
    run would trust.
    """
    root = Path(root)
    if is_complete(root):
        return root
    root.mkdir(parents=True, exist_ok=True)
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    tmp = Path(tempfile.mkdtemp(prefix=".mnist-partial-", dir=root))
    try:
        dest = raw_folder(tmp)
        dest.mkdir(parents=True)
        if mirror and not mirror.startswith(("http://", "https://")):
            folder = repo_root() / Path(mirror).expanduser()  # an absolute path stays as it is
            if not folder.is_dir():
                raise MnistUnavailable(
                    f"{MIRROR_ENV}={mirror} is neither an http(s) URL nor an existing folder (looked in {folder}; "
                    f"a relative path is taken from the repository root). {FIX}"
                )
            _from_folder(folder, dest)
        else:
            _from_urls([mirror] if mirror else list(MNIST.mirrors), dest)
        for train in (True, False):  # parse once, so a malformed file fails here, not later
            MNIST(str(tmp), train=train, download=False)
        final = raw_folder(root)
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(dest, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def load(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (uint8 ``[n, 28, 28]``) and labels (int64 ``[n]``) of one split of a downloaded root."""
    if not is_complete(root):
        raise MnistUnavailable(f"MNIST is not downloaded under {root}. Run `dvc repro mnist`. {FIX}")
    ds = MNIST(str(root), train=train, download=False)
    return ds.data, ds.targets
