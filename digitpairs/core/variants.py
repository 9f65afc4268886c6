"""The reported model variants: a fact the training, the evaluation and the figures share.

The study's three are selected on its cross-validation grid; the fourth, siamese-plus, is siamese-10's
network and decision (the two digits' argmaxes) with the recipe's training (params.yaml ``recipe``),
selected by the ``recipe`` stage.

Plain data with no torch import, so the figures stage does not depend on the training code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Variant:
    """A reported model variant: an architecture, its loss weights and the accuracy that scores it."""

    name: str
    arch: str
    w2: float
    w10: float
    metric: str
    in_grid: bool = True  # selected on the cross-validation grid (the study's variants)


PLUS = "siamese-plus"
VARIANTS = {
    v.name: v
    for v in (
        Variant("pair", "pair", 1.0, 0.0, "accuracy"),
        Variant("siamese-2", "siamese", 1.0, 10**-0.5, "comparison_accuracy"),
        Variant("siamese-10", "siamese", 0.0, 1.0, "digit_comparison_accuracy"),
        Variant(PLUS, "siamese", 0.0, 1.0, "digit_comparison_accuracy", in_grid=False),
    )
}
# siamese-plus's ablation: the row of the full recipe, and the row of none of its additions
ALL_ADDITIONS, NO_ADDITIONS = "all additions", "none (the study's SGD)"
# siamese-plus's additions to the study's training, in the ablation's row order: the name of the row that
# drops one, its key (in params.yaml's recipe section and TrainConfig) and the study's value of that key
# (batch_size: train.batch_size). The recipe makes an addition when its value differs from the study's.
ADDITIONS = (
    ("no momentum", "momentum", 0.0),
    ("no Nesterov", "nesterov", False),
    ("no weight decay", "weight_decay", 0.0),
    ("constant lr", "schedule", "constant"),
    ("no label smoothing", "label_smoothing", 0.0),
    ("no shifts", "shift", 0),
    ("no elastic distortions", "elastic", 0.0),
    ("batch size {}", "batch_size", None),
    ("no cutout", "cutout", 0),
    ("no dropout", "dropout", 0.0),
    ("no weight averaging", "ema", 0.0),
    ("no test-time shifts", "tta", 0),
)
STUDY_VARIANTS = tuple(v.name for v in VARIANTS.values() if v.in_grid)
# the architectures of the grid, one cross-validation stage and table each (cv@pair, cv@siamese)
GRID_ARCHS = tuple(dict.fromkeys(v.arch for v in VARIANTS.values() if v.in_grid))


def variants_of(arch: str) -> list[Variant]:
    """The study's variants trained with architecture ``arch`` on the grid (pair: one; siamese: two)."""
    return [v for v in VARIANTS.values() if v.arch == arch and v.in_grid]


def variant_score(variant: str, scores: dict[str, float]) -> float:
    """The accuracy that the study reports for ``variant`` from an ``evaluate`` result."""
    return scores[VARIANTS[variant].metric]


def additions(recipe: Mapping[str, Any], study_batch_size: int) -> list[tuple[str, str, Any]]:
    """The :data:`ADDITIONS` that ``recipe`` (params.yaml's recipe section, or a training's settings)
    makes: ``(ablation row, key, the study's value)`` each, in the ablation's order."""
    made = []
    for row, key, study in ADDITIONS:
        if key == "batch_size":
            row, study = row.format(study_batch_size), study_batch_size
        if recipe[key] != study:
            made.append((row, key, study))
    return made
