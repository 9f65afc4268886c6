"""The study's three model variants: a fact the training, the evaluation and the figures share.

Plain data with no torch import, so the figures stage does not depend on the training code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """A reported model variant: an architecture, its loss weights and the accuracy that scores it."""

    name: str
    arch: str
    w2: float
    w10: float
    metric: str


VARIANTS = {
    v.name: v
    for v in (
        Variant("pair", "pair", 1.0, 0.0, "accuracy"),
        Variant("siamese-2", "siamese", 1.0, 10**-0.5, "comparison_accuracy"),
        Variant("siamese-10", "siamese", 0.0, 1.0, "digit_comparison_accuracy"),
    )
}


def variants_of(arch: str) -> list[Variant]:
    """The variants trained with architecture ``arch`` (pair: one; siamese: two)."""
    return [v for v in VARIANTS.values() if v.arch == arch]


def variant_score(variant: str, scores: dict[str, float]) -> float:
    """The accuracy that the study reports for ``variant`` from an ``evaluate`` result."""
    return scores[VARIANTS[variant].metric]
