"""README.md and docs/: their numbers are the committed result files' numbers (`scripts/readme.py` writes
them), their links lead somewhere, the README stays a newcomer's page, and `dvc metrics show` prints the
headline only."""

from __future__ import annotations

import json
import re
from pathlib import Path
from runpy import run_path

import pytest
import yaml

from tests.e2e import REPO, dvc

readme = run_path(str(REPO / "scripts/readme.py"))
PAGES = readme["pages"]()
# pages that other work adds (issue 20: docs/clusters.md); a link to one is checked once it exists
PENDING = {REPO / "docs/clusters.md"}


def page_id(p: Path) -> str:
    return str(p.relative_to(REPO))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_number_block_equals_the_result_files(page: Path):
    text = page.read_text()
    assert readme["render"](text) == text, f"{page_id(page)} is stale: run `python scripts/readme.py`"


def test_every_block_is_in_exactly_one_page():
    placement = readme["placement"]({p: p.read_text() for p in PAGES})
    assert {name: len(found) for name, found in placement.items()} == dict.fromkeys(readme["BLOCKS"], 1)


def test_a_hand_edited_number_is_caught():
    text = (REPO / "README.md").read_text()
    block = readme["results_block"]()
    first_row = next(line for line in block.splitlines() if line.startswith("| pair |"))
    edited = text.replace(first_row, first_row.replace("% ±", "1% ±", 1))
    assert edited != text
    assert readme["render"](edited) == text  # rendering restores the files' numbers


def test_a_hand_edited_finding_is_caught():
    text = (REPO / "docs/findings.md").read_text()
    row = next(
        line for line in readme["findings_block"]().splitlines() if line.startswith("| batch norm on vs off, pair")
    )
    edited = text.replace(row, row.replace("| +", "| +1", 1))
    assert edited != text
    assert readme["render"](edited) == text


def test_a_hand_edited_timing_is_caught():
    text = (REPO / "README.md").read_text()
    seconds = json.loads((REPO / "results/timings.json").read_text())["cold_repro"]["wall_s"]
    assert f"{seconds} s" in readme["repro_time_block"]()
    edited = text.replace(f"took {seconds} s", f"took {seconds - 100} s", 1)
    assert edited != text
    assert readme["render"](edited) == text


README_LINES = 150  # at most: the README stays a page that one reads through


def test_the_readme_starts_with_the_quick_start_and_stays_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_LINES, len(lines)
    start = lines.index("## Quick start")
    assert start < 40 and "make repro" in "\n".join(lines[start : start + 6])
    assert any(line.startswith("![") and "docs/figures/findings.png" in line for line in lines)


# [text](target) outside code; images too. Autolinks and bare URLs are not checked.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # fenced code
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    return LINK.findall(text)


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped except '-' and '_', spaces to '-'."""
    ids = set()
    for line in page.read_text().splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            ids.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return ids


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_link_leads_to_a_file_and_heading(page: Path):
    found = links(page)
    assert found or page.name != "README.md"
    for target in found:
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.is_relative_to(REPO), f"{page_id(page)}: {target} leaves the repository"
        if dest in PENDING and not dest.exists():
            continue
        assert dest.exists(), f"{page_id(page)}: {target} does not exist"
        if anchor:
            assert dest.suffix == ".md" and anchor in anchors(dest), f"{page_id(page)}: no heading #{anchor} in {path}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in links(REPO / "README.md")}
    assert set(PAGES[1:]) | PENDING <= linked


def test_the_link_check_catches_a_broken_link(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nSee [a](missing.md), [b](#title) and `[c](ignored.md)`.\n")
    assert links(page) == ["missing.md", "#title"]
    assert "title" in anchors(page) and not (tmp_path / "missing.md").exists()


def test_the_one_declared_metric_is_the_headline_and_the_detail_stays_in_git():
    """The one declared metric is the test accuracy per variant; metrics.json and findings.json are
    git-tracked outputs that `dvc metrics diff --targets` reads; the README's figure is in git too."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    declared = [next(iter(m)) for s in stages.values() for m in s.get("metrics", [])]
    assert declared == ["models_out/test_accuracy.json"]
    uncached = {
        next(iter(o)): name
        for name, s in stages.items()
        for o in s.get("outs", []) + s.get("metrics", [])
        if isinstance(o, dict) and next(iter(o.values())).get("cache") is False
    }
    assert uncached == {
        "models_out/metrics.json": "evaluate",
        "models_out/test_accuracy.json": "evaluate",
        "models_out/findings.json": "findings",
        "docs/figures/findings.png": "figures",
    }
    headline = json.loads((REPO / "models_out/test_accuracy.json").read_text())
    metrics = json.loads((REPO / "models_out/metrics.json").read_text())
    assert headline == {v: m["accuracy_mean"] for v, m in metrics.items()}


def test_dvc_metrics_show_and_diff_fit_120_columns():
    show = dvc(REPO, "metrics", "show", COLUMNS="120").stdout
    assert show.split()[0] == "Path" and "models_out/test_accuracy.json" in show and "claims" not in show, show
    # the documented command for the effects: one row per value
    diff = dvc(REPO, "metrics", "diff", "--all", "--targets", "models_out/findings.json", COLUMNS="120").stdout
    assert "claims.plus.mean" in diff, diff
    for out in (show, diff):
        assert max(map(len, out.splitlines())) <= 120, out
