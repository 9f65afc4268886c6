"""Per-model training and evaluation, as in the study (SGD, cross-entropy, mini-batches).

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
    cutout: int = 0  # augmentation: paste a square of background this many pixels wide on each digit, every step
    dropout: float = 0.0  # drop each input of the digit classifier (the last layer) with this probability
    ema: float = 0.0  # keep an exponential moving average of the weights with this decay, the model kept
    tta: int = 0  # scoring: average the posteriors over the shifts of each digit by up to this many pixels


Generators = dict[str, torch.Generator]  # a training's random streams by use: shift, elastic, cutout, dropout


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


def augmentation(cfg: TrainConfig, n: int, gens: Generators) -> tuple:
    """One mini-batch's random draws for ``n`` pairs: ``(offsets, fields, corners)``, each ``None`` when
    its augmentation is off (both engines draw them the same way, from the same generators)."""
    offsets = shift_offsets(n, cfg.shift, gens["shift"]) if cfg.shift else None
    fields = elastic_fields(n, cfg.elastic, cfg.elastic_sigma, gens["elastic"]) if cfg.elastic else None
    corners = cutout_corners(n, cfg.cutout, gens["cutout"]) if cfg.cutout else None
    return offsets, fields, corners


def augmented(x: torch.Tensor, cfg: TrainConfig, gens: Generators) -> torch.Tensor:
    """A mini-batch of pairs ``[n, 2, 14, 14]`` with its augmentations (the loop engine's), if any."""
    if not (cfg.shift or cfg.elastic or cfg.cutout):
        return x
    draws = [a.reshape(-1, *a.shape[2:]) if a is not None else None for a in augmentation(cfg, len(x), gens)]
    return augment(x.reshape(-1, 14, 14), *draws, cfg.cutout).view_as(x)


def dropout_mask(shape: tuple[int, ...], p: float, g: torch.Generator) -> torch.Tensor:
    """Inverted dropout's multiplier: 0 with probability ``p``, else ``1 / (1 - p)``; from ``g``, so both
    engines drop the same units."""
    return (torch.rand(shape, generator=g) >= p).float().div_(1 - p)


def shifted_views(radius: int) -> list[tuple[int, int]]:
    """The (rows, columns) offsets that test-time augmentation averages over: every shift by up to
    ``radius`` pixels, the image itself first."""
    r = range(-radius, radius + 1)
    return sorted(((i, j) for i in r for j in r), key=lambda o: (o != (0, 0), o))


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
    gens: Generators | None = None,
) -> TrainResult:
    """Train ``model`` in place on the device its parameters live on; data is moved there once.

    ``g`` orders the mini-batches; ``gens`` draws the augmentations and the dropout masks (needed when
    ``cfg`` turns them on). With ``cfg.ema`` the model ends with the moving average of its weights.
    """
    check_hparams(arch, cfg, len(inputs))
    gens = gens or {}
    uses = {"shift": cfg.shift, "elastic": cfg.elastic, "cutout": cfg.cutout, "dropout": cfg.dropout}
    missing = [k for k, on in uses.items() if on and k not in gens]
    if missing:
        raise ValueError(f"this training needs its random generators {missing} (gens).")
    device = next(model.parameters()).device
    inputs, target, classes = inputs.to(device), target.to(device), classes.to(device)
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )
    names = weight_names(model)
    params = dict(model.named_parameters())
    weights = [params[n] for n in names]
    n, bs = len(inputs), int(cfg.batch_size)
    steps = cfg.epochs * ((n + bs - 1) // bs)
    norms = torch.zeros(steps, len(names), device=device) if record_grad_norms else None
    average = EMA(model, cfg.ema) if cfg.ema else None
    dropped = Dropout(model, cfg.dropout, gens.get("dropout"))
    epoch_loss = []
    model.train()
    step = 0
    for _ in range(cfg.epochs):
        order = epoch_order(n, cfg.shuffle, g).to(device)
        total = torch.zeros((), device=device)
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            x = augmented(inputs[idx], cfg, gens)
            dropped.draw(len(idx) * (2 if arch == "siamese" else 1))
            loss = loss_fn(arch, model(x), target[idx], classes[idx], cfg.w2, cfg.w10, cfg.label_smoothing)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            if norms is not None:
                norms[step] = torch.stack(torch._foreach_norm([w.grad for w in weights]))
            opt.param_groups[0]["lr"] = cfg.lr * lr_factor(cfg, step, steps)
            opt.step()
            if average:
                average.update(model)
            total += loss.detach() * len(idx)
            step += 1
        epoch_loss.append(float(total) / n)
    dropped.remove()
    if average:
        model.load_state_dict(average.state)
    return TrainResult(epoch_loss, names, norms.cpu() if norms is not None else None)


class EMA:
    """An exponential moving average of a model's state (weights and batch-norm statistics), updated
    after every step as ``avg += (1 - decay) * (current - avg)`` from the initial state: the model a
    training with ``ema`` keeps and scores. Both engines update with the same elementwise formula."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.weight = 1 - decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.state[k].lerp_(v, self.weight)
            else:
                self.state[k].copy_(v)  # num_batches_tracked


class Dropout:
    """Dropout on the digit classifier's input (``branch.fc2``), with masks from an explicit generator:
    :meth:`draw` makes the next forward use a fresh mask for ``rows`` inputs (each siamese digit is a
    row). Off (no hook) when ``p`` is 0 or the model is in eval mode."""

    def __init__(self, model: nn.Module, p: float, g: torch.Generator | None) -> None:
        self.p, self.g, self.mask, self.hook = p, g, None, None
        self.width = model.branch.fc2.in_features
        if p:
            self.hook = model.branch.fc2.register_forward_pre_hook(self._apply)

    def draw(self, rows: int) -> None:
        if self.p:
            self.mask = dropout_mask((rows, self.width), self.p, self.g)

    def _apply(self, module: nn.Module, args: tuple) -> tuple | None:
        if not module.training:
            return None
        return (args[0] * self.mask.to(args[0].device),)

    def remove(self) -> None:
        if self.hook is not None:
            self.hook.remove()


@torch.no_grad()
def evaluate(
    model: nn.Module, arch: str, inputs: torch.Tensor, target: torch.Tensor, classes: torch.Tensor, tta: int = 0
) -> dict[str, float]:
    """Accuracies of a model in eval mode; with ``tta``, of its posteriors averaged over the shifted
    views of every digit (:func:`shifted_views`, :func:`average_posteriors`).

    pair: ``accuracy``. siamese: ``comparison_accuracy`` (the 2-way head),
    ``digit_comparison_accuracy`` (argmax d1 <= argmax d2) and ``digit_accuracy``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    inputs = inputs.to(device)
    if tta:
        n = len(inputs)
        views = []
        for view in shifted_views(tta):
            offsets = torch.tensor(view).expand(2 * n, 2)
            views.append(model(shift_images(inputs.reshape(-1, 14, 14), offsets).view_as(inputs)))
        out = average_posteriors(views)
    else:
        out = model(inputs)
    target, classes = target.to(device), classes.to(device)
    model.train(was_training)
    if arch == "pair":
        return {"accuracy": fraction(out.argmax(1) == target)}
    return siamese_scores(out[0], out[1], target, classes)


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
