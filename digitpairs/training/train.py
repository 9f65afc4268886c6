"""The per-model loop engine: one ``nn.Module`` trained and scored at a time, the reference arithmetic.

It computes what :mod:`digitpairs.training.semantics` defines, with PyTorch's own layers and
``torch.optim.SGD``; the lockstep engine (:mod:`digitpairs.training.lockstep`) computes the same for many
models at once, and the tests hold the two to the same results.
"""

from __future__ import annotations

from digitpairs.data.pairs import Draw, split
from digitpairs.training.models import build_model, weight_names
from digitpairs.training.semantics import (
    Generators,
    TrainConfig,
    TrainResult,
    augment,
    augmentation,
    average_posteriors,
    check_hparams,
    dropout_mask,
    epoch_order,
    fraction,
    loss_fn,
    lr_factor,
    shift_images,
    shifted_views,
    siamese_scores,
    step_count,
)
from digitpairs.training.trials import Outcome, Trial

import torch
from torch import nn


def run_trial(
    trial: Trial,
    draw: Draw,
    device: torch.device | str = "cpu",
    record_grad_norms: bool = False,
) -> Outcome:
    """Build, train and score one trial with the per-model loop; scores are per split."""
    model = build_model(trial.model, trial.init_generator()).to(device)
    x, t, c = split(draw, "train")
    result = train(
        model,
        trial.model.arch,
        x,
        t,
        c,
        trial.train,
        trial.shuffle_generator(),
        record_grad_norms,
        trial.generators(),
    )
    scores = {s: evaluate(model, trial.model.arch, *split(draw, s), tta=trial.train.tta) for s in ("val", "test")}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return Outcome(trial, scores, result, state)


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
    _check_generators(cfg, gens)
    device = next(model.parameters()).device
    inputs, target, classes = inputs.to(device), target.to(device), classes.to(device)
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )
    names = weight_names(model)
    params = dict(model.named_parameters())
    weights = [params[n] for n in names]
    n, bs = len(inputs), int(cfg.batch_size)
    steps = step_count(cfg, n)
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


def _check_generators(cfg: TrainConfig, gens: Generators) -> None:
    """Refuse a training whose augmentations or dropout have no random stream to draw from."""
    uses = {"shift": cfg.shift, "elastic": cfg.elastic, "cutout": cfg.cutout, "dropout": cfg.dropout}
    missing = [k for k, on in uses.items() if on and k not in gens]
    if missing:
        raise ValueError(f"this training needs its random generators {missing} (gens).")


def augmented(x: torch.Tensor, cfg: TrainConfig, gens: Generators) -> torch.Tensor:
    """A mini-batch of pairs ``[n, 2, 14, 14]`` with its augmentations (the loop engine's), if any."""
    if not (cfg.shift or cfg.elastic or cfg.cutout):
        return x
    draws = [a.reshape(-1, *a.shape[2:]) if a is not None else None for a in augmentation(cfg, len(x), gens)]
    return augment(x.reshape(-1, 14, 14), *draws, cfg.cutout).view_as(x)


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
