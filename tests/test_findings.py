"""The statistics behind findings.json, against cases computed by hand, and the findings themselves."""

from __future__ import annotations

import math

from digitpairs.core.stats import ci95, holm, paired, welch
from digitpairs.report import findings
from digitpairs.training.semantics import p_less_equal, shift_images

import pandas as pd
import pytest
import torch


def test_holm_by_hand():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> kept monotone: 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []


def test_paired_by_hand():
    # d = 0.5, 1, 0.5, 1.5: mean 0.875, sd sqrt(0.6875 / 3), t = 0.875 / (sd / 2) = 3.6556 on 3 df
    r = paired([1, 2, 3, 4.5], [0.5, 1, 2.5, 3])
    sd = math.sqrt(0.6875 / 3)
    half = 3.182446305284263 * sd / 2  # t(0.975, 3) from a table
    assert r["mean"] == pytest.approx(0.875) and r["n"] == 4
    assert (r["ci95_low"], r["ci95_high"]) == pytest.approx((0.875 - half, 0.875 + half))
    assert r["p_t"] == pytest.approx(0.03535, abs=1e-5)  # two-sided t-table value for t = 3.6556, 3 df
    assert r["p_wilcoxon"] == pytest.approx(2 / 16)  # all 4 signs positive: exact 2 * 2^-4


def test_paired_edge_cases():
    one = paired([0.9], [0.8])
    assert one["mean"] == pytest.approx(0.1) and one["ci95_low"] is None and one["p_t"] is None
    same = paired([0.9, 0.8, 0.7], [0.8, 0.7, 0.6])  # every pair differs by exactly 0.1
    assert (same["ci95_low"], same["ci95_high"]) == pytest.approx((0.1, 0.1)) and same["p_t"] == 0.0
    zero = paired([0.5, 0.6], [0.5, 0.6])
    assert zero["mean"] == 0 and zero["p_t"] == 1.0 and zero["p_wilcoxon"] == 1.0


def test_welch_by_hand():
    # a = 1, 2, 3 (var 1), b = 4, 6 (var 2): se = sqrt(1/3 + 2/2), df = se^4 / ((1/3)^2 / 2 + 1^2 / 1)
    r = welch([1, 2, 3], [4, 6])
    se = math.sqrt(1 / 3 + 1)
    df = se**4 / ((1 / 3) ** 2 / 2 + 1)
    from scipy.stats import t

    half = t.ppf(0.975, df) * se
    assert r["mean"] == -3 and r["n"] == 5
    assert (r["ci95_low"], r["ci95_high"]) == pytest.approx((-3 - half, -3 + half))
    assert r["p_t"] == pytest.approx(2 * t.sf(3 / se, df))
    assert welch([1.0], [2.0, 3.0])["p_t"] is None  # one value: no variance, no test


def test_ci95_uses_student_t():
    low, high = ci95(pd.Series([0.9, 0.92, 0.95]))
    sd = pd.Series([0.9, 0.92, 0.95]).std()
    half = 4.302652729749464 * sd / math.sqrt(3)  # t(0.975, 2) from a table
    assert (low, high) == pytest.approx((0.92333333 - half, 0.92333333 + half))


def cv_rows() -> pd.DataFrame:
    """Two configurations per switch value, two draws: batch norm adds 0.1 on draw 0 and 0.2 on draw 1."""
    rows = []
    for nbch1 in (8, 16):
        for bn in (True, False):
            for draw in (0, 1):
                score = 0.5 + 0.01 * nbch1 / 8 + (0.1 * (draw + 1) if bn else 0)
                rows.append(
                    dict(variant="pair", arch="pair", nbch1=nbch1, nbch2=8, nbfch=64, batch_norm=bn,
                         skip_connections=False, lr=0.1, draw=draw, score=score, test_accuracy=score - 0.05)
                )  # fmt: skip
    return pd.DataFrame(rows)


def test_switch_effect_pairs_configurations_that_differ_only_in_the_switch():
    r = findings.switch_effect(cv_rows(), "pair", "batch_norm")
    assert r["n"] == 4 and r["mean"] == pytest.approx(0.15)  # 0.1, 0.2, 0.1, 0.2


def test_test_selection_compares_the_reported_mean_with_unseen_draws():
    cv = cv_rows()
    # the original's choice: best mean test accuracy, nbch1 16 with batch norm: 0.52 + (0.1 + 0.2) / 2 - 0.05
    controls = pd.DataFrame(
        [dict(kind="test_selected", variant="pair", nbch1=16, nbch2=8, nbfch=64, batch_norm=True,
              skip_connections=False, lr=0.1, draw=d, test_accuracy=a) for d, a in ((2, 0.55), (3, 0.57))]
    )  # fmt: skip
    r = findings.test_selection(cv, controls, "pair")
    assert r["reported"] == pytest.approx(0.62) and r["unseen"] == pytest.approx(0.56)
    assert r["mean"] == pytest.approx(0.06) and r["n"] == 4


def test_test_selection_leaves_each_draw_out_where_cv_used_every_draw():
    """No draw is unseen (cv.n_draws = data.n_draws): each draw in turn is left out. Widths 8 and 16 on
    draws 0-2: leaving out 0 selects 16 (0.85 over draws 1, 2; worth 0.7 on draw 0), leaving out 1 selects
    8 (0.85; worth 0.7), leaving out 2 ties at 0.8 and keeps 8, the first in grid order (worth 0.8)."""
    acc = {8: (0.9, 0.7, 0.8), 16: (0.7, 0.9, 0.8)}
    cv = pd.DataFrame(
        [dict(variant="pair", arch="pair", nbch1=w, nbch2=8, nbfch=64, batch_norm=True, skip_connections=False,
              lr=0.1, draw=d, score=a, test_accuracy=a) for w, accs in acc.items() for d, a in enumerate(accs)]
    )  # fmt: skip
    r = findings.test_selection(cv, pd.DataFrame(columns=["kind", "variant"]), "pair")
    assert r["reported"] == pytest.approx(2.5 / 3) and r["unseen"] == pytest.approx(2.2 / 3)
    assert r["mean"] == pytest.approx(0.1) and r["n"] == 3 and r["p_wilcoxon"] is not None


def test_posterior_decision_by_hand():
    p1 = torch.zeros(10).index_fill_(0, torch.tensor([3, 5]), 0.5)  # digit 1: 3 or 5
    p2 = torch.zeros(10)
    p2[4], p2[6] = 0.7, 0.3  # digit 2: 4 or 6
    logits = torch.stack([p1, p2]).clamp_min(1e-30).log().unsqueeze(0)
    # P(d1 <= d2) = P(d1 = 3) + P(d1 = 5) P(d2 = 6) = 0.5 + 0.15
    assert p_less_equal(logits).item() == pytest.approx(0.65, abs=1e-6)


def test_shift_images_moves_pixels_and_repeats_the_edge():
    img = torch.arange(196.0).view(1, 14, 14)
    down_left = shift_images(img, torch.tensor([[1, -1]]))[0]
    assert torch.equal(down_left[1:, :-1], img[0, :-1, 1:])  # content one row down, one column left
    assert torch.equal(down_left[0, :-1], img[0, 0, 1:])  # the entering row repeats the edge row
    assert torch.equal(down_left[:, -1], torch.cat([img[0, :1, 13], img[0, :-1, 13]]))
    assert torch.equal(shift_images(img, torch.tensor([[0, 0]])), img)


def test_ablation_pairs_by_draw_and_holm_corrects_over_rows():
    """Each row's change is paired by draw with the full recipe (argmax: siamese-plus's rule); the
    p-values are Holm-corrected over the rows; one more row scores the full recipe by the posterior."""
    full = [0.98, 0.97, 0.99, 0.985]
    rows = {"all additions": full, "no shifts": [0.97, 0.955, 0.982, 0.97], "no momentum": [0.979, 0.97, 0.99, 0.984]}
    table = pd.DataFrame(
        [
            {"ablation": name, "draw": d, "lr": 0.1, "argmax": acc, "posterior": acc + 0.001 * (d == 0)}
            for name, accs in rows.items()
            for d, acc in enumerate(accs)
        ]
    )
    out = findings.ablation(table)
    assert list(out) == [*rows, "posterior decision"]
    assert out["no shifts"]["change_mean"] == pytest.approx(-0.012)  # (-0.01 - 0.015 - 0.008 - 0.015) / 4
    assert out["posterior decision"]["change_mean"] == pytest.approx(0.00025)
    tested = [n for n in out if n != "all additions"]
    adjusted = holm([out[n]["change_p_t"] for n in tested])
    assert [out[n]["change_p_t_holm"] for n in tested] == pytest.approx(adjusted)
    assert all(out[n]["change_p_t_holm"] >= out[n]["change_p_t"] for n in tested)
    assert out["all additions"]["change_p_t_holm"] is None
