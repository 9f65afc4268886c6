"""Pair draws: protocol, auditability and bit-for-bit determinism."""

from __future__ import annotations

import hashlib

from digitpairs.data.pairs import SPLITS, draw_path, load_draw, make_draw, save_draw

import torch
import torch.nn.functional as F


def test_shapes_dtypes_ranges(draw0):
    assert len(draw0) == 12
    for s in SPLITS:
        assert draw0[f"{s}_input"].shape == (1000, 2, 14, 14) and draw0[f"{s}_input"].dtype == torch.float32
        assert draw0[f"{s}_target"].shape == (1000,) and draw0[f"{s}_target"].dtype == torch.int64
        assert draw0[f"{s}_classes"].shape == (1000, 2) and draw0[f"{s}_classes"].dtype == torch.int64
        assert draw0[f"{s}_index"].shape == (1000, 2) and draw0[f"{s}_index"].dtype == torch.int64
        assert set(draw0[f"{s}_target"].unique().tolist()) == {0, 1}
        assert draw0[f"{s}_classes"].min() >= 0 and draw0[f"{s}_classes"].max() <= 9
        assert torch.isfinite(draw0[f"{s}_input"]).all()
    x = draw0["train_input"]
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-4  # z-scored on train
    assert abs(draw0["test_input"].mean().item()) < 0.1  # same statistics, other images


def test_targets_match_classes(draw0):
    for s in SPLITS:
        c = draw0[f"{s}_classes"]
        assert torch.equal(draw0[f"{s}_target"], (c[:, 0] <= c[:, 1]).long())


def test_every_image_is_the_pooled_mnist_image_its_index_names(draw0, mnist_splits):
    xtr, ytr, xte, yte = mnist_splits
    # the z-score statistics are those of the raw pooled training pairs
    raw_train = F.avg_pool2d(xtr[draw0["train_index"]].float(), 2)
    mean, std = raw_train.mean(), raw_train.std()
    for s, (images, labels) in {"train": (xtr, ytr), "val": (xtr, ytr), "test": (xte, yte)}.items():
        idx = draw0[f"{s}_index"]
        pooled = F.avg_pool2d(images[idx].float(), 2)
        assert torch.allclose(draw0[f"{s}_input"], (pooled - mean) / std, atol=1e-4)
        assert torch.equal(draw0[f"{s}_classes"], labels[idx])
    assert idx.max() < 10000


def test_train_val_disjoint_and_distinct(draw0):
    tr, va = set(draw0["train_index"].flatten().tolist()), set(draw0["val_index"].flatten().tolist())
    assert len(tr) == 2000 and len(va) == 2000 and not tr & va
    assert len(set(draw0["test_index"].flatten().tolist())) == 2000


def digest(tensors) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode() + tensors[k].numpy().tobytes())
    return h.hexdigest()


def test_same_seed_bit_identical_other_seed_or_draw_differs(mnist_splits, draw0, tmp_path):
    again, meta = make_draw(*mnist_splits, seed=1, draw=0)
    assert digest(again) == digest(draw0)
    save_draw(again, meta, draw_path(tmp_path / "a", 0))
    save_draw(draw0, meta, draw_path(tmp_path / "b", 0))
    assert draw_path(tmp_path / "a", 0).read_bytes() == draw_path(tmp_path / "b", 0).read_bytes()
    assert digest(load_draw(draw_path(tmp_path / "a", 0))) == digest(draw0)
    other_seed, _ = make_draw(*mnist_splits, seed=2, draw=0)
    other_draw, _ = make_draw(*mnist_splits, seed=1, draw=1)
    assert not torch.equal(other_seed["train_index"], draw0["train_index"])
    assert not torch.equal(other_draw["train_index"], draw0["train_index"])


# sha256 of draw 0 of seed 1, computed once: a change here means draws are no longer reproducible
# across machines or library versions (for example a changed torch.randperm).
GOLDEN_DRAW0_SEED1 = "5ac666aab9b4ced75da3e619ae913fbe5dfe28311ce794fa595a95a889426780"


def test_draw_matches_golden_digest(draw0):
    assert digest(draw0) == GOLDEN_DRAW0_SEED1
