"""The README's numbers are the committed result files' numbers (`scripts/readme.py` writes them)."""

from __future__ import annotations

import runpy

from tests.e2e import REPO

readme = runpy.run_path(str(REPO / "scripts/readme.py"))


def test_readme_tables_equal_the_result_files():
    text = (REPO / "README.md").read_text()
    assert readme["render"](text) == text, "README.md is stale: run `python scripts/readme.py`"


def test_a_hand_edited_number_is_caught():
    text = (REPO / "README.md").read_text()
    block = readme["results_block"]()
    first_row = next(line for line in block.splitlines() if line.startswith("| pair |"))
    edited = text.replace(first_row, first_row.replace("% ±", "1% ±", 1))
    assert edited != text
    assert readme["render"](edited) == text  # rendering restores the files' numbers


def test_a_hand_edited_finding_is_caught():
    text = (REPO / "README.md").read_text()
    row = next(
        line for line in readme["findings_block"]().splitlines() if line.startswith("| batch norm on vs off, pair")
    )
    edited = text.replace(row, row.replace("| +", "| +1", 1))
    assert edited != text
    assert readme["render"](edited) == text
