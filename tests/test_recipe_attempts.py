"""scripts/recipe_attempts.py on the tiny pipeline: each attempt is the committed recipe with one change,
on the same draws, the recipe's rows reused from the stage's checkpoint, every attempt paired by draw with
the recipe and Holm-corrected; a number of draws the data does not have is one line, not a traceback."""

from __future__ import annotations

import json
import runpy
import sys

from digitpairs.core.variants import ALL_ADDITIONS

from tests.e2e import REPO, sh

SCRIPT = runpy.run_path(str(REPO / "scripts/recipe_attempts.py"))
ATTEMPTS, FRONTIER = SCRIPT["ATTEMPTS"], SCRIPT["FRONTIER"]


def test_attempts_pair_with_the_recipe_and_correct_for_the_rows(tiny_repo):
    repo = tiny_repo  # TINY: data.n_draws 2, recipe.n_draws 1, recipe.ablation_draws 1
    cp = sh(repo, sys.executable, "scripts/recipe_attempts.py", "2")
    rows = json.loads((repo / "results/recipe-attempts/attempts.json").read_text())
    prov = json.loads((repo / "results/recipe-attempts/provenance.json").read_text())
    assert prov["trials"] == 2 * (1 + len(ATTEMPTS)) + 2 * (len(FRONTIER) - 1)
    assert f"attempts: resumed 1 of {prov['trials']} trials" in cp.stderr  # the recipe on draw 0: the stage's
    assert set(rows) == {ALL_ADDITIONS, *ATTEMPTS, "posterior decision"}
    assert {r["change_n"] for r in rows.values()} == {2}
    tested = [r for name, r in rows.items() if name != ALL_ADDITIONS]
    assert all(r["change_p_t"] <= r["change_p_t_holm"] <= 1 for r in tested if r["change_p_t"] is not None)
    budgets = json.loads((repo / "results/recipe-attempts/frontier.json").read_text())
    epochs = [int(e) for e in budgets]
    assert epochs == [epochs[0] * f for f in FRONTIER] == prov["frontier_epochs"]
    assert budgets[str(epochs[0])]["val_mean"] == rows[ALL_ADDITIONS]["val_mean"]  # the recipe's own rows
    assert all(b["n"] == 2 and b["ci95_low"] <= b["val_mean"] <= b["ci95_high"] for b in budgets.values())
    assert all("change_mean" in budgets[str(e)] for e in epochs[1:])


def test_more_draws_than_the_data_has_is_one_line(tiny_built):
    folder = tiny_built / "results/recipe-attempts"  # the committed results (the project's), left as they are
    before = {f.name: f.read_bytes() for f in folder.glob("*")}
    cp = sh(tiny_built, sys.executable, "scripts/recipe_attempts.py", "3", check=False)
    assert cp.returncode == 1 and "Traceback" not in cp.stderr, cp.stderr
    last = cp.stderr.strip().splitlines()[-1]
    assert last == "error: recipe.ablation_draws=3 exceeds data.n_draws=2; lower it or draw more pairs."
    assert {f.name: f.read_bytes() for f in folder.glob("*")} == before
