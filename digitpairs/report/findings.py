"""What the study's numbers establish: each claim as an effect with a 95% CI and p-values, Holm-corrected
over the family, plus what selecting on the test set costs and what each addition of siamese-plus earns.

Differences are in accuracy (fractions; docs/findings.md and the figure show points). Every claim is paired
over the same draws (or, for batch norm and skip connections, over grid configurations that differ only
in that switch, on the same draw), except the test-selection gap, which compares disjoint draws (Welch), or,
where cross-validation used every draw, leaves each draw out in turn (paired over the draws left out).
"""

from __future__ import annotations

from pathlib import Path

from digitpairs.core.io import read_cv_tables
from digitpairs.core.params import GRID_KEYS
from digitpairs.core.paths import CV_DIR
from digitpairs.core.stats import holm, mean_std, paired, welch
from digitpairs.core.variants import ALL_ADDITIONS, PLUS, STUDY_VARIANTS, VARIANTS

import pandas as pd

# slug -> what it compares (figure and docs/findings.md label)
CLAIMS = {
    "sharing_digits": "siamese-10 vs pair (weight sharing, digit loss)",
    "sharing_aux": "siamese-2 vs pair (weight sharing, auxiliary loss)",
    "aux_loss": "siamese-2 vs its control without auxiliary loss",
    "plus": "siamese-plus vs siamese-10 (the recipe)",
    **{f"batch_norm_{v}": f"batch norm on vs off, {v}" for v in STUDY_VARIANTS},
    **{f"skip_{v}": f"skip connections on vs off, {v}" for v in STUDY_VARIANTS},
    **{f"test_selection_{v}": f"test-selected, reported vs unseen draws, {v}" for v in STUDY_VARIANTS},
}
# ablation.csv column of each decision rule
RULE_COLUMN = {"digit_comparison_accuracy": "argmax", "digit_posterior_accuracy": "posterior"}
OTHER_RULE = {"argmax": "posterior decision", "posterior": "argmax decision"}


def _by_draw(frame: pd.DataFrame, column: str) -> pd.Series:
    return frame.set_index("draw")[column].sort_index()


def pair_over_draws(a: pd.Series, b: pd.Series) -> dict:
    """``paired`` on the draws both series hold (they are indexed by draw)."""
    common = a.index.intersection(b.index)
    if len(common) == 0:
        raise ValueError("no draw in common to pair")
    return paired(a.loc[common].to_numpy(), b.loc[common].to_numpy())


def switch_effect(cv: pd.DataFrame, variant: str, switch: str) -> dict:
    """Switch on - off, paired over (every other grid value, draw) of ``variant``'s CV rows.

    The pairs share draws, so they are not independent: the CI and p-value are optimistic by the
    correlation between configurations of one draw (docs/findings.md says so)."""
    rows = cv[cv["variant"] == variant]
    others = [k for k in GRID_KEYS if k != switch] + ["draw"]
    on = rows[rows[switch].astype(str).str.lower() == "true"].set_index(others)["score"]
    off = rows[rows[switch].astype(str).str.lower() == "false"].set_index(others)["score"]
    common = on.index.intersection(off.index)
    return paired(on.loc[common].to_numpy(), off.loc[common].to_numpy())


def test_selection(cv: pd.DataFrame, controls: pd.DataFrame, variant: str) -> dict:
    """The original's protocol for ``variant``: the configuration with the best mean test accuracy on the
    CV draws reports that mean; the same configuration's test accuracy on draws CV never saw is what it
    is worth. Returns Welch's comparison (reported - unseen) and both means; where CV used every draw,
    :func:`left_out`'s comparison instead."""
    unseen = controls[(controls["kind"] == "test_selected") & (controls["variant"] == variant)]
    rows = cv[cv["variant"] == variant]
    if unseen.empty:  # cv.n_draws = data.n_draws, as in the original's study: no draw is unseen
        return left_out(rows)
    config = unseen.iloc[0][list(GRID_KEYS)]
    same = (rows[list(GRID_KEYS)].astype(str) == config.astype(str).to_numpy()).all(axis=1)
    reported = rows.loc[same, "test_accuracy"]
    result = welch(reported.to_numpy(), unseen["test_accuracy"].to_numpy())
    return result | {"reported": _mean(reported), "unseen": _mean(unseen["test_accuracy"])}


def left_out(rows: pd.DataFrame) -> dict:
    """Test selection where cross-validation used every draw: each draw in turn is left out, the configuration
    with the best mean test accuracy over the other draws reports that mean (first in grid order on ties),
    and its test accuracy on the draw left out is what it is worth. Paired over the draws left out; the
    folds share draws, so the CI and p-values are approximate."""
    reported, unseen = [], []
    draws = sorted(rows["draw"].unique())
    for d in draws if len(draws) > 1 else []:
        means = rows[rows["draw"] != d].groupby(list(GRID_KEYS), sort=False)["test_accuracy"].mean()
        held = rows[rows["draw"] == d].set_index(list(GRID_KEYS))["test_accuracy"]
        reported.append(float(means.max()))
        unseen.append(float(held.loc[means.idxmax()]))
    means = {k: float(sum(v) / len(v)) if v else None for k, v in (("reported", reported), ("unseen", unseen))}
    return paired(reported, unseen) | means


def _mean(values: pd.Series) -> float | None:
    """A mean for JSON: None when there is nothing to average (JSON has no NaN)."""
    return float(values.mean()) if len(values) else None


def claims(cv: pd.DataFrame, scores: pd.DataFrame, controls: pd.DataFrame) -> dict[str, dict]:
    """Every claim of :data:`CLAIMS`, with Holm's correction over all of them (t-test and Wilcoxon
    p-values each corrected as one family)."""
    acc = {v: _by_draw(scores[scores["variant"] == v], "accuracy") for v in VARIANTS}
    no_aux = _by_draw(controls[controls["kind"] == "no_aux"], "test_accuracy")
    out = {
        "sharing_digits": pair_over_draws(acc["siamese-10"], acc["pair"]),
        "sharing_aux": pair_over_draws(acc["siamese-2"], acc["pair"]),
        "aux_loss": pair_over_draws(acc["siamese-2"], no_aux),
        "plus": pair_over_draws(acc[PLUS], acc["siamese-10"]),
    }
    for v in STUDY_VARIANTS:
        out[f"batch_norm_{v}"] = switch_effect(cv, v, "batch_norm")
        out[f"skip_{v}"] = switch_effect(cv, v, "skip_connections")
    for v in STUDY_VARIANTS:
        out[f"test_selection_{v}"] = test_selection(cv, controls, v)
    add_holm(out, ("p_t", "p_wilcoxon"))
    return {s: out[s] for s in CLAIMS}


def add_holm(rows: dict[str, dict], p_keys: tuple[str, ...]) -> None:
    """Add ``<key>_holm`` to every row for each of ``p_keys``: each test's p-values one family over
    the rows; a row without that p-value (untested) gets None."""
    for p_key in p_keys:
        tested = [name for name, row in rows.items() if row.get(p_key) is not None]
        for row in rows.values():
            row[f"{p_key}_holm"] = None
        for name, p in zip(tested, holm([rows[n][p_key] for n in tested]), strict=True):
            rows[name][f"{p_key}_holm"] = p


def ablation(table: pd.DataFrame) -> dict[str, dict]:
    """Validation accuracy of siamese-plus without each addition, by its decision rule, and the change
    from the full recipe paired by draw, Holm-corrected over the rows; one more row applies the other
    decision rule to the full recipe."""
    rule = RULE_COLUMN[VARIANTS[PLUS].metric]
    full = table[table["ablation"] == ALL_ADDITIONS]
    base = _by_draw(full, rule)
    out = {}
    rows = [(name, _by_draw(g, rule)) for name, g in table.groupby("ablation", sort=False)]
    rows.append((OTHER_RULE[rule], _by_draw(full, "posterior" if rule == "argmax" else "argmax")))
    for name, values in rows:
        mean, std = mean_std(values)
        out[name] = {"val_mean": mean, "val_std": std} | {
            f"change_{k}": v for k, v in pair_over_draws(values, base).items()
        }
    add_holm({n: row for n, row in out.items() if n != ALL_ADDITIONS}, ("change_p_t", "change_p_wilcoxon"))
    out[ALL_ADDITIONS] |= {"change_p_t_holm": None, "change_p_wilcoxon_holm": None}
    return out


def compute(root: Path) -> dict:
    """findings.json from the pipeline's files under ``root``."""
    root = Path(root)
    cv = read_cv_tables(root / CV_DIR)
    scores = pd.read_csv(root / "models_out" / "test_scores.csv")
    controls = pd.read_csv(root / "data" / "controls.csv")
    table = pd.read_csv(root / "data" / "recipe" / "ablation.csv")
    return {"claims": claims(cv, scores, controls), "ablation": ablation(table)}
