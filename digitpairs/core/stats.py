"""The study's aggregation formulas and tests, in one place for the stages, the figures and the tests.

Distributions and tests come from ``scipy.stats``; Holm's correction, which SciPy lacks, is four lines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats


def mean_std(values: pd.Series) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single value) of accuracies over draws."""
    v = values.astype(float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def group_error(stds: pd.Series, divisor: int | None = None) -> float:
    """Error bar of a mean of group means: sqrt(sum of stds squared) / n, the standard error of a mean
    of n independent means. The original's code divides by the number of combinations in the whole
    grid instead (``divisor``), which gives bars several times smaller."""
    s = stds.astype(float)
    return math.sqrt(float((s**2).sum())) / (divisor or len(s))


def ci95(values: pd.Series) -> tuple[float, float]:
    """95% confidence interval of the mean over draws (Student t); a single draw gives [x, x]."""
    mean, std = mean_std(values)
    n = len(values)
    if n < 2:
        return mean, mean
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def _finite(x: float) -> float | None:
    """A float for JSON, or None where a test is undefined (JSON has no NaN)."""
    return float(x) if np.isfinite(x) else None


def _untested(mean: float | None, n: int) -> dict:
    return {"mean": mean, "ci95_low": None, "ci95_high": None, "p_t": None, "n": n}


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """``a - b`` paired element by element: mean difference, its 95% CI (Student t), and two-sided
    p-values of the paired t-test and of the Wilcoxon signed-rank test. ``n`` counts the pairs.

    Fewer than 2 pairs test nothing: CI and p are None; no pairs at all (a grid with one value of a
    switch) have no mean either: None, with ``n`` 0 (JSON has no NaN). Pairs that all differ by the
    same amount have a CI of that amount and a t-test p of 0 (or 1 if it is 0)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(d)
    mean = float(d.mean()) if n else None
    if n < 2:
        return _untested(mean, n) | {"p_wilcoxon": None}
    nonzero = d[d != 0]
    p_w = float(stats.wilcoxon(nonzero).pvalue) if len(nonzero) else 1.0
    if not d.std() > 1e-12:  # equal up to rounding (0.9 - 0.8 != 0.8 - 0.7 in binary)
        p = 1.0 if mean == 0 else 0.0
        return {"mean": mean, "ci95_low": mean, "ci95_high": mean, "p_t": p, "p_wilcoxon": p_w, "n": n}
    t = stats.ttest_1samp(d, 0.0)
    ci = t.confidence_interval(0.95)
    return {
        "mean": mean,
        "ci95_low": float(ci.low),
        "ci95_high": float(ci.high),
        "p_t": float(t.pvalue),
        "p_wilcoxon": p_w,
        "n": n,
    }


def welch(a: Sequence[float], b: Sequence[float]) -> dict:
    """Difference of the means of two independent samples ``a`` and ``b`` (Welch's t-test): mean
    difference, 95% CI and two-sided p; ``n`` is ``len(a) + len(b)``. With fewer than 2 values in a
    group, or no spread in either, CI and p are None (and the mean too if a group is empty)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    mean, n = (float(a.mean() - b.mean()) if len(a) and len(b) else None), len(a) + len(b)
    if len(a) < 2 or len(b) < 2 or not (a.std() > 1e-12 or b.std() > 1e-12):
        return _untested(mean, n)
    t = stats.ttest_ind(a, b, equal_var=False)
    ci = t.confidence_interval(0.95)
    return {"mean": mean, "ci95_low": _finite(ci.low), "ci95_high": _finite(ci.high), "p_t": _finite(t.pvalue), "n": n}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input's order: the k-th smallest
    p times (m - k + 1), capped at 1 and never below the one before."""
    m = len(pvalues)
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out
