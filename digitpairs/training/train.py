"""Per-model training and evaluation, as in the study (SGD, cross-entropy, mini-batches).

The study trains with plain SGD at a constant rate; :class:`TrainConfig`'s other fields (momentum,
weight decay, a cosine schedule, label smoothing, random shifts) are what the fourth variant,
siamese-plus, adds. At their defaults they change nothing: the study's trainings run the same
arithmetic as before they existed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from digitpairs.core.params import ELASTIC_RANGE, ELASTIC_SIGMA_RANGE, MAX_SHIFT, SCHEDULES, check_device
from digitpairs.training.models import ModelConfig, weight_names

import torch
import torch.nn.functional as F
from torch import nn


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


def lr_factor(cfg: TrainConfig, step: int, steps: int) -> float:
    """Multiplier of ``cfg.lr`` at mini-batch ``step`` of ``steps`` (one formula for both engines)."""
    return 0.5 * (1 + math.cos(math.pi * step / steps)) if cfg.schedule == "cosine" else 1.0


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


def shift_offsets(n: int, shift: int, g: torch.Generator) -> torch.Tensor:
    """Random offsets ``[n, 2 digits, 2]`` in ``[-shift, shift]`` for one mini-batch of ``n`` pairs."""
    return torch.randint(-shift, shift + 1, (n, 2, 2), generator=g)


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


def augment(images: torch.Tensor, offsets: torch.Tensor | None, fields: torch.Tensor | None) -> torch.Tensor:
    """One mini-batch's augmentation of its digit images ``[N, 14, 14]`` (both engines call it): the
    shifts' ``offsets [N, 2]``, then the elastic ``fields [N, 2, 14, 14]``, each when given."""
    if offsets is not None:
        images = shift_images(images, offsets)
    return warp_images(images, fields) if fields is not None else images


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


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device, checked by params' own rule (:func:`check_device`)."""
    check_device("train.device", name)
    return torch.device(name)


def loss_fn(
    arch: str, out, target: torch.Tensor, classes: torch.Tensor, w2: float, w10: float, smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy; siamese: ``w2 * CE(comparison) + w10 * (CE(digit 1) + CE(digit 2))``."""
    if arch == "pair":
        return F.cross_entropy(out, target, label_smoothing=smoothing)
    cmp, digits = out
    aux = F.cross_entropy(digits.reshape(-1, 10), classes.reshape(-1), reduction="sum", label_smoothing=smoothing)
    return w2 * F.cross_entropy(cmp, target, label_smoothing=smoothing) + w10 * (aux / len(target))


def epoch_order(n: int, shuffle: bool, g: torch.Generator) -> torch.Tensor:
    """Sample order of one epoch: a fresh permutation from ``g`` or, like the original, 0..n-1."""
    return torch.randperm(n, generator=g) if shuffle else torch.arange(n)


def train(
    model: nn.Module,
    arch: str,
    inputs: torch.Tensor,
    target: torch.Tensor,
    classes: torch.Tensor,
    cfg: TrainConfig,
    g: torch.Generator,
    record_grad_norms: bool = False,
    g_shift: torch.Generator | None = None,
    g_elastic: torch.Generator | None = None,
) -> TrainResult:
    """Train ``model`` in place on the device its parameters live on; data is moved there once.

    ``g`` orders the mini-batches; ``g_shift`` and ``g_elastic`` draw the augmentations' offsets and
    fields (with ``cfg.shift``, ``cfg.elastic``).
    """
    check_hparams(arch, cfg, len(inputs))
    if (cfg.shift and g_shift is None) or (cfg.elastic and g_elastic is None):
        raise ValueError("a training with shift or elastic > 0 needs its augmentation generators (g_shift, g_elastic).")
    device = next(model.parameters()).device
    inputs, target, classes = inputs.to(device), target.to(device), classes.to(device)
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )
    names = weight_names(model)
    params = dict(model.named_parameters())
    weights = [params[n] for n in names]
    n, bs = len(inputs), int(cfg.batch_size)
    steps_per_epoch = (n + bs - 1) // bs
    steps = cfg.epochs * steps_per_epoch
    norms = torch.zeros(steps, len(names), device=device) if record_grad_norms else None
    epoch_loss = []
    model.train()
    step = 0
    for _ in range(cfg.epochs):
        order = epoch_order(n, cfg.shuffle, g).to(device)
        total = torch.zeros((), device=device)
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            x = inputs[idx]
            if cfg.shift or cfg.elastic:
                offsets = shift_offsets(len(idx), cfg.shift, g_shift).view(-1, 2) if cfg.shift else None
                fields = elastic_fields(len(idx), cfg.elastic, cfg.elastic_sigma, g_elastic) if cfg.elastic else None
                x = augment(x.reshape(-1, 14, 14), offsets, fields.view(-1, 2, 14, 14) if cfg.elastic else None)
                x = x.view(len(idx), 2, 14, 14)
            loss = loss_fn(arch, model(x), target[idx], classes[idx], cfg.w2, cfg.w10, cfg.label_smoothing)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            if norms is not None:
                norms[step] = torch.stack(torch._foreach_norm([w.grad for w in weights]))
            opt.param_groups[0]["lr"] = cfg.lr * lr_factor(cfg, step, steps)
            opt.step()
            total += loss.detach() * len(idx)
            step += 1
        epoch_loss.append(float(total) / n)
    return TrainResult(epoch_loss, names, norms.cpu() if norms is not None else None)


@torch.no_grad()
def evaluate(
    model: nn.Module, arch: str, inputs: torch.Tensor, target: torch.Tensor, classes: torch.Tensor
) -> dict[str, float]:
    """Accuracies of a model in eval mode.

    pair: ``accuracy``. siamese: ``comparison_accuracy`` (the 2-way head),
    ``digit_comparison_accuracy`` (argmax d1 <= argmax d2) and ``digit_accuracy``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = model(inputs.to(device))
    target, classes = target.to(device), classes.to(device)
    model.train(was_training)
    if arch == "pair":
        return {"accuracy": fraction(out.argmax(1) == target)}
    return siamese_scores(out[0], out[1], target, classes)


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
