"""The study's aggregation formulas, in one place for the stages, the figures and the tests."""

from __future__ import annotations

import math

import pandas as pd


def mean_std(values: pd.Series) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single value) of accuracies over draws."""
    v = values.astype(float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def group_error(stds: pd.Series) -> float:
    """Error bar of a mean of group means, as in the original: sqrt(sum of stds squared) / n."""
    s = stds.astype(float)
    return math.sqrt(float((s**2).sum())) / len(s)


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t distribution (bisection on its CDF; no SciPy needed).

    The CDF integrates the density with Simpson's rule, accurate to ~1e-10 for df >= 1.
    """

    def density(x: float) -> float:
        c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
        return math.exp(c - (df + 1) / 2 * math.log1p(x * x / df))

    def cdf(x: float, n: int = 4000) -> float:
        h = x / n
        s = density(0) + density(x) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, n))
        return 0.5 + s * h / 3

    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def ci95(values: pd.Series) -> tuple[float, float]:
    """95% confidence interval of the mean over draws (Student t); a single draw gives [x, x]."""
    mean, std = mean_std(values)
    n = len(values)
    if n < 2:
        return mean, mean
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
    return mean - half, mean + half
