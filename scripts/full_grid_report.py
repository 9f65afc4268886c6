"""The report of a full-grid run (scripts/full_grid.py publish): the grid's cross-validation tables
from its checkpointed trials, finished or not, and what the full grid changes against the default subset."""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from digitpairs.core.io import finite_or_null, write_csv, write_json
from digitpairs.core.variants import GRID_ARCHS, STUDY_VARIANTS
from digitpairs.training import study
from digitpairs.training.trials import Outcome

import numpy as np
import pandas as pd

DIMENSIONS = {"nbch1": ("nbch1",), "nbch2": ("nbch2",), "nbfch": ("nbfch",), "lr": ("lr",),
              "BN/skip": ("batch_norm", "skip_connections")}  # fmt: skip


def grid_tables(rows: list[dict], p: dict, dest: Path) -> tuple[dict, pd.DataFrame]:
    """The grid's tables from its checkpointed trials, finished or not; a combination counts (figures,
    selection) once all its draws finished, and the rest are listed as missing."""
    done, summary, frames = {json.dumps(r["trial"], sort_keys=True): r["scores"] for r in rows}, {}, []
    for arch in GRID_ARCHS:
        grid = study.cv_trials(arch, p)
        key = {t: json.dumps(asdict(t), sort_keys=True) for t in grid}
        table = study.cv_table([Outcome(t, done[key[t]]) for t in grid if key[t] in done], p["cv"]["score_on"])
        counts = table.groupby([*study.CONFIG_KEYS, "variant"])["draw"].transform("count")
        complete = table[counts == p["cv"]["n_draws"]]
        frames.append(complete)
        path = dest / f"cv/{arch}.csv"
        write_csv(table, path)
        if path.stat().st_size > 1 << 20:  # nothing committed tops 2 MiB; no timestamp: reproducible bytes
            path.with_suffix(".csv.gz").write_bytes(gzip.compress(path.read_bytes(), mtime=0))
            path.unlink()
        selected = study.select(complete)
        write_json(selected, dest / f"cv/{arch}_selected.json")
        missing = {(m.nbch1, m.nbch2, m.nbfch, m.batch_norm, m.skip_connections) for m in
                   (t.model for t in grid if key[t] not in done)}  # fmt: skip
        summary[arch] = {"trainings": len(grid), "finished": len(table), "missing": len(grid) - len(table),
                         "combinations_complete": len(complete) // p["cv"]["n_draws"] // len(study.variants_of(arch)),
                         "combinations": len(study.grid(p["cv"])), "shapes_missing": sorted(missing),
                         "selected_over_complete_combinations": selected}  # fmt: skip
    return summary, pd.concat(frames, ignore_index=True)


def comparison(default: pd.DataFrame, full: pd.DataFrame) -> dict:
    """What the full grid changes against the default subset: each variant's selected configuration,
    the value each cross-validation figure peaks at, and the ranking of the variants."""
    out: dict = {"dimensions": list(DIMENSIONS), "variants": {}, "ranking": {}}
    for name, cv in (("default", default), ("full", full)):
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


def provenance(runs: list[dict], summary: dict) -> dict:
    """The first run's environment and params, and the grid: how much of it finished, in how long."""
    walls = [{"wall_s": q["wall_s"], "grid_complete": q["grid_complete"]} for q in runs]
    grid_s = sum(s for r in walls for stage, s in r["wall_s"].items() if stage.startswith("cv@"))
    finished = sum(a["finished"] for a in summary.values())
    out = {k: v for k, v in runs[0].items() if k not in ("wall_s", "complete", "grid_complete")}
    out["grid"] = {
        "complete": all(a["missing"] == 0 for a in summary.values()),
        "trainings_finished": finished,
        "trainings_total": sum(a["trainings"] for a in summary.values()),
        "wall_s": round(grid_s, 1),
        "trainings_per_s": round(finished / grid_s, 1),
        "per_arch": {a: {k: v for k, v in s.items() if not k.startswith("selected")} for a, s in summary.items()},
        "runs": walls,
    }
    out["selected"] = {a: s["selected_over_complete_combinations"] for a, s in summary.items()}
    return out


def write(dest: Path, rows: list[dict], runs: list[dict], tuning: dict, log: str, default: pd.DataFrame) -> None:
    """``dest`` anew: the grid's tables from its checkpointed trials ``rows`` and their figures (the
    study's own figure code), the comparison with the ``default`` subset's table, and the runs' provenance,
    tuning (the first's) and logs."""
    from digitpairs.report import figures

    for old in (f for f in (dest.iterdir() if dest.exists() else []) if f.name != "records"):  # records: the run's
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    summary, cv = grid_tables(rows, runs[0]["params"], dest)
    for name in figures.CV_FIGURES:
        figures.save(figures.draw_cv(cv, name), dest / "plots", name, 150)
    write_json(finite_or_null(comparison(default, cv)), dest / "comparison.json")
    write_json(finite_or_null(provenance(runs, summary)), dest / "provenance.json")
    write_json(finite_or_null(tuning), dest / "tuning.json")
    (dest / "log.txt").write_text(log)
