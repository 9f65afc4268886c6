"""The figures stage: files, the numbers behind them, byte-identical reruns and one-line input errors."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

from digitpairs.report import figures, findings

import pandas as pd
import pytest
import yaml
from PIL import Image, ImageStat

REPO = Path(__file__).resolve().parents[1]
CV_GRID = {
    "nbch1": [8, 16],
    "nbch2": [8],
    "nbfch": [64],
    "batch_norm": [True, False],
    "skip_connections": [False],
    "lr": [0.1, 1.0],
}


def _score(variant: str, combo: dict, draw: int) -> float:
    """A made-up but structured accuracy, so every bar and error bar differs."""
    base = {"pair": 0.70, "siamese-2": 0.80, "siamese-10": 0.85}[variant]
    return round(
        base + 0.01 * (combo["nbch1"] == 16) + 0.02 * combo["batch_norm"] - 0.03 * (combo["lr"] == 1.0) + 0.01 * draw, 6
    )


def write_inputs(root: Path, n_steps: int = 30) -> None:
    """Tiny inputs in the schemas the other stages write (see dvc.yaml), under ``root``."""
    (root / "data/cv").mkdir(parents=True, exist_ok=True)
    (root / "models_out").mkdir(parents=True, exist_ok=True)
    write_cv(root)
    write_loss_weights(root)
    write_grad_norms(root, n_steps)
    write_results(root)


def write_cv(root: Path) -> None:
    """data/cv/{pair,siamese}.csv: every combination of CV_GRID, two draws, scores from ``_score``."""
    for arch, variants in (("pair", ["pair"]), ("siamese", ["siamese-2", "siamese-10"])):
        rows = []
        for values in itertools.product(*CV_GRID.values()):
            combo = dict(zip(CV_GRID, values, strict=True))
            for variant, draw in itertools.product(variants, range(2)):
                s = _score(variant, combo, draw)
                rows.append(
                    {
                        "variant": variant,
                        "arch": arch,
                        **combo,
                        "draw": draw,
                        "score_on": "val",
                        "score": s,
                        "val_accuracy": s,
                        "test_accuracy": s - 0.01,
                    }
                )
        pd.DataFrame(rows).to_csv(root / f"data/cv/{arch}.csv", index=False)


def write_loss_weights(root: Path) -> None:
    """data/loss_weights.csv: three exponents and no auxiliary loss, three draws."""
    lw = []
    for e in [0, -1, -2, None]:
        w10 = 0.0 if e is None else 10.0**e
        for draw in range(3):
            s = 0.8 + 0.02 * draw + (0 if e is None else 0.01 * e)
            lw.append(
                {
                    "exponent": e,
                    "w2": 1.0,
                    "w10": w10,
                    "ratio": w10,
                    "draw": draw,
                    "score_on": "val",
                    "score": s,
                    "val_accuracy": s,
                    "test_accuracy": s,
                }
            )
    pd.DataFrame(lw).to_csv(root / "data/loss_weights.csv", index=False)


def write_grad_norms(root: Path, n_steps: int) -> None:
    """data/grad_norms.csv: per layer and step, norms falling with depth and step, with and without skips."""
    gn = []
    for variant, bn, skip in itertools.product(["pair", "siamese-2"], [True, False], [True, False]):
        layers = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"] + (["skip1.weight"] if skip else [])
        for step, (depth, layer) in itertools.product(range(n_steps), enumerate(layers)):
            gn.append(
                {
                    "variant": variant,
                    "arch": variant.split("-")[0],
                    "batch_norm": bn,
                    "skip_connections": skip,
                    "step": step,
                    "depth": depth,
                    "layer": f"branch.{layer}",
                    "norm": 10 ** (-depth - step / n_steps),
                }
            )
    pd.DataFrame(gn).to_csv(root / "data/grad_norms.csv", index=False)


def write_results(root: Path) -> None:
    """models_out/: metrics.json, findings.json, test_scores.csv and confusion.csv."""
    metrics = {
        v: {
            "accuracy_mean": m,
            "accuracy_std": 0.01,
            "ci95_low": m - 0.02,
            "ci95_high": m + 0.02,
            "n_draws": 3,
            "config": {},
        }
        for v, m in [("pair", 0.8), ("siamese-2", 0.9), ("siamese-10", 0.95), ("siamese-plus", 0.98)]
    }
    (root / "models_out/metrics.json").write_text(json.dumps(metrics))
    (root / "models_out/findings.json").write_text(json.dumps(synthetic_findings()))
    pd.DataFrame({"variant": ["pair"] * 3, "draw": range(3), "accuracy": [0.79, 0.8, 0.81]}).to_csv(
        root / "models_out/test_scores.csv", index=False
    )
    pd.DataFrame({"actual": [1, 2, 3, 3], "predicted": [1, 2, 3, 2]}).to_csv(
        root / "models_out/confusion.csv", index=False
    )


def synthetic_findings() -> dict:
    """findings.json with distinct effects per claim; the last claim untested (no CI, no p), as with 1 draw."""
    claims = {}
    for i, slug in enumerate(findings.CLAIMS):
        mean = 0.01 * i - 0.03
        claims[slug] = {"mean": mean, "ci95_low": mean - 0.01, "ci95_high": mean + 0.015, "n": 10}
        claims[slug] |= {"p_t": 0.002 * (i + 1), "p_t_holm": min(1.0, 0.02 * (i + 1))}
    claims[slug] |= {"ci95_low": None, "ci95_high": None, "p_t": None, "p_t_holm": None}
    return {"claims": claims, "ablation": {}}


def write_params(root: Path) -> None:
    """The project's params.yaml with a small dpi (the stage validates the whole file)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["figures"]["dpi"] = 60
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def run_stage(root: Path) -> subprocess.CompletedProcess:
    """The real stage script, in ``root`` (a folder holding params.yaml and the inputs)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "stages.figures"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("figs")
    write_inputs(root)
    write_params(root)
    r = run_stage(root)
    assert r.returncode == 0, r.stderr
    return root


def test_every_figure_is_a_readable_png_and_svg(made: Path):
    for name in figures.FIGURES:
        png, svg = made / f"plots/{name}.png", made / f"plots/{name}.svg"
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.size[0] >= 300 and im.size[1] >= 200, (name, im.size)
            stat = ImageStat.Stat(im.convert("L"))
            assert stat.stddev[0] > 20, f"{name}.png looks blank"
            assert len(im.convert("RGB").getcolors(1 << 24)) > 20, f"{name}.png has too few colours"
        root = ElementTree.parse(svg).getroot()
        assert root.tag.endswith("svg")
        assert len(root.findall(".//{http://www.w3.org/2000/svg}path")) > 20, f"{name}.svg draws too little"
    leftovers = [p.name for p in (made / "plots").iterdir() if "partial" in p.name]
    assert not leftovers


def test_the_readme_figure_is_a_copy_of_the_findings_figure(made: Path):
    """docs/figures/findings.png (git-tracked, shown by the README) holds plots/findings.png's bytes."""
    assert (made / "docs/figures/findings.png").read_bytes() == (made / "plots/findings.png").read_bytes()
    assert not list((made / "docs/figures").glob("*partial*"))


def _tiny_cv() -> pd.DataFrame:
    """Two draws of two combinations for pair at nbch1=8, one combination at nbch1=16."""
    rows = []
    base = {
        "variant": "pair",
        "arch": "pair",
        "nbch2": 8,
        "nbfch": 64,
        "batch_norm": True,
        "skip_connections": False,
        "score_on": "val",
    }
    for nbch1, lr, scores in [(8, 0.1, [0.6, 0.8]), (8, 1.0, [0.5, 0.5]), (16, 0.1, [0.9, 0.7])]:
        rows += [{**base, "nbch1": nbch1, "lr": lr, "draw": d, "score": s} for d, s in enumerate(scores)]
    return pd.DataFrame(rows)


def test_cv_table_is_spec_formula_by_hand():
    t = figures.cv_table(_tiny_cv(), ("nbch1",)).set_index("value")
    # nbch1=8: combination means 0.7 and 0.5, stds sqrt(0.02) and 0 -> bar 0.6, error sqrt(0.02 + 0) / 2
    assert t.loc["8", "mean"] == pytest.approx(0.6)
    assert t.loc["8", "err"] == pytest.approx(math.sqrt(0.02) / 2)
    assert t.loc["16", "mean"] == pytest.approx(0.8) and t.loc["16", "err"] == pytest.approx(math.sqrt(0.02))
    assert list(t["n"]) == [2, 1] and list(t.index) == ["8", "16"]  # numeric order, not text order
    bn = figures.cv_table(_tiny_cv(), ("batch_norm", "skip_connections"))
    assert list(bn["value"]) == ["BN on, skip off"] and bn["mean"].iloc[0] == pytest.approx((0.7 + 0.5 + 0.8) / 3)
    # the original's error bars: the same sums over the 3 combinations of the whole grid
    grid = figures.cv_table(_tiny_cv(), ("nbch1",), error_bars="grid").set_index("value")
    assert grid.loc["8", "err"] == pytest.approx(math.sqrt(0.02) / 3) and grid.loc["16", "err"] == pytest.approx(
        math.sqrt(0.02) / 3
    )


def test_drawn_bars_are_the_table(made: Path):
    """The heights and error bars in the figure are the tidy table's numbers, which come from the CSVs."""
    cv = pd.concat([pd.read_csv(made / f"data/cv/{a}.csv") for a in ("pair", "siamese")], ignore_index=True)
    table = figures.cv_table(cv, ("lr",))
    fig = figures.draw_cv(cv, "cv_lr")
    heights = sorted(round(p.get_height(), 9) for p in fig.axes[0].patches)
    assert heights == sorted(round(100 * m, 9) for m in table["mean"])
    summary = pd.read_csv(made / "plots/cv_summary.csv")
    lr = summary[summary["param"] == "lr"].reset_index(drop=True)
    pd.testing.assert_frame_equal(lr.drop(columns="value"), table.drop(columns="value"), check_dtype=False)
    # by hand from write_inputs: pair at lr=1.0 is 0.70 + 0.005 (nbch1) + 0.01 (batch norm) - 0.03 + 0.005 (draw)
    assert table.set_index(["value", "variant"]).loc[("1", "pair"), "mean"] == pytest.approx(0.69)


def test_loss_weight_and_final_accuracy_tables(made: Path):
    lw = figures.loss_weight_table(pd.read_csv(made / "data/loss_weights.csv"))
    assert list(lw["ratio"]) == [0.0, 0.01, 0.1, 1.0] and lw["label"].iloc[0] == "(1, 0)"
    assert lw["mean"].iloc[0] == pytest.approx(0.82) and lw["std"].iloc[0] == pytest.approx(0.02)  # 0.80 .82 .84
    acc = figures.final_accuracy_table(json.loads((made / "models_out/metrics.json").read_text()))
    assert list(acc["variant"]) == list(figures.VARIANTS)
    assert acc["low"].tolist() == pytest.approx([0.78, 0.88, 0.93, 0.96])
    fig = figures.draw_loss_weights(pd.read_csv(made / "data/loss_weights.csv"))
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == [0.01, 0.1, 1.0] and fig.axes[0].get_xscale() == "log"


def test_findings_figure_draws_every_claim_with_its_interval(made: Path):
    claims = json.loads((made / "models_out/findings.json").read_text())["claims"]
    table = figures.findings_table(claims)
    assert list(table["claim"]) == list(findings.CLAIMS)
    first = claims["sharing_digits"]
    assert table.loc[0, ["effect", "low", "high"]].tolist() == pytest.approx(
        [100 * first["mean"], 100 * first["ci95_low"], 100 * first["ci95_high"]]
    )
    assert table["p_holm"].iloc[:-1].notna().all() and math.isnan(table["p_holm"].iloc[-1])  # the untested claim
    fig = figures.draw_findings(claims)
    main_axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in main_axes] == list(figures.FINDING_PANELS)
    n_rows = [len(ax.get_yticks()) for ax in main_axes]
    assert sum(n_rows) == len(findings.CLAIMS)
    for ax in main_axes:  # every interval inside the visible x range, the zero line too
        low, high = ax.get_xlim()
        rows = table[table["panel"] == ax.get_title()]
        assert low <= min(rows["low"].min(), rows["effect"].min(), 0) and max(rows["high"].max(), 0) <= high


def test_grad_norm_panels_hold_every_tensor(made: Path):
    grad = pd.read_csv(made / "data/grad_norms.csv")
    fig = figures.draw_grad_norms(grad, "pair")
    axes = fig.axes
    assert len(axes) == 4 and all(ax.get_yscale() == "log" for ax in axes)
    assert [len(ax.lines) for ax in axes] == [4, 5, 4, 5]  # skip connections add a tensor
    first = grad[(grad["variant"] == "pair") & ~grad["batch_norm"] & ~grad["skip_connections"] & (grad["depth"] == 0)]
    assert list(axes[0].lines[0].get_ydata()) == pytest.approx(first.sort_values("step")["norm"].tolist())


@pytest.mark.system  # as tests/test_verify.py's full recompute shows for every output, the figures included
def test_rerun_gives_identical_bytes(made: Path, tmp_path: Path):
    again = tmp_path / "again"
    shutil.copytree(made, again, ignore=shutil.ignore_patterns("plots"))
    assert run_stage(again).returncode == 0
    names = sorted(p.name for p in (made / "plots").iterdir())
    assert names == sorted(p.name for p in (again / "plots").iterdir())
    for n in names:
        assert (made / "plots" / n).read_bytes() == (again / "plots" / n).read_bytes(), n


BREAKS = {
    "missing file": ("data/grad_norms.csv", None, "data/grad_norms.csv: file not found"),
    "empty file": ("data/loss_weights.csv", "", "data/loss_weights.csv: empty file"),
    "header only": ("data/cv/pair.csv", "header", "data/cv/pair.csv: no data rows"),
    "missing column": ("data/cv/siamese.csv", "drop:score", "data/cv/siamese.csv: missing column 'score'"),
    "metrics key": ("models_out/metrics.json", "metrics", "models_out/metrics.json: missing key 'siamese-10.ci95_low'"),
    "findings key": ("models_out/findings.json", "findings", "models_out/findings.json: missing key 'claims.plus.n'"),
}


def _break(root: Path, rel: str, how: str | None) -> None:
    path = root / rel
    if how is None:
        path.unlink()
    elif how == "header":
        path.write_text(path.read_text().splitlines()[0] + "\n")
    elif how.startswith("drop:"):
        pd.read_csv(path).drop(columns=how[5:]).to_csv(path, index=False)
    elif how == "findings":
        f = json.loads(path.read_text())
        del f["claims"]["plus"]["n"]
        path.write_text(json.dumps(f))
    elif how == "metrics":
        m = json.loads(path.read_text())
        del m["siamese-10"]["ci95_low"]
        path.write_text(json.dumps(m))
    else:
        path.write_text(how)


@pytest.mark.parametrize("case", list(BREAKS))
def test_bad_input_names_file_and_column_and_draws_nothing(case: str, tmp_path: Path):
    rel, how, message = BREAKS[case]
    write_inputs(tmp_path, n_steps=3)
    _break(tmp_path, rel, how)
    with pytest.raises(figures.FigureInputError) as err:
        figures.make_all(tmp_path, tmp_path / "plots", 60)
    assert str(err.value).startswith(f"{tmp_path}/{message}") and "\n" not in str(err.value)
    assert not (tmp_path / "plots").exists()


def test_stage_exit_code_and_one_line_error(tmp_path: Path):
    write_inputs(tmp_path, n_steps=3)
    write_params(tmp_path)
    _break(tmp_path, "data/cv/siamese.csv", "drop:score")
    r = run_stage(tmp_path)
    assert r.returncode != 0
    assert r.stderr.strip() == "error: data/cv/siamese.csv: missing column 'score'"
    assert not (tmp_path / "plots").exists()
