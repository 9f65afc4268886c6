"""scripts/ablation_draws.py on the tiny pipeline: the recipe stage's ablation on more draws, the first
draws' rows reused from the stage's checkpoint, every row paired over all the draws, Holm-corrected;
a number of draws the data does not have is one line, not a traceback."""

from __future__ import annotations

import json
import sys

from digitpairs.core.variants import ALL_ADDITIONS
from tests.e2e import sh


def test_more_draws_reuse_the_stage_and_correct_for_the_rows(tiny_repo):
    repo = tiny_repo  # TINY: data.n_draws 2, recipe.n_draws 1
    cp = sh(repo, sys.executable, "scripts/ablation_draws.py", "2")
    rows = json.loads((repo / "results/ablation/ablation.json").read_text())
    prov = json.loads((repo / "results/ablation/provenance.json").read_text())
    n_rows = prov["trials"] // 2
    assert f"ablation: resumed {n_rows} of {2 * n_rows} trials" in cp.stderr  # draw 0: the stage's
    assert {r["change_n"] for r in rows.values()} == {2}
    tested = [r for name, r in rows.items() if name != ALL_ADDITIONS]
    assert tested and all(r["change_p_t"] <= r["change_p_holm"] <= 1 for r in tested)
    assert "change_p_holm" not in rows[ALL_ADDITIONS]


def test_more_draws_than_the_data_has_is_one_line(tiny_built):
    folder = tiny_built / "results/ablation"  # the committed results (the project's), left as they are
    before = {f.name: f.read_bytes() for f in folder.glob("*")}
    cp = sh(tiny_built, sys.executable, "scripts/ablation_draws.py", "3", check=False)
    assert cp.returncode == 1 and "Traceback" not in cp.stderr, cp.stderr
    last = cp.stderr.strip().splitlines()[-1]
    assert last == "error: recipe.n_draws=3 exceeds data.n_draws=2; lower it or draw more pairs."
    assert {f.name: f.read_bytes() for f in folder.glob("*")} == before
