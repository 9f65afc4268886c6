"""The report of a complete full-grid run (scripts/full_grid.py publish): the stages' outputs with the run's
params.yaml and its own dvc.lock, the cross-validation summary, and what the full grid changes against the
default subset and against the earlier partial GPU run."""

from __future__ import annotations

import gzip
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

from digitpairs.core.io import finite_or_null, read_cv_tables, write_csv, write_json
from digitpairs.core.variants import GRID_ARCHS, STUDY_VARIANTS
from digitpairs.training import study

import numpy as np
import pandas as pd

DIMENSIONS = {"nbch1": ("nbch1",), "nbch2": ("nbch2",), "nbfch": ("nbfch",), "lr": ("lr",),
              "BN/skip": ("batch_norm", "skip_connections")}  # fmt: skip
KEEP = ("records", "earlier-gpu")  # in the destination, not the publish's: the run's records, the earlier run
METRICS, FINDINGS = "models_out/metrics.json", "models_out/findings.json"  # a run's, as against_default reads them
LARGEST = 1 << 20  # bytes: a larger file is committed gzip-compressed (no timestamp: reproducible bytes)
SCORES = ("score", "val_accuracy", "test_accuracy")  # a CV row's scores, compared trial by trial
SIGNIFICANT = 0.05  # Holm-corrected t-test p below which a finding counts as established


def comparison(other: pd.DataFrame, full: pd.DataFrame, names: tuple[str, str] = ("default", "full")) -> dict:
    """What the full grid changes against another grid's CV table (the default subset's, the earlier run's):
    each variant's selected configuration, the value each cross-validation figure peaks at, and the ranking
    of the variants; keyed by ``names``."""
    out: dict = {"dimensions": list(DIMENSIONS), "variants": {}, "ranking": {}}
    for name, cv in zip(names, (other, full), strict=True):
        means = cv.groupby(["variant", *study.CONFIG_KEYS])["score"].mean().reset_index()
        selected = study.select(cv)
        out["ranking"][name] = list(means.groupby("variant")["score"].mean().sort_values(ascending=False).index)
        for variant in STUDY_VARIANTS:
            v, sel = out["variants"].setdefault(variant, {"best": {d: {} for d in DIMENSIONS}}), selected[variant]
            v[name] = {"config": {k: sel[k] for k in study.CONFIG_KEYS}, "score": sel["score_mean"]}
            for dim, keys in DIMENSIONS.items():
                best = means[means["variant"] == variant].groupby(list(keys))["score"].mean().idxmax()
                v["best"][dim][name] = "/".join(("on" if b else "off") if isinstance(b, bool | np.bool_) else f"{b:g}"
                                                for b in (best if isinstance(best, tuple) else (best,)))  # fmt: skip
    return out


def shared_trials(other: pd.DataFrame, full: pd.DataFrame) -> dict:
    """The trials of another run's CV table (the default subset's) that the full grid trained too (same variant,
    configuration and draw): how many, and those whose scores differ (none where a trial is the same bytes)."""
    keys = ["variant", *study.CONFIG_KEYS, "draw"]
    both = other.merge(full, on=keys, suffixes=("_other", "_full"))
    same = np.logical_and.reduce([both[f"{c}_other"] == both[f"{c}_full"] for c in SCORES])
    return {"trials": len(other), "in_full_grid": len(both), "scores_equal": int(same.sum()),
            "differ": both.loc[~same, keys].to_dict("records")}  # fmt: skip


def complete(cv: pd.DataFrame) -> pd.DataFrame:
    """The rows of the combinations (configuration and variant) that have every draw: a partial run's."""
    counts = cv.groupby([*study.CONFIG_KEYS, "variant"])["draw"].transform("count")
    return cv[counts == counts.max()]


def cv_summary(cv: pd.DataFrame) -> pd.DataFrame:
    """Per combination and variant, as the original's tables: the mean and std (ddof 1) over the draws of the
    selection score and of the test accuracy."""
    g = cv.groupby(["variant", *study.CONFIG_KEYS], sort=False)
    out = g.agg(score_mean=("score", "mean"), score_std=("score", "std"), test_mean=("test_accuracy", "mean"),
                test_std=("test_accuracy", "std"), n_draws=("draw", "count"))  # fmt: skip
    return out.reset_index()


def missing_default(default: Path) -> list[str]:
    """The default run's outputs that the comparison reads and the workspace ``default`` lacks."""
    names = [f"data/cv/{arch}.csv" for arch in GRID_ARCHS] + [METRICS, FINDINGS]
    return [name for name in names if not (default / name).exists()]


def against_default(full: Path, default: Path) -> dict:
    """The default subset's run (a workspace: ``default``) against the full one (``full``, as published):
    each variant's configuration and final test accuracy, and each finding, on both."""
    metrics = [json.loads((d / METRICS).read_text()) for d in (default, full)]
    claims = [json.loads((d / FINDINGS).read_text())["claims"] for d in (default, full)]
    accuracy = {}
    for v in metrics[1]:
        a, b = (m[v] for m in metrics)
        accuracy[v] = {"same_config": a["config"] == b["config"], "difference": b["accuracy_mean"] - a["accuracy_mean"],
                       **{name: {k: m[k] for k in ("config", "accuracy_mean", "ci95_low", "ci95_high", "n_draws")}
                          for name, m in (("default", a), ("full", b))}}  # fmt: skip
    findings = {}
    for c in claims[1]:
        rows = {name: {k: cl[c].get(k) for k in ("mean", "ci95_low", "ci95_high", "p_t_holm", "n")}
                for name, cl in zip(("default", "full"), claims, strict=True)}  # fmt: skip
        for r in rows.values():
            r["established"] = r["p_t_holm"] is not None and r["p_t_holm"] < SIGNIFICANT
        findings[c] = rows | {"moved": rows["default"]["established"] != rows["full"]["established"]}
    return {"accuracy": accuracy, "findings": findings}


def compress_large(dest: Path) -> None:
    """Every published file over :data:`LARGEST` as ``NAME.gz`` instead (dvc.lock hashes the uncompressed
    bytes: ``gunzip`` gives them back)."""
    large = [f for f in sorted(dest.rglob("*")) if f.is_file() and f.stat().st_size > LARGEST
             and f.relative_to(dest).parts[0] not in KEEP]  # fmt: skip
    for f in large:
        f.with_name(f.name + ".gz").write_bytes(gzip.compress(f.read_bytes(), mtime=0))
        f.unlink()


def read_published_cv(folder: Path) -> pd.DataFrame:
    """The CV tables of a published folder (``folder/<arch>.csv``), each as committed: a file over
    :data:`LARGEST` is ``NAME.gz`` (:func:`compress_large`)."""
    return read_cv_tables(folder, lambda f: pd.read_csv(f if f.exists() else f"{f}.gz"))


def write(dest: Path, tar: tarfile.TarFile, default: Path, earlier: Path | None) -> None:
    """``dest`` anew (but :data:`KEEP`): the complete run's outputs, params.yaml and dvc.lock from the last
    piece's archive ``tar``; the CV summary; the comparison with the ``default`` subset's run (a workspace
    holding its outputs) and with the ``earlier`` partial GPU run (its published folder), if given. Written
    beside ``dest`` first: a publish that fails leaves ``dest`` as it was."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-") as tmp:
        new = Path(tmp)
        tar.extractall(new, filter="data")
        full = read_cv_tables(new / "data/cv")
        write_csv(cv_summary(full), new / "cv_summary.csv")
        default_cv = read_cv_tables(default / "data/cv")
        comp = {"default": comparison(default_cv, full) | against_default(new, default)}
        comp["default"]["shared_trials"] = shared_trials(default_cv, full)
        if earlier:
            gpu = complete(read_published_cv(earlier / "cv"))
            comp["earlier_gpu"] = comparison(gpu, full, ("earlier_gpu", "full"))
        write_json(finite_or_null(comp), new / "comparison.json")
        compress_large(new)
        swap(new, dest)


def swap(new: Path, dest: Path) -> None:
    """``new``'s entries in place of ``dest``'s (but :data:`KEEP`), dvc.lock last: a folder with a dvc.lock
    is a published run (scripts/readme.py), so one cut short is not taken for one: the old dvc.lock goes
    first, the new one last."""
    olds = sorted((f for f in (dest.iterdir() if dest.exists() else []) if f.name not in KEEP),
                  key=lambda f: f.name != "dvc.lock")  # fmt: skip
    for old in olds:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    dest.mkdir(exist_ok=True)
    for f in sorted(new.iterdir(), key=lambda f: f.name == "dvc.lock"):
        f.rename(dest / f.name)
