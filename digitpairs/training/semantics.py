"""What a training computes, whichever engine computes it: one definition that both engines import.

A training is a :class:`TrainConfig` applied to one model and one draw: the mini-batch order
(:func:`epoch_order`), the learning-rate schedule (:func:`lr_factor`), the augmentations and their
random draws (:func:`augmentation`, :func:`augment`), the dropout masks (:func:`dropout_mask`), the
loss (:func:`loss_fn`), the test-time views (:func:`shifted_views`, :func:`average_posteriors`) and
the scores (:func:`siamese_scores`, :func:`fraction`). The per-model loop (:mod:`.train`) and the
lockstep engine (:mod:`.lockstep`) are two ways of computing it, with the same bytes; a change to what
a training means is made here, once.

The study trains with plain SGD at a constant rate; :class:`TrainConfig`'s other fields (momentum,
weight decay, a cosine schedule, label smoothing, augmentations, dropout, weight averaging, test-time
shifts) are what the fourth variant, siamese-plus, may add. At their defaults they change nothing:
the study's trainings run the plain arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from digitpairs.core.params import (
    ELASTIC_RANGE,
    ELASTIC_SIGMA_RANGE,
    MAX_CUTOUT,
    MAX_SHIFT,
    SCHEDULES,
    check_device,
)
from digitpairs.training.models import ModelConfig

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyper-parameters of one training. ``w2``/``w10`` matter for siamese only."""

    lr: float = 0.1
    epochs: int = 25
    batch_size: int = 100
    shuffle: bool = True  # the original did not shuffle; we reshuffle every epoch, seeded
    w2: float = 1.0
    w10: float = 0.0
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"  # SCHEDULES: constant | cosine, lr * (1 + cos(pi * step / steps)) / 2 per mini-batch
    label_smoothing: float = 0.0
    shift: int = 0  # augmentation: move each digit image by up to this many pixels, fresh every step
    elastic: float = 0.0  # augmentation: elastic distortion of this strength (pixels), fresh every step
    elastic_sigma: float = 2.0  # the distortion's smoothness: its random field's Gaussian width (pixels)
    cutout: int = 0  # augmentation: paste a square of background this many pixels wide on each digit, every step
    dropout: float = 0.0  # drop each input of the digit classifier (the last layer) with this probability
    ema: float = 0.0  # keep an exponential moving average of the weights with this decay, the model kept
    tta: int = 0  # scoring: average the posteriors over the shifts of each digit by up to this many pixels


Generators = dict[str, torch.Generator]  # a training's random streams by use: shift, elastic, cutout, dropout


@dataclass
class TrainResult:
    """What a training leaves besides the weights: per-epoch loss and per-step gradient norms."""

    epoch_loss: list[float]
    grad_names: list[str] = field(default_factory=list)
    grad_norms: torch.Tensor | None = None  # [steps, len(grad_names)], float32


def check_hparams(arch: str, cfg: TrainConfig, n_train: int) -> None:
    """Raise a ``ValueError`` naming the bad hyper-parameter, before any work is done."""
    ModelConfig(arch)  # names an unknown architecture
    if not cfg.lr > 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr!r}.")
    if int(cfg.epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {cfg.epochs!r}.")
    if not 1 <= int(cfg.batch_size) <= n_train:
        raise ValueError(f"batch_size must be between 1 and the {n_train} training pairs, got {cfg.batch_size!r}.")
    if arch == "siamese":
        if cfg.w2 < 0 or cfg.w10 < 0:
            raise ValueError(f"loss weights must be >= 0, got (w2, w10) = ({cfg.w2}, {cfg.w10}).")
        if cfg.w2 == 0 and cfg.w10 == 0:
            raise ValueError("loss weights (w2, w10) are both 0: nothing would be trained; make one positive.")
    if not 0 <= cfg.momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {cfg.momentum!r}.")
    if cfg.nesterov and cfg.momentum == 0:
        raise ValueError("nesterov needs a momentum > 0.")
    if not cfg.weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {cfg.weight_decay!r}.")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; choose one of {SCHEDULES}.")
    if not 0 <= cfg.label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {cfg.label_smoothing!r}.")
    if not 0 <= int(cfg.shift) <= MAX_SHIFT:
        raise ValueError(f"shift must be between 0 and {MAX_SHIFT} pixels, got {cfg.shift!r}.")
    for name, (low, high) in (("elastic", ELASTIC_RANGE), ("elastic_sigma", ELASTIC_SIGMA_RANGE)):
        if not low <= getattr(cfg, name) <= high:
            raise ValueError(f"{name} must be between {low:g} and {high:g} pixels, got {getattr(cfg, name)!r}.")
    if not 0 <= int(cfg.cutout) <= MAX_CUTOUT:
        raise ValueError(f"cutout must be between 0 and {MAX_CUTOUT} pixels, got {cfg.cutout!r}.")
    if not 0 <= int(cfg.tta) <= MAX_SHIFT:
        raise ValueError(f"tta must be between 0 and {MAX_SHIFT} pixels, got {cfg.tta!r}.")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout!r}.")
    if not 0 <= cfg.ema < 1:
        raise ValueError(f"ema must be in [0, 1), got {cfg.ema!r}.")


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device, checked by params' own rule (:func:`check_device`)."""
    check_device("train.device", name)
    return torch.device(name)


def epoch_order(n: int, shuffle: bool, g: torch.Generator) -> torch.Tensor:
    """Sample order of one epoch: a fresh permutation from ``g`` or, like the original, 0..n-1."""
    return torch.randperm(n, generator=g) if shuffle else torch.arange(n)


def step_count(cfg: TrainConfig, n: int) -> int:
    """Mini-batches of a training on ``n`` pairs: the length of the lr schedule and of the gradient-norm
    record (the last mini-batch of an epoch may be partial)."""
    return cfg.epochs * -(-n // int(cfg.batch_size))


def lr_factor(cfg: TrainConfig, step: int, steps: int) -> float:
    """Multiplier of ``cfg.lr`` at mini-batch ``step`` of ``steps`` (one formula for both engines)."""
    return 0.5 * (1 + math.cos(math.pi * step / steps)) if cfg.schedule == "cosine" else 1.0


def augmentation(cfg: TrainConfig, n: int, gens: Generators) -> tuple:
    """One mini-batch's random draws for ``n`` pairs: ``(offsets, fields, corners)``, each ``None`` when
    its augmentation is off (both engines draw them the same way, from the same generators)."""
    offsets = shift_offsets(n, cfg.shift, gens["shift"]) if cfg.shift else None
    fields = elastic_fields(n, cfg.elastic, cfg.elastic_sigma, gens["elastic"]) if cfg.elastic else None
    corners = cutout_corners(n, cfg.cutout, gens["cutout"]) if cfg.cutout else None
    return offsets, fields, corners


def augment(
    images: torch.Tensor,
    offsets: torch.Tensor | None,
    fields: torch.Tensor | None,
    corners: torch.Tensor | None = None,
    cutout: int = 0,
) -> torch.Tensor:
    """One mini-batch's augmentation of its digit images ``[N, 14, 14]`` (both engines call it): the
    shifts' ``offsets [N, 2]``, the elastic ``fields [N, 2, 14, 14]``, then the cutout squares at
    ``corners [N, 2]``, each when given."""
    if offsets is not None:
        images = shift_images(images, offsets)
    if fields is not None:
        images = warp_images(images, fields)
    return cut_out(images, corners, cutout) if corners is not None else images


def shift_offsets(n: int, shift: int, g: torch.Generator) -> torch.Tensor:
    """Random offsets ``[n, 2 digits, 2]`` in ``[-shift, shift]`` for one mini-batch of ``n`` pairs."""
    return torch.randint(-shift, shift + 1, (n, 2, 2), generator=g)


def shift_images(images: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Translate each 14x14 image of ``images [N, 14, 14]`` by its ``offsets [N, 2]`` (rows, columns).

    Pixels that enter from outside repeat the nearest edge pixel (the background, after the z-score), so
    no value is invented; an exact gather, identical on every CPU.
    """
    idx = torch.arange(14, device=images.device)
    rows = (idx - offsets[:, :1].to(images.device)).clamp_(0, 13)  # [N, 14]
    cols = (idx - offsets[:, 1:].to(images.device)).clamp_(0, 13)
    n = torch.arange(len(images), device=images.device).view(-1, 1, 1)
    return images[n, rows[:, :, None], cols[:, None, :]]


def elastic_fields(n: int, alpha: float, sigma: float, g: torch.Generator) -> torch.Tensor:
    """Random displacement fields ``[n, 2 digits, 2, 14, 14]`` (rows, columns) for one mini-batch of
    ``n`` pairs, drawn as Simard et al. (2003) do: uniform noise in [-1, 1] per pixel, smoothed by a
    Gaussian of width ``sigma``, times ``alpha``. The smoothing is a sum of shifted copies (zeros
    outside the image), elementwise, so each image's field has the same bits in any batch."""
    noise = torch.rand((n, 2, 2, 14, 14), generator=g) * 2 - 1
    radius = min(13, math.ceil(2 * sigma))
    weights = [math.exp(-(i * i) / (2 * sigma * sigma)) for i in range(-radius, radius + 1)]
    taps = [w / sum(weights) for w in weights]
    for dim, pad in ((-1, (radius, radius)), (-2, (0, 0, radius, radius))):  # columns, then rows
        padded = F.pad(noise, pad)
        noise = sum(padded.narrow(dim, i, 14) * t for i, t in enumerate(taps))
    return noise * alpha


def warp_images(images: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
    """Move each pixel of ``images [N, 14, 14]`` by its displacement ``fields [N, 2, 14, 14]``: the
    output at (i, j) is the input at (i + rows, j + columns), interpolated bilinearly, clamped to the
    image (the edge repeats, as in ``shift_images``)."""
    idx = torch.arange(14, device=images.device, dtype=images.dtype)
    fields = fields.to(images.device)
    r = (idx.view(1, 14, 1) + fields[:, 0]).clamp_(0, 13)
    c = (idx.view(1, 1, 14) + fields[:, 1]).clamp_(0, 13)
    r0, c0 = r.floor().clamp_(max=12), c.floor().clamp_(max=12)
    fr, fc = r - r0, c - c0
    r0, c0 = r0.long(), c0.long()
    n = torch.arange(len(images), device=images.device).view(-1, 1, 1)
    top = images[n, r0, c0] * (1 - fc) + images[n, r0, c0 + 1] * fc
    bottom = images[n, r0 + 1, c0] * (1 - fc) + images[n, r0 + 1, c0 + 1] * fc
    return top * (1 - fr) + bottom * fr


def cutout_corners(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Random top-left corners ``[n, 2 digits, 2]`` of each digit's square, which may overhang the
    image's top and left edges as its bottom and right ones (DeVries & Taylor 2017)."""
    return torch.randint(1 - size, 14, (n, 2, 2), generator=g)


def cut_out(images: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """Paste a ``size``-wide square of background (each image's corner pixel, the z-scored 0) on
    ``images [N, 14, 14]`` at ``corners [N, 2]``."""
    idx = torch.arange(14, device=images.device)
    corners = corners.to(images.device)
    rows = (idx >= corners[:, :1]) & (idx < corners[:, :1] + size)  # [N, 14]
    cols = (idx >= corners[:, 1:]) & (idx < corners[:, 1:] + size)
    square = rows[:, :, None] & cols[:, None, :]
    return torch.where(square, images[:, :1, :1], images)


def dropout_mask(shape: tuple[int, ...], p: float, g: torch.Generator) -> torch.Tensor:
    """Inverted dropout's multiplier: 0 with probability ``p``, else ``1 / (1 - p)``; from ``g``, so both
    engines drop the same units."""
    return (torch.rand(shape, generator=g) >= p).float().div_(1 - p)


def loss_fn(
    arch: str, out, target: torch.Tensor, classes: torch.Tensor, w2: float, w10: float, smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy; siamese: ``w2 * CE(comparison) + w10 * (CE(digit 1) + CE(digit 2))``."""
    if arch == "pair":
        return F.cross_entropy(out, target, label_smoothing=smoothing)
    cmp, digits = out
    aux = F.cross_entropy(digits.reshape(-1, 10), classes.reshape(-1), reduction="sum", label_smoothing=smoothing)
    return w2 * F.cross_entropy(cmp, target, label_smoothing=smoothing) + w10 * (aux / len(target))


def shifted_views(radius: int) -> list[tuple[int, int]]:
    """The (rows, columns) offsets that test-time augmentation averages over: every shift by up to
    ``radius`` pixels, the image itself first."""
    r = range(-radius, radius + 1)
    return sorted(((i, j) for i in r for j in r), key=lambda o: (o != (0, 0), o))


def average_posteriors(views: list) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The log of the mean softmax over ``views`` (each a model's output: logits, or a tuple of them),
    summed in the views' order: log-probabilities that every decision rule reads like logits."""
    parts = [v if isinstance(v, tuple) else (v,) for v in views]
    out = []
    for logits in zip(*parts, strict=True):
        total = logits[0].softmax(-1)
        for x in logits[1:]:
            total = total + x.softmax(-1)
        out.append(total.div_(len(logits)).log_())
    return tuple(out) if isinstance(views[0], tuple) else out[0]


def siamese_scores(
    cmp: torch.Tensor, digits: torch.Tensor, target: torch.Tensor, classes: torch.Tensor
) -> dict[str, float]:
    """The three siamese accuracies from comparison logits ``[n, 2]`` and digit logits ``[n, 2, 10]``."""
    pred = digits.argmax(-1)
    return {
        "comparison_accuracy": fraction(cmp.argmax(-1) == target),
        "digit_comparison_accuracy": fraction((pred[:, 0] <= pred[:, 1]).long() == target),
        "digit_posterior_accuracy": fraction((p_less_equal(digits) > 0.5).long() == target),
        "digit_accuracy": fraction(pred == classes),
    }


def p_less_equal(digits: torch.Tensor) -> torch.Tensor:
    """P(d1 <= d2) from digit logits ``[n, 2, 10]``, the two digits independent under the model:
    sum over i of P(d1 = i) * P(d2 >= i). Deciding on it, rather than on the two argmaxes, counts an
    uncertain digit only as far as it can flip the comparison."""
    p = digits.float().softmax(-1)
    at_least = p[:, 1].flip(-1).cumsum(-1).flip(-1)  # P(d2 >= i)
    return (p[:, 0] * at_least).sum(-1)


def fraction(correct: torch.Tensor) -> float:
    """Share of true entries, as an exact count ratio (0.736, not float32's 0.73600000143)."""
    return int(correct.sum()) / correct.numel()
