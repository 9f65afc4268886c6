"""One trial = one model variant trained on one draw; the unit every stage and executor runs, and what
either engine leaves of it (:class:`Outcome`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, astuple, dataclass

from digitpairs.core.seeding import generator
from digitpairs.core.variants import VARIANTS
from digitpairs.training.models import ModelConfig, build_model
from digitpairs.training.semantics import Generators, TrainConfig, TrainResult

import torch
from torch import nn

RANDOM_USES = ("shift", "elastic", "cutout", "dropout")


@dataclass(frozen=True)
class Trial:
    """Everything that determines one training's result."""

    variant: str
    model: ModelConfig
    train: TrainConfig
    draw: int
    seed: int

    def init_generator(self) -> torch.Generator:
        """Initial weights depend on seed, draw and architecture only: trials that differ by lr or
        loss weights start from the same weights, which makes their comparison less noisy."""
        return generator(self.seed, "init", self.draw, astuple(self.model))

    def shuffle_generator(self) -> torch.Generator:
        """Mini-batch order depends on seed and draw only (common random numbers across configs)."""
        return generator(self.seed, "shuffle", self.draw)

    def generators(self) -> Generators:
        """The random streams of the augmentations and the dropout masks (:data:`RANDOM_USES`), each
        keyed by its use, seed and draw only, like the mini-batch order: turning one on or changing
        its strength leaves the others' draws as they were."""
        return {use: generator(self.seed, use, self.draw) for use in RANDOM_USES}

    def key(self) -> str:
        """Stable hash of the full configuration (for checkpoints and resumption)."""
        blob = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_trial(variant: str, widths: dict, train_cfg: TrainConfig, draw: int, seed: int) -> Trial:
    """A trial of ``variant``, with the variant's loss weights (the loss-weight sweep overrides them
    with ``dataclasses.replace``)."""
    v = VARIANTS[variant]
    cfg = TrainConfig(**{**asdict(train_cfg), "w2": v.w2, "w10": v.w10})
    return Trial(variant, ModelConfig(arch=v.arch, **widths), cfg, draw, seed)


@dataclass
class Outcome:
    """What one finished trial leaves, whichever engine trained it."""

    trial: Trial
    scores: dict[str, dict[str, float]]  # per split ("val", "test"): evaluate()'s accuracies
    result: TrainResult | None = None  # epoch losses, gradient norms
    state: dict[str, torch.Tensor] | None = None  # final state_dict on the CPU
    weights: str | None = None  # models.weights_digest(state), kept when the state is not

    def model(self) -> nn.Module:
        """The trained model, rebuilt from ``state``."""
        net = build_model(self.trial.model, torch.Generator())
        net.load_state_dict(self.state)
        return net.eval()
