"""Pair draws: the study's data protocol, stored as auditable safetensors files."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

from digitpairs.core.io import StageError, replacing
from digitpairs.core.params import images_needed
from digitpairs.core.seeding import generator

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

SPLITS = ("train", "val", "test")
FIELDS = ("input", "target", "classes", "index")

Draw = dict[str, torch.Tensor]


def draw_path(folder: Path, draw: int) -> Path:
    """File of draw ``draw`` inside ``folder``."""
    return Path(folder) / f"draw_{draw:02d}.safetensors"


def pool(images: torch.Tensor) -> torch.Tensor:
    """28x28 uint8 images to 14x14 float32 by 2x2 average pooling (exact: sums of 4 bytes / 4)."""
    return F.avg_pool2d(images.float(), kernel_size=2)


def exact_mean_std(pooled: torch.Tensor) -> tuple[float, float]:
    """Mean and unbiased std of pooled pixels, computed exactly in integers.

    Pooled values are multiples of 1/4, so 4x is an integer and the sums are exact in int64; the
    statistics then do not depend on the reduction order a CPU's vector units choose, and a draw
    is bit-identical on any machine.
    """
    q = (pooled * 4).to(torch.int64)
    n = q.numel()
    s1, s2 = int(q.sum()), int((q * q).sum())
    mean = Fraction(s1, 4 * n)
    var = Fraction(s2 * n - s1 * s1, 16 * n * (n - 1))
    return float(mean), math.sqrt(float(var))


def make_draw(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    seed: int,
    draw: int,
    n_pairs: int = 1000,
) -> tuple[Draw, dict[str, str]]:
    """One draw: ``n_pairs`` train, validation and test pairs, z-scored with the train statistics.

    Train and validation images come from one permutation of the train split, so they are
    disjoint by construction; test images from the test split. Returns the tensors and metadata.
    """
    need = images_needed(n_pairs)
    if need["train"] > len(train_images) or need["test"] > len(test_images):
        raise ValueError(f"data.n_pairs={n_pairs} needs more images than MNIST has; lower it.")
    g = generator(seed, "pairs", draw)
    train_perm = torch.randperm(len(train_images), generator=g)[: need["train"]].view(2, n_pairs, 2)
    test_perm = torch.randperm(len(test_images), generator=g)[: need["test"]].view(n_pairs, 2)
    picks = {
        "train": (train_perm[0], train_images, train_labels),
        "val": (train_perm[1], train_images, train_labels),
        "test": (test_perm, test_images, test_labels),
    }
    out: Draw = {}
    for split, (index, images, labels) in picks.items():
        classes = labels[index]
        out[f"{split}_input"] = pool(images[index])
        out[f"{split}_classes"] = classes.to(torch.int64)
        out[f"{split}_target"] = (classes[:, 0] <= classes[:, 1]).to(torch.int64)
        out[f"{split}_index"] = index.to(torch.int64).contiguous()
    mean, std = exact_mean_std(out["train_input"])
    m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    for split in SPLITS:
        out[f"{split}_input"] = ((out[f"{split}_input"] - m) / s).contiguous()
    meta = {"seed": str(seed), "draw": str(draw), "n_pairs": str(n_pairs), "mean": repr(mean), "std": repr(std)}
    return out, meta


def write_draws(splits: tuple[torch.Tensor, ...], folder: Path, n_draws: int, seed: int, n_pairs: int = 1000) -> None:
    """Draws 0 to ``n_draws - 1`` of ``seed`` into ``folder``, as the pairs stage writes them: the one
    loop that turns MNIST ``splits`` (train images, labels, test images, labels) into draw files."""
    for draw in range(n_draws):
        save_draw(*make_draw(*splits, seed=seed, draw=draw, n_pairs=n_pairs), draw_path(folder, draw))


def save_draw(tensors: Draw, meta: dict[str, str], path: Path) -> None:
    """Write a draw atomically (temp file then rename), so a crash never leaves a torn file."""
    # one metadata entry: safetensors writes a metadata map in hash order, which would make the
    # bytes (and so DVC's hash) differ between identical runs
    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata={"draw": json.dumps(meta, sort_keys=True)})


def existing_draw(path: Path) -> Path:
    """``path``, or a FileNotFoundError that says how to make it (before anything reads the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pair draw {path} does not exist; run `dvc repro pairs` first.")
    return path


def load_draw(path: Path) -> Draw:
    """Tensors of one stored draw; a truncated or corrupt file is a ``StageError`` naming it and the fix."""
    path = existing_draw(path)
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise StageError(
            f"pair draw {path} is corrupt or truncated ({err}); `dvc checkout --force {path.parent}` restores it, "
            "`dvc repro pairs` recomputes it."
        ) from None


def split(draw: Draw, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input, target, classes)`` of one split of a draw."""
    return draw[f"{name}_input"], draw[f"{name}_target"], draw[f"{name}_classes"]
