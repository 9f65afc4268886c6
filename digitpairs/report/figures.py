"""The study's figures (SPEC "Figures of the original", plus test accuracy) and the tidy tables behind them.

Every figure is drawn from a small table computed here (``cv_table``, ``loss_weight_table``, ...), so the
tests can check the plotted numbers against hand-computed values, and the same tables are written as CSVs
under ``plots/`` for ``dvc plots show``/``diff``. Inputs are all read and checked before anything is
drawn, so bad input fails with one line naming the file and the column, and leaves no figure behind.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; also keeps the output independent of the machine's backend

from digitpairs.core.io import read_cv_tables, replacing, write_csv  # noqa: E402
from digitpairs.core.params import GRID_KEYS  # noqa: E402
from digitpairs.core.paths import CV_DIR  # noqa: E402
from digitpairs.core.stats import group_error, mean_std  # noqa: E402
from digitpairs.core.variants import VARIANTS as ALL_VARIANTS  # noqa: E402
from digitpairs.report.findings import CLAIMS  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

VARIANTS = tuple(ALL_VARIANTS)
# Okabe-Ito: distinguishable under the common colour-vision deficiencies.
OKABE_ITO = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#F0E442")
VARIANT_COLORS = {"pair": "#0072B2", "siamese-2": "#E69F00", "siamese-10": "#009E73", "siamese-plus": "#CC79A7"}
VARIANT_HATCH = {"pair": "", "siamese-2": "//", "siamese-10": "..", "siamese-plus": "xx"}  # a cue besides colour

GRID = GRID_KEYS
CV_COLUMNS = ("variant", "arch", *GRID, "draw", "score_on", "score")
LOSS_COLUMNS = ("exponent", "w2", "w10", "ratio", "draw", "score_on", "score")
GRAD_COLUMNS = ("variant", "batch_norm", "skip_connections", "step", "depth", "layer", "norm")
METRIC_KEYS = ("accuracy_mean", "ci95_low", "ci95_high", "n_draws")

# name of the figure -> (grouping columns, x-axis label)
CV_FIGURES: dict[str, tuple[tuple[str, ...], str]] = {
    "cv_nbch1": (("nbch1",), "nbch1: channels of the 3x3 convolution"),
    "cv_nbch2": (("nbch2",), "nbch2: channels of the 6x6 convolution"),
    "cv_nbfch": (("nbfch",), "nbfch: hidden units of the fully connected layer"),
    "cv_bn_skip": (("batch_norm", "skip_connections"), "batch normalization / skip connections"),
    "cv_lr": (("lr",), "learning rate of SGD"),
}
GRAD_FIGURES = {"grad_norms_pair": "pair", "grad_norms_siamese": "siamese-2"}
FIGURES = (*CV_FIGURES, *GRAD_FIGURES, "loss_weights", "test_accuracy", "findings")
FINDING_KEYS = ("mean", "ci95_low", "ci95_high", "p_t_holm", "n")
# the findings figure's panels: title -> slug prefixes of the claims it holds
FINDING_PANELS = {
    "Model variants, test pairs (paired by draw)": ("sharing_", "aux_loss", "plus"),
    "Switches on the CV grid, validation pairs (paired by configuration and draw)": ("batch_norm_", "skip_"),
    "Selecting on the test set as the original did (Welch, disjoint draws)": ("test_selection_",),
}


class FigureInputError(ValueError):
    """An input of the figures stage is unusable; the message names the file and the column or key."""


def read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """A CSV with at least ``columns`` and one row, or a one-line ``FigureInputError`` saying what is wrong."""
    if not path.is_file():
        raise FigureInputError(f"{path}: file not found")
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise FigureInputError(f"{path}: empty file (no header, no rows)") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise FigureInputError(f"{path}: missing column {', '.join(repr(c) for c in missing)}")
    if df.empty:
        raise FigureInputError(f"{path}: no data rows (header only)")
    for c in ("score", "norm", "ratio", "step", "depth", "draw"):
        if c in columns and not pd.api.types.is_numeric_dtype(df[c]):
            raise FigureInputError(f"{path}: column {c!r} is not numeric")
    return df


def _read_json(path: Path, names, keys: tuple[str, ...], section: str | None = None) -> dict[str, dict]:
    """A JSON result file (or its ``section``), checked to hold ``keys`` under every one of ``names``;
    otherwise a one-line ``FigureInputError`` naming the file and the first missing key."""
    if not path.is_file():
        raise FigureInputError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FigureInputError(f"{path}: not valid JSON ({err.msg})") from None
    prefix = f"{section}." if section else ""
    if section:
        data = data.get(section) if isinstance(data, dict) else None
    for name in names:
        for k in keys:
            if not isinstance(data, dict) or not isinstance(data.get(name), dict) or k not in data[name]:
                raise FigureInputError(f"{path}: missing key '{prefix}{name}.{k}'")
    return data


def read_metrics(path: Path) -> dict[str, dict]:
    """models_out/metrics.json, checked to hold every variant with the keys the test-accuracy figure draws."""
    return _read_json(path, VARIANTS, METRIC_KEYS)


def read_findings(path: Path) -> dict[str, dict]:
    """models_out/findings.json's claims, checked to hold every claim with the keys the findings figure draws."""
    return _read_json(path, CLAIMS, FINDING_KEYS, section="claims")


def _as_bool(s: pd.Series) -> pd.Series:
    """True/False columns, whether pandas parsed them as bools or kept them as text."""
    return s.map(lambda x: x if isinstance(x, bool) else str(x).strip().lower() == "true")


def _label(keys: tuple[str, ...], value: tuple) -> str:
    if keys == ("batch_norm", "skip_connections"):
        return f"BN {'on' if value[0] else 'off'}, skip {'on' if value[1] else 'off'}"
    return f"{value[0]:g}"


def cv_table(cv: pd.DataFrame, keys: tuple[str, ...], error_bars: str = "group") -> pd.DataFrame:
    """SPEC's marginal view of the grid: one row per (value of ``keys``, variant).

    Per grid combination (and arch, variant): mean and std of ``score`` over draws (``mean_std``). A group's
    ``mean`` is the mean of its members' means, its ``err`` is ``group_error`` of their stds (SPEC's formula),
    divided by the group's size or, with ``error_bars="grid"`` as in the original's code, by the number of
    combinations of the variant's whole grid.
    """
    cv = cv.assign(batch_norm=_as_bool(cv["batch_norm"]), skip_connections=_as_bool(cv["skip_connections"]))
    combos = []
    for key, s in cv.groupby(["arch", "variant", *GRID], sort=True)["score"]:
        m, sd = mean_std(s)
        combos.append({**dict(zip(["arch", "variant", *GRID], key, strict=True)), "mean": m, "std": sd})
    combo = pd.DataFrame(combos)
    rows = []
    for order, (value, members) in enumerate(combo.groupby(list(keys), sort=True)):
        for variant in VARIANTS:
            g = members[members["variant"] == variant]
            if g.empty:
                continue
            divisor = int((combo["variant"] == variant).sum()) if error_bars == "grid" else None
            mean, err = float(g["mean"].mean()), group_error(g["std"], divisor)
            rows.append(
                {
                    "param": "/".join(keys),
                    "value": _label(keys, value),
                    "order": order,
                    "variant": variant,
                    "mean": mean,
                    "err": err,
                    "low": mean - err,
                    "high": mean + err,
                    "n": len(g),
                }
            )
    return pd.DataFrame(rows)


def loss_weight_table(lw: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over draws of the siamese-2 accuracy per loss-weight pair, sorted by ratio w10/w2."""
    rows = []
    for (w2, w10), s in lw.groupby(["w2", "w10"], sort=True):
        first = lw.loc[s.index[0]]
        m, sd = mean_std(s["score"])
        exp = first["exponent"]
        rows.append(
            {
                "exponent": "" if pd.isna(exp) else f"{float(exp):g}",
                "w2": float(w2),
                "w10": float(w10),
                "ratio": float(first["ratio"]),
                "label": "(1, 0)" if float(w10) == 0 else f"(1, 10^{float(exp):g})" if not pd.isna(exp) else "",
                "mean": m,
                "std": sd,
                "low": m - sd,
                "high": m + sd,
                "n_draws": len(s),
            }
        )
    return pd.DataFrame(rows).sort_values("ratio", kind="stable").reset_index(drop=True)


def final_accuracy_table(metrics: dict[str, dict]) -> pd.DataFrame:
    """Test accuracy per variant with its 95% CI, as the evaluate stage computed it (``stats.ci95``)."""
    rows = []
    for order, v in enumerate(VARIANTS):
        m = metrics[v]
        rows.append(
            {
                "param": "test accuracy (95% CI)",
                "value": v,
                "order": order,
                "variant": v,
                "mean": float(m["accuracy_mean"]),
                "err": (float(m["ci95_high"]) - float(m["ci95_low"])) / 2,
                "low": float(m["ci95_low"]),
                "high": float(m["ci95_high"]),
                "n": int(m["n_draws"]),
            }
        )
    return pd.DataFrame(rows)


def findings_table(claims: dict[str, dict]) -> pd.DataFrame:
    """One row per claim, in points: effect, 95% CI, Holm-corrected p of the t-test, pairs, panel."""
    rows = []
    for slug, label in CLAIMS.items():
        c = claims[slug]
        panel = next(t for t, prefixes in FINDING_PANELS.items() if slug.startswith(prefixes))
        untested = c["ci95_low"] is None or c["p_t_holm"] is None  # fewer than 2 draws: no CI, no test
        rows.append(
            {
                "panel": panel,
                "claim": slug,
                "label": label,
                "effect": float("nan") if c["mean"] is None else 100 * float(c["mean"]),  # no pairs: no effect
                "low": float("nan") if untested else 100 * float(c["ci95_low"]),
                "high": float("nan") if untested else 100 * float(c["ci95_high"]),
                "p_holm": float("nan") if untested else float(c["p_t_holm"]),
                "n": int(c["n"]),
            }
        )
    return pd.DataFrame(rows)


def grad_table(grad: pd.DataFrame, variant: str) -> pd.DataFrame:
    """The gradient-norm rows of one variant, sorted as drawn (panel, depth, step)."""
    g = grad[grad["variant"] == variant].copy()
    g["batch_norm"], g["skip_connections"] = _as_bool(g["batch_norm"]), _as_bool(g["skip_connections"])
    return g.sort_values(["batch_norm", "skip_connections", "depth", "step"], kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------- drawing


def _score_label(frame: pd.DataFrame) -> str:
    on = sorted(set(frame["score_on"].astype(str)))
    split = {"val": "validation", "test": "test"}
    return " / ".join(split.get(s, s) for s in on)


def _bars(table: pd.DataFrame, xlabel: str, ylabel: str, title: str, note: str) -> Figure:
    """Grouped bars (groups = values, bars = variants) with error bars from ``low``/``high``; y in percent."""
    fig, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
    values = table.drop_duplicates("value").sort_values("order")["value"].tolist()
    variants = [v for v in VARIANTS if v in set(table["variant"])]
    width = 0.8 / max(table.groupby("value")["variant"].nunique())
    x: dict[tuple[str, str], float] = {}  # bars centred on their group, whatever variants it holds
    for j, value in enumerate(values):
        present = [v for v in variants if ((table["value"] == value) & (table["variant"] == v)).any()]
        x |= {(value, v): j + (i - (len(present) - 1) / 2) * width for i, v in enumerate(present)}
    for variant in variants:
        t = table[table["variant"] == variant]
        xs = [x[(value, variant)] for value in t["value"]]
        mean = 100 * t["mean"]
        err = [100 * (t["mean"] - t["low"]), 100 * (t["high"] - t["mean"])]
        ax.bar(
            xs,
            mean,
            width * 0.95,
            label=variant,
            color=VARIANT_COLORS[variant],
            hatch=VARIANT_HATCH[variant],
            edgecolor="white",
            linewidth=0.5,
        )
        ax.errorbar(xs, mean, yerr=err, fmt="none", ecolor="black", elinewidth=1, capsize=3)
    ax.set_xticks(range(len(values)), values)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    fig.suptitle(title)
    ax.set_title(note, fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.legend(loc="outside lower center", ncol=len(variants), title="model variant", frameon=False)
    return fig


ERROR_BAR_NOTE = {
    "group": "error bar: sqrt(Σ std²) / n, n = combinations in the group",
    "grid": "error bar: sqrt(Σ std²) / N, N = combinations in the grid (the original's)",
}


def draw_cv(cv: pd.DataFrame, name: str, error_bars: str = "group") -> Figure:
    keys, xlabel = CV_FIGURES[name]
    split = _score_label(cv)
    return _bars(
        cv_table(cv, keys, error_bars),
        xlabel,
        f"mean {split} accuracy (%)",
        f"Cross-validation: accuracy by {xlabel.split(':')[0]}",
        f"bar: mean of the member combinations' means over draws; {ERROR_BAR_NOTE[error_bars]}",
    )


def draw_test_accuracy(metrics: dict[str, dict]) -> Figure:
    t = final_accuracy_table(metrics)
    n = ", ".join(sorted({str(x) for x in t["n"]}))
    return _bars(
        t,
        "model variant (selected configuration)",
        "test accuracy (%)",
        "Final test accuracy of each model variant",
        f"bar: mean over {n} draws; error bar: 95% confidence interval (Student t)",
    )


def draw_grad_norms(grad: pd.DataFrame, variant: str) -> Figure:
    """2x2 panels (batch_norm x skip_connections), one log-scale line per weight tensor, coloured by tensor."""
    g = grad_table(grad, variant)
    # network order: a tensor's depth with every optional layer present (skip connections add tensors)
    layers = sorted(set(g["layer"]), key=lambda name: (int(g.loc[g["layer"] == name, "depth"].max()), name))
    styles = {
        name: (OKABE_ITO[i % len(OKABE_ITO)], ("-", "--", ":", "-.")[i // len(OKABE_ITO) % 4])
        for i, name in enumerate(layers)
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), sharex=True, sharey=True, layout="constrained")
    handles: dict[str, object] = {}
    for r, bn in enumerate((False, True)):
        for c, skip in enumerate((False, True)):
            ax = axes[r][c]
            panel = g[(g["batch_norm"] == bn) & (g["skip_connections"] == skip)]
            for name, rows in panel.groupby("layer", sort=False):
                color, ls = styles[name]
                (line,) = ax.plot(rows["step"], rows["norm"], color=color, linestyle=ls, linewidth=0.9)
                handles.setdefault(name, line)
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"batch norm {'on' if bn else 'off'}, skip connections {'on' if skip else 'off'}")
            if not len(panel):
                ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center")
            ax.grid(alpha=0.3, which="major")
            if r == 1:
                ax.set_xlabel("mini-batch (step)")
            if c == 0:
                ax.set_ylabel("L2 norm of the gradient (log)")
    depth_of = g.groupby("layer")["depth"].agg(lambda d: "/".join(str(x) for x in sorted(set(d.astype(int)))))
    labels = [f"depth {depth_of[n]}: {n}" for n in layers if n in handles]
    fig.legend(
        [handles[n] for n in layers if n in handles],
        labels,
        loc="outside lower center",
        ncol=min(4, len(labels)),
        title="weight tensor (depth: name; a/b = depth without/with skip connections)",
        frameon=False,
        fontsize="small",
    )
    fig.suptitle(f"Gradient norm of every weight tensor per mini-batch, {variant} model")
    return fig


def draw_loss_weights(lw: pd.DataFrame) -> Figure:
    """Accuracy against w10/w2 on a log axis; the (1, 0) point (ratio 0) drawn as a dashed reference line."""
    t = loss_weight_table(lw)
    split = _score_label(lw)
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    pos, zero = t[t["ratio"] > 0], t[t["ratio"] <= 0]
    ax.errorbar(
        pos["ratio"],
        100 * pos["mean"],
        yerr=100 * pos["std"],
        color=VARIANT_COLORS["siamese-2"],
        marker="o",
        capsize=3,
        label="(w2, w10) = (1, 10^e): mean ± std over draws",
    )
    for _, z in zero.iterrows():
        ax.axhline(100 * z["mean"], color=OKABE_ITO[5], linestyle="--", label="(w2, w10) = (1, 0): no auxiliary loss")
        ax.axhspan(100 * z["low"], 100 * z["high"], color=OKABE_ITO[5], alpha=0.12, linewidth=0)
    ax.set_xscale("log")
    ax.set_xlabel("auxiliary weight ratio w10 / w2 (log scale)")
    ax.set_ylabel(f"{split} accuracy (%)")
    fig.suptitle("Siamese model: comparison-head accuracy against auxiliary loss weight")
    ax.set_title("loss = w2·CE(comparison) + w10·(CE(digit 1) + CE(digit 2)), selected configuration", fontsize="small")
    ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside lower center", frameon=False, ncol=1)
    return fig


def draw_findings(claims: dict[str, dict]) -> Figure:
    """A forest plot: one row per claim, its effect in points with the 95% CI, a panel per kind of
    comparison (each with its own scale), filled where Holm's p < 0.05; pairs and p on the right."""
    t = findings_table(claims)
    panels = list(FINDING_PANELS)
    heights = [int((t["panel"] == p).sum()) + 1.5 for p in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(10, 0.4 * sum(heights) + 1), layout="constrained", height_ratios=heights
    )
    for ax, panel in zip(axes, panels, strict=True):
        rows = t[t["panel"] == panel].reset_index(drop=True)
        y = list(range(len(rows)))[::-1]
        for yi, r in zip(y, rows.itertuples(), strict=True):
            tested = r.p_holm == r.p_holm  # not NaN
            ax.errorbar(
                r.effect,
                yi,
                xerr=[[r.effect - r.low], [r.high - r.effect]] if tested else None,
                fmt="o",
                capsize=3,
                color="black",
                markerfacecolor="black" if tested and r.p_holm < 0.05 else "white",
            )
        ax.axvline(0, color=OKABE_ITO[4], linewidth=1)
        ax.set_yticks(y, rows["label"])
        ax.set_ylim(-0.6, len(rows) - 0.4)
        right = ax.twinx()
        right.set_ylim(ax.get_ylim())
        stats = [
            f"n={r.n}, p={r.p_holm:.2g}" if r.p_holm == r.p_holm else f"n={r.n}, untested" for r in rows.itertuples()
        ]
        right.set_yticks(y, stats, fontsize="small")
        ax.set_title(panel, fontsize="medium")
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("difference in accuracy (percentage points), with its 95% CI")
    fig.suptitle("The study's claims tested (filled: p < 0.05 after Holm's correction; p: Holm, t-test)")
    return fig


# ---------------------------------------------------------------- files

SVG_SALT = "digitpairs"  # fixed ids in SVGs, so reruns give identical bytes


def save(fig: Figure, out: Path, name: str, dpi: int) -> None:
    """PNG and SVG of ``fig`` without timestamps or version stamps, each written to a temp name then renamed."""
    for ext, metadata in (("png", {"Software": None}), ("svg", {"Date": None, "Creator": None})):
        with (
            replacing(out / f"{name}.{ext}") as tmp,
            matplotlib.rc_context({"svg.hashsalt": SVG_SALT, "svg.fonttype": "path"}),
        ):
            fig.savefig(tmp, format=ext, dpi=dpi, metadata=metadata)
    plt.close(fig)


HEADLINE = "findings"  # the figure the README shows: every tested claim at a glance


def make_all(root: Path, out: Path, dpi: int, error_bars: str = "group", headline: Path | None = None) -> list[Path]:
    """Read and check every input file under ``root``, then write the ten figures and the tidy CSVs to
    ``out``; with ``headline``, also a byte-for-byte copy of ``out/findings.png`` there (the README's
    figure, in git). ``dpi`` and ``error_bars`` are params, checked with the rest (core.params)."""
    cv = read_cv_tables(root / CV_DIR, lambda path: read_csv(path, CV_COLUMNS))
    lw = read_csv(root / "data/loss_weights.csv", LOSS_COLUMNS)
    grad = read_csv(root / "data/grad_norms.csv", GRAD_COLUMNS)
    metrics = read_metrics(root / "models_out/metrics.json")
    claims = read_findings(root / "models_out/findings.json")
    draws: dict[str, Callable[[], Figure]] = {name: (lambda n=name: draw_cv(cv, n, error_bars)) for name in CV_FIGURES}
    draws |= {name: (lambda v=v: draw_grad_norms(grad, v)) for name, v in GRAD_FIGURES.items()}
    draws |= {"loss_weights": lambda: draw_loss_weights(lw), "test_accuracy": lambda: draw_test_accuracy(metrics)}
    draws["findings"] = lambda: draw_findings(claims)
    plt.rcdefaults()
    for name, draw in draws.items():
        save(draw(), out, name, dpi)

    summary = pd.concat(
        [cv_table(cv, keys, error_bars) for keys, _ in CV_FIGURES.values()] + [final_accuracy_table(metrics)],
        ignore_index=True,
    )
    write_csv(summary, out / "cv_summary.csv")
    write_csv(loss_weight_table(lw), out / "loss_weights.csv")
    write_csv(findings_table(claims), out / "findings.csv")
    if headline is not None:
        with replacing(headline) as tmp:
            shutil.copyfile(out / f"{HEADLINE}.png", tmp)
    return [out / f"{n}.{e}" for n in FIGURES for e in ("png", "svg")]


def vendor_js(path: Path) -> Path:
    """Write one classic-script bundle of Vega, Vega-Lite and Vega-Embed (globals ``vega``, ``vegaLite``,
    ``vegaEmbed``) from the pinned vl-convert-python wheel, so ``dvc plots show`` pages render offline.

    Vega-Lite 5 matches the ``$schema`` of DVC's built-in templates. Rewritten only when the text changes.
    """
    import vl_convert

    text = vl_convert.javascript_bundle(vl_version="5.21")
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        with replacing(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return path
