"""Write the numbers of README.md and docs/*.md from the committed result files, so none is typed by hand.

    python scripts/readme.py            # rewrite the blocks between <!-- NAME:begin --> and <!-- NAME:end -->
    python scripts/readme.py --check    # exit 1 if a page differs from what the files say (tests do this)

Blocks (each in exactly one page): ``results`` (models_out/metrics.json); ``findings`` and ``ablation``
(models_out/findings.json); ``recipe-attempts`` and ``frontier`` (results/recipe-attempts/, written by
``scripts/recipe_attempts.py``); ``headline`` (metrics.json and the frontier); ``faithful`` (results/faithful/,
written by ``scripts/faithful.py``); ``full-grid``
(results/full-grid/earlier-gpu/, an earlier partial run on a GPU), ``full-grid-run`` (the run's records,
results/full-grid/records/, written by ``scripts/full_grid.py run``), ``full-scale`` and ``full-grid-results``
(the README's summary and the details of the complete run, results/full-grid/, written by
``scripts/full_grid.py publish``; the run's progress until then); ``repro-time``, ``cold-repro``,
``benchmark``, ``numerics`` and ``pins-cost`` (results/timings.json: what was measured, with which command, on
which commit and machine).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's digitpairs, for the claims' labels

from digitpairs.core.variants import ALL_ADDITIONS, NO_ADDITIONS, PLUS, VARIANTS  # noqa: E402
from digitpairs.report.findings import CLAIMS  # noqa: E402

README = REPO / "README.md"
DOCS = REPO / "docs"
METRICS = REPO / "models_out/metrics.json"
FINDINGS = REPO / "models_out/findings.json"
FAITHFUL = REPO / "results/faithful"
FULL_GRID = REPO / "results/full-grid"
FULL_GRID_RECORDS = FULL_GRID / "records"
EARLIER_GPU = FULL_GRID / "earlier-gpu"  # an earlier, partial run of the grid on a GPU, older code
TIMINGS = REPO / "results/timings.json"
ATTEMPTS = REPO / "results/recipe-attempts"


def pages() -> list[Path]:
    """README.md and every page of docs/, the files that hold blocks."""
    return [README, *sorted(DOCS.glob("*.md"))]


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def config(c: dict) -> str:
    """``32/32/256, BN on, skip off, lr 0.1``."""
    on = {True: "on", False: "off"}
    return (
        f"{c['nbch1']}/{c['nbch2']}/{c['nbfch']}, BN {on[c['batch_norm']]}, "
        f"skip {on[c['skip_connections']]}, lr {c['lr']:g}"
    )


def recipe_additions() -> str:
    """What siamese-plus adds, as its ablation names them (each "no X" row drops X; findings.json)."""
    rows = json.loads(FINDINGS.read_text())["ablation"]
    added = [n.removeprefix("no ") for n in rows if n.startswith("no ")]
    added += ["cosine schedule"] * ("constant lr" in rows)
    added += ["its own batch size" for n in rows if n.startswith("batch size ")]  # "batch size <the study's>"
    return ", ".join(added)


def results_block() -> str:
    metrics = json.loads(METRICS.read_text())
    rows = [
        "| variant | test accuracy (mean ± std, 10 draws) | 95% CI "
        "| selected configuration (nbch1/nbch2/nbfch, BN, skip, lr) |",
        "| --- | --- | --- | --- |",
    ]
    for variant in VARIANTS:
        m = metrics[variant]
        recipe = f" + the recipe: {recipe_additions()} (`params.yaml` `recipe`)" if variant == PLUS else ""
        rows.append(
            f"| {variant} | {pct(m['accuracy_mean'])}% ± {pct(m['accuracy_std'])} | "
            f"[{pct(m['ci95_low'])}, {pct(m['ci95_high'])}] | {config(m['config'])}{recipe} |"
        )
    return "\n".join(rows)


def pts(x: float | None, sign: bool = True) -> str:
    """A difference of accuracies in percentage points (``n/a`` where no test was possible)."""
    return "n/a" if x is None else f"{100 * x:+.2f}" if sign else f"{100 * x:.2f}"


def pval(p: float | None) -> str:
    """A p-value; 0 is one below the smallest float64 (about 1e-308), written as a bound rather than as 0."""
    return "n/a" if p is None else "< 1e-300" if p == 0 else f"{p:.2g}"


def findings_block() -> str:
    claims = json.loads(FINDINGS.read_text())["claims"]
    rows = [
        "| claim | effect (points) | 95% CI | p, t-test (Holm) | p, Wilcoxon (Holm) | n |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for slug, label in CLAIMS.items():
        c = claims[slug]
        extra = ""
        if "reported" in c:
            extra = f" ({pct(c['reported'])}% reported, {pct(c['unseen'])}% unseen)"
        rows.append(
            f"| {label}{extra} | {pts(c['mean'])} | [{pts(c['ci95_low'])}, {pts(c['ci95_high'])}] | "
            f"{pval(c['p_t_holm'])} | {pval(c.get('p_wilcoxon_holm'))} | {c['n']} |"
        )
    return "\n".join(rows)


def ablation_rows(ablation: dict, change: str = "change from all additions") -> list[str]:
    """siamese-plus's ablation (or attempts) as table rows: the full recipe, none of its additions, then the
    rest by change."""
    rows = [
        f"| siamese-plus | validation accuracy (mean ± std) | {change} | 95% CI | p, t-test | p, Holm | draws |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    first = [n for n in (ALL_ADDITIONS, NO_ADDITIONS) if n in ablation]
    rest = sorted((n for n in ablation if n not in first), key=lambda n: ablation[n]["change_mean"])
    for name in first + rest:
        a = ablation[name]
        cells = [""] * 4
        if name != ALL_ADDITIONS:
            ci = f"[{pts(a['change_ci95_low'])}, {pts(a['change_ci95_high'])}]"
            cells = [pts(a["change_mean"]), ci, pval(a["change_p_t"]), pval(a["change_p_t_holm"])]
        value = f"{pts(a['val_mean'], False)}% ± {pts(a['val_std'], False)}"
        rows.append("| " + " | ".join([name, value, *cells, str(a["change_n"])]) + " |")
    return rows


SETTLED = 0.003  # a CI inside +-0.3 points around 0: no effect measurable at this resolution


def quoted(names: list[str]) -> str:
    """Row names for a sentence: *a*, *b*, or "none"."""
    return ", ".join(f"*{n}*" for n in names) or "none"


def tested_rows(rows: dict) -> dict:
    """The ablation's (or attempts') rows that were tested against the recipe: a Holm-corrected p-value."""
    return {n: a for n, a in rows.items() if n != ALL_ADDITIONS and a["change_p_t_holm"] is not None}


def ablation_block() -> str:
    """siamese-plus's ablation (findings.json) with Holm's p-values, and what it settles."""
    rows = json.loads(FINDINGS.read_text())["ablation"]
    tested = tested_rows(rows)
    matters = [n for n, a in tested.items() if a["change_p_t_holm"] < 0.05]
    flat = [
        n
        for n, a in tested.items()
        if n not in matters and -SETTLED < a["change_ci95_low"] and a["change_ci95_high"] < SETTLED
    ]
    open_ = [n for n in tested if n not in matters + flat]
    return "\n".join(
        [
            *ablation_rows(rows),
            "",
            f"Rows whose change holds after Holm's correction over the rows (p < 0.05), additions that carry "
            f"part of the gain: {quoted(matters)}. Rows whose 95% CI lies within ±{SETTLED * 100:.1f} points of 0, "
            f"no effect measurable at this resolution: {quoted(flat)}. Neither, not settled: {quoted(open_)}.",
        ]
    )


def recipe_attempts_block() -> str:
    """What else the recipe was tried with (results/recipe-attempts/, written by scripts/recipe_attempts.py)."""
    rows = json.loads((ATTEMPTS / "attempts.json").read_text())
    prov = json.loads((ATTEMPTS / "provenance.json").read_text())
    gains = [n for n, a in tested_rows(rows).items() if a["change_p_t_holm"] < 0.05 and a["change_mean"] > 0]
    return "\n".join(
        [
            *ablation_rows(rows, "change from the recipe"),
            "",
            f"`{prov['command']}` {measured_on(prov)}: {prov['trials']} trainings, {prov['seconds']:.0f} s. "
            f"Attempts that raise validation accuracy after Holm's correction (p < 0.05): "
            f"{quoted(gains)}.",
        ]
    )


GOAL = 0.99  # siamese-plus's target accuracy


def frontier_rows() -> list[tuple[int, dict]]:
    """(epochs, row) of the recipe's budget frontier (results/recipe-attempts/frontier.json), fewest first."""
    rows = json.loads((ATTEMPTS / "frontier.json").read_text())
    return sorted((int(e), r) for e, r in rows.items())


def frontier_summary() -> str:
    """Which budget reaches the goal on the validation pairs (mean over draws), if any of those tried."""
    rows = frontier_rows()
    listed = ", ".join(f"{pct(r['val_mean'])}% at {e}" for e, r in rows)
    reached = [e for e, r in rows if r["val_mean"] >= GOAL]
    verdict = (
        f"the first budget whose mean reaches {pct(GOAL)}% is {reached[0]} epochs"
        if reached
        else f"none of these budgets reaches {pct(GOAL)}%"
    )
    return f"the recipe's validation accuracy by epochs ({rows[0][1]['n']} draws): {listed}; {verdict}"


def frontier_block() -> str:
    """The recipe's validation accuracy at larger budgets, and which one reaches the goal."""
    rows = frontier_rows()
    base = rows[0][0]
    table = [
        f"| epochs | validation accuracy (mean ± std) | 95% CI | change from {base} epochs | 95% CI | p, t-test "
        "| draws |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e, r in rows:
        cells = ["", "", ""]
        if "change_mean" in r:
            ci = f"[{pts(r['change_ci95_low'])}, {pts(r['change_ci95_high'])}]"
            cells = [pts(r["change_mean"]), ci, pval(r["change_p_t"])]
        value = f"{pts(r['val_mean'], False)}% ± {pts(r['val_std'], False)}"
        band = f"[{pts(r['ci95_low'], False)}, {pts(r['ci95_high'], False)}]"
        table.append("| " + " | ".join([str(e), value, band, *cells, str(r["n"])]) + " |")
    return "\n".join([*table, "", f"In short, {frontier_summary()}."])


def headline_block() -> str:
    """The line under the README's results: siamese-plus against its goal, and the budget frontier."""
    m = json.loads(METRICS.read_text())[PLUS]
    met = "meets" if m["accuracy_mean"] >= GOAL else "misses"
    return (
        f"siamese-plus {met} the {pct(GOAL)}% goal within the study's budget ({pct(m['accuracy_mean'])}% on the "
        f"test pairs); beyond it, {frontier_summary()} ([frontier](docs/siamese-plus.md#the-budget-frontier))."
    )


def faithful_block() -> str:
    ours = json.loads(METRICS.read_text())
    theirs = json.loads((FAITHFUL / "metrics.json").read_text())
    prov = json.loads((FAITHFUL / "provenance.json").read_text())
    rows = [
        "| variant | ours: test accuracy | its selected configuration | faithful mode: test accuracy | "
        "its selected configuration |",
        "| --- | --- | --- | --- | --- |",
    ]
    for variant in VARIANTS:
        o, t = ours[variant], theirs[variant]
        rows.append(
            f"| {variant} | {pct(o['accuracy_mean'])}% ± {pct(o['accuracy_std'])} | {config(o['config'])} | "
            f"{pct(t['accuracy_mean'])}% ± {pct(t['accuracy_std'])} | {config(t['config'])} |"
        )
    overrides = ", ".join(f"`{k}={v}`" for k, v in prov["overrides"].items())
    rows += [
        "",
        f"Faithful mode: {overrides}; `{prov['command']}` on commit `{prov['baseline_commit'][:7]}` "
        f"({prov['machine']}) took {prov['wall_s']:.0f} s.",
    ]
    return "\n".join(rows)


def full_grid_block() -> str:
    """The earlier partial run of the full grid on a GPU (results/full-grid/earlier-gpu/): how much finished,
    how fast, how the engine checked out, and what the full grid selects against the default subset."""
    prov = json.loads((EARLIER_GPU / "provenance.json").read_text())
    comp = json.loads((EARLIER_GPU / "comparison.json").read_text())
    g = prov["grid"]
    pair, siamese = g["per_arch"]["pair"], g["per_arch"]["siamese"]
    lines = [
        f"- GPU: {prov['gpu']} ({prov['gpu_memory_gib']} GiB), PyTorch {prov['torch']}, CUDA {prov['cuda']}; "
        f"finished {g['trainings_finished']:,} of {g['trainings_total']:,} trainings "
        f"({100 * g['trainings_finished'] / g['trainings_total']:.1f}%) in {g['wall_s']:.0f} s of grid wall time "
        f"over {len(g['runs'])} runs ({g['trainings_per_s']:.0f} trainings/s).",
        f"- pair: {pair['combinations_complete']} of {pair['combinations']} combinations complete; "
        f"siamese: {siamese['combinations_complete']} of {siamese['combinations']} "
        f"({siamese['missing']:,} trainings missing, {len(siamese['shapes_missing'])} widths/BN/skip shapes "
        "listed in `provenance.json`).",
        *_full_grid_tuning(g),
        "",
        *_full_grid_selection(comp),
    ]
    return "\n".join(lines)


def _full_grid_selection(
    comp: dict, names: tuple[str, str] = ("default", "full"), labels: tuple[str, str] = ("default subset", "full grid")
) -> list[str]:
    """Two tables and the ranking from a comparison of two grids (``names`` its keys, ``labels`` their
    words): each variant's selected configuration, and each grid dimension's best value, one against the other."""
    (a, b), (la, lb) = names, labels
    lines = [
        f"| variant | selected on the {la} | CV score | selected on the {lb} | CV score |",
        "| --- | --- | --- | --- | --- |",
    ]
    for variant, c in comp["variants"].items():
        lines.append(
            f"| {variant} | {config(c[a]['config'])} | {pct(c[a]['score'])}% | "
            f"{config(c[b]['config'])} | {pct(c[b]['score'])}% |"
        )
    lines += [
        "",
        "| figure: value with the highest mean accuracy | " + " | ".join(comp["variants"]) + " |",
        "| --- |" + " --- |" * len(comp["variants"]),
    ]
    for dim in comp["dimensions"]:
        best = [comp["variants"][v]["best"][dim] for v in comp["variants"]]
        lines.append(f"| {dim} ({la} / {lb}) | " + " | ".join(f"{d[a]} / {d[b]}" for d in best) + " |")
    ranking = {k: " > ".join(v) for k, v in comp["ranking"].items()}
    return [*lines, "", f"Ranking by mean CV accuracy over the grid: {la} {ranking[a]}; {lb} {ranking[b]}."]


def _full_grid_tuning(g: dict) -> list[str]:
    """Two bullets from tuning.json: the whole grid's projected time, and the GPU engine against the CPU
    loop (with the largest job's measurements where the run that tuned the engine made them)."""
    tun = json.loads((EARLIER_GPU / "tuning.json").read_text())
    eq = tun["equivalence"]["25"]
    timing = (
        f"- At that rate the whole grid takes about {g['trainings_total'] / g['trainings_per_s'] / 60:.0f} minutes "
        "(projection)."
    )
    check = (
        f"- CUDA lockstep against the CPU loop, 25 epochs, {len(eq)} trials (3 variants x 2 draws): largest test "
        f"accuracy difference {100 * max(abs(r['gpu_test'] - r['cpu_test']) for r in eq):.1f} points (equal in "
        "distribution; the weights differ, as float rounding grows over 25 epochs)."
    )
    if "largest_job" in tun:  # measured by the runs of the GPU script that tuned the engine by hand
        big, procs = tun["largest_job"], tun["processes"]["trainings_per_s"]
        timing += (
            f" Largest widths (one job of {big['trials']} models, 64/64/512, BN and skips): "
            f"{big['graphs_s']:.2f} s with CUDA graphs, {big['eager_s']:.2f} s without; "
            f"{big['flops'] / big['graphs_s'] / 1e12:.1f} TFLOP/s = {100 * big['fraction_of_fp32_matmul']:.0f}% of "
            f"the measured float32 matmul rate ({big['matmul_fp32_flops'] / 1e12:.0f} TFLOP/s). A sample of the grid: "
            + ", ".join(f"{float(r):.0f} trainings/s with {n} process{'es' * (n != '1')}" for n, r in procs.items())
            + "."
        )
        check += (
            f" TF32: {big['tf32_s']:.2f} s against {big['graphs_s']:.2f} s, mean test accuracy "
            f"{pct(big['mean_test_acc_tf32'])}% against {pct(big['mean_test_acc_fp32'])}% (the published run is "
            f"float32). Determinism: two runs of the largest job bit-identical: "
            f"{'yes' if big['repeat_identical'] else 'no'}; with PyTorch's deterministic mode "
            f"{big['graphs_s']:.2f} s, without it {big['nondeterministic_s']:.2f} s."
        )
    return [timing, check]


@functools.cache  # two blocks show it; a page is rendered by a process of its own, after the records change
def records_held(records: Path = FULL_GRID_RECORDS) -> dict[str, int]:
    """The trials the full-grid run's records hold, per checkpoint file (``cv-pair``, ``controls``, ...)."""
    held: dict[str, int] = {}
    for part in sorted(records.glob("part-*.jsonl.gz")):
        for line in gzip.decompress(part.read_bytes()).decode().splitlines():
            stem = json.loads(line)["checkpoint"]
            held[stem] = held.get(stem, 0) + 1
    return held


def full_grid_run_block() -> str:
    """The run of the original's study at full scale on CPUs: its commit, what its records hold, and
    each piece's machine, trials, speed and audit (results/full-grid/records/, scripts/full_grid.py)."""
    run = json.loads((FULL_GRID_RECORDS / "run.json").read_text())
    pieces = json.loads((FULL_GRID_RECORDS / "pieces.json").read_text())
    held = records_held()
    s, totals = run["settings"], run["trainings"]
    done = ", ".join(f"{stem} {n:,}" + (f" of {totals[stem]:,}" if stem in totals else "") for stem, n in
                     sorted(held.items()))  # fmt: skip
    proj, hours = timings()["numerics_benchmark"], sum(q["training_s"] for q in pieces) / 3600
    took = "".join(f" (it took over from `{t['from'][:7]}` after {t['audit']['equal']} of {t['audit']['trials']} "
                   f"carried trials, {t['audit']['shapes']} shapes, trained again to the same weights)"
                   for t in run.get("takeovers", []))  # fmt: skip
    lines = [
        f"Commit `{run['commit'][:7]}`{took}, `train.device: {s['train.device']}`, "
        f"`train.numerics: {s['train.numerics']}`; "
        f"the records hold {sum(held.values()):,} trials ({done}; a trial two stages share is held once), "
        f"from {hours:.1f} h of training over "
        f"{len(pieces)} pieces. `benchmarks/numerics.py` projects the whole study at "
        f"{proj['full_study_projected_h']:.1f} h on {proj['machine']} (commit `{proj['commit']}`).",
        "",
        "| piece (UTC) | commit | CPU | AVX-512 | trials computed | training time | trainings/s | audit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for q in pieces:
        a = q["audit"] or {}
        audit = (f"{a['equal']} of {a['trials']} equal ({a['shapes']} shapes)" if a.get("needed")
                 else f"not needed ({a['why']})" if a else "not reached")  # fmt: skip
        computed = f"{q['computed']:,}" + (f" (+{q['recovered']:,} recovered)" if q["recovered"] else "")
        lines.append(
            f"| {q['started'][:16].replace('T', ' ')} | `{q['commit'][:7]}` | "
            f"{q['cpu']['model']}, {q['cpu']['cpus']} CPUs | "
            f"{'yes' if q['cpu']['avx512'] else 'no'} | {computed} | {q['training_s'] / 3600:.2f} h | "
            f"{q['trainings_per_s'] or 0:.2f} | {audit} |"
        )
    return "\n".join(lines)


def published(folder: Path = FULL_GRID) -> dict | None:
    """The complete full-grid run's comparison.json (``full_grid.py publish``), or None before it is published."""
    return json.loads((folder / "comparison.json").read_text()) if (folder / "dvc.lock").exists() else None


def full_scale_block(folder: Path = FULL_GRID) -> str:
    """README: the original's study at full scale beside the default run (each variant's test accuracy and
    configuration, the findings whose verdict moved), or, while it is computed, how far it got."""
    comp, run = published(folder), json.loads((FULL_GRID_RECORDS / "run.json").read_text())
    s, total, held = run["settings"], sum(run["trainings"].values()), records_held()
    grid = "; ".join(f"{k.removeprefix('cv.')} in {{{', '.join(f'{x:g}' for x in s[k])}}}"
                     for k in ("cv.nbch1", "cv.nbch2", "cv.nbfch", "cv.lr"))  # fmt: skip
    intro = (f"The original's grid ({grid}; BN and skip connections on/off; all {s['cv.n_draws']} draws "
             f"cross-validated: {total:,} trainings), then the sweep, the gradient norms and the final training "
             "at its selections, computed in pieces on any CPUs or GPU and carried between machines in git "
             "(`scripts/full_grid.py run --mnist DIR`; [full grid](docs/full-grid.md))")  # fmt: skip
    if comp is None:
        done = sum(held.get(stem, 0) for stem in run["trainings"])
        return f"{intro}: {done:,} of {total:,} trainings committed so far."
    pieces = json.loads((FULL_GRID_RECORDS / "pieces.json").read_text())
    hours = sum(q["training_s"] for q in pieces) / 3600
    intro += f": {len(pieces)} pieces, {hours:.1f} h of training, {sum(held.values()):,} distinct trainings recorded."
    acc, found = comp["default"]["accuracy"], comp["default"]["findings"]
    lines = [
        "| variant | default: test accuracy [95% CI] | full grid: test accuracy [95% CI] | full grid: "
        "selected configuration (same as default) |",
        "| --- | --- | --- | --- |",
    ]
    for v in (v for v in VARIANTS if v in acc):  # in the results table's order
        d, f = acc[v]["default"], acc[v]["full"]
        lines.append(
            f"| {v} | {pct(d['accuracy_mean'])}% [{pct(d['ci95_low'])}, {pct(d['ci95_high'])}] | "
            f"{pct(f['accuracy_mean'])}% [{pct(f['ci95_low'])}, {pct(f['ci95_high'])}] | {config(f['config'])} "
            f"({'yes' if acc[v]['same_config'] else 'no'}) |"
        )
    moved = [f"{CLAIMS.get(c, c)} ({verdict(r['full'])} at full scale)" for c, r in found.items() if r["moved"]]
    verdicts = f"Findings whose verdict differs: {'; '.join(moved)}." if moved else "Every finding keeps its verdict."
    return "\n".join([intro, "", *lines, "", f"{verdicts} (Holm-corrected t-test p < 0.05.)"])


def verdict(r: dict) -> str:
    """A finding's verdict on one run of comparison.json (``established``: Holm-corrected t-test p < 0.05)."""
    return "established" if r["established"] else "not established"


def effect(r: dict) -> str:
    """A finding's effect with its CI and Holm-corrected p: ``+3.53 [+2.09, +4.97], p 0.0025``."""
    return f"{pts(r['mean'])} [{pts(r['ci95_low'])}, {pts(r['ci95_high'])}], p {pval(r['p_t_holm'])}"


def full_grid_results_block(folder: Path = FULL_GRID) -> str:
    """docs/full-grid.md: the complete run at full scale (``folder``, written by ``full_grid.py publish``) in
    detail: its selections against the default subset's, every finding on both, and what moved against the
    earlier GPU run."""
    comp = published(folder)
    if comp is None:
        return "Not published yet: the run above is under way."
    t = comp["default"]["shared_trials"]
    lines = [f"The default run's {t['trials']:,} cross-validation trials: {t['in_full_grid']:,} in the full grid, "
             f"{t['scores_equal']:,} of them with equal scores (selection score, validation and test accuracy).", "",
             *_full_grid_selection(comp["default"]), "",
             "| claim | default run: effect (points) [95% CI], p | full grid: effect [95% CI], p | verdict |",
             "| --- | --- | --- | --- |"]  # fmt: skip
    for c, r in comp["default"]["findings"].items():
        lines.append(f"| {CLAIMS.get(c, c)} | {effect(r['default'])} | {effect(r['full'])} | {verdict(r['full'])}"
                     f"{' (moved)' if r['moved'] else ''} |")  # fmt: skip
    figures = {f.stem: os.path.relpath(f, DOCS) for f in sorted((folder / "plots").glob("*.png"))}
    if figures:
        links = ", ".join(f"[{name}]({path})" for name, path in figures.items())
        lines += [
            "",
            f"The figures at full scale: {links}.",
            "",
            f"![The findings at full scale]({figures['findings']})",
        ]
    if "earlier_gpu" in comp:
        gpu = comp["earlier_gpu"]
        same = [v for v, c in gpu["variants"].items() if c["earlier_gpu"]["config"] == c["full"]["config"]]
        lines += ["", f"Against the earlier GPU run's complete combinations (its own numerics): {len(same)} of "
                  f"{len(gpu['variants'])} variants select the same configuration.", "",
                  *_full_grid_selection(gpu, ("earlier_gpu", "full"), ("earlier GPU run", "full grid"))]  # fmt: skip
    return "\n".join(lines)


def timings() -> dict:
    return json.loads(TIMINGS.read_text())


def measured_on(m: dict) -> str:
    """Commit, machine and numeric path of a measurement (the lockstep engine's products: ``gemm``)."""
    path = f"MKL pin `MKL_CBWR={m['mkl_cbwr']}`"
    if "gemm" in m:
        path = f"lockstep products on {m['gemm']}; {path} elsewhere"
    return f"on commit `{m['commit']}` ({m['machine']}; {path})"


def other_runs(c: dict) -> str:
    """``, and 709 s on `658ba66` (x86_64, 2 CPUs, AMD EPYC)``: other recorded cold runs, each with the
    commit and machine it ran on (code with the same outputs)."""
    runs = [f"{r['wall_s']} s on `{r['commit']}` ({r['machine']})" for r in c.get("other_runs", [])]
    if not runs:
        return ""
    listed = runs[0] if len(runs) == 1 else f"{', '.join(runs[:-1])} and {runs[-1]}"
    return f", and {listed}, all with the same outputs"


def repro_time_block() -> str:
    """The quick start's one number: how long the pipeline takes (the range of the recorded cold runs)."""
    c = timings()["cold_repro"]
    minutes = sorted(round(s / 60) for s in [c["wall_s"], *(r["wall_s"] for r in c.get("other_runs", []))])
    span = f"{minutes[0]} to {minutes[-1]}" if minutes[0] != minutes[-1] else f"about {minutes[0]}"
    return (
        f"The pipeline takes {span} minutes: `{c['command']}` of the default params took {c['wall_s']} s "
        f"{measured_on(c)}{other_runs(c)}; installing adds the download of the pinned packages."
    )


def cold_repro_block() -> str:
    c = timings()["cold_repro"]
    s = c["stages_s"]
    return (
        f"`{c['command']}` of the default params took {c['wall_s']} s ({c['wall_s'] / 60:.1f} min) {measured_on(c)}"
        f"{other_runs(c)}: "
        f"{s['study']} s for the study's stages (siamese-plus's final training included) and "
        f"{s['recipe'] + s['controls'] + s['findings']} s for the stages that build siamese-plus and test the claims "
        f"(`recipe` {s['recipe']} s, `controls` {s['controls']} s, `findings` {s['findings']} s)."
    )


def benchmark_block() -> str:
    b = timings()["benchmark"]
    return "\n".join(
        [
            f"| `{b['command']}`, {measured_on(b)} | |",
            "| --- | --- |",
            f"| lockstep, trainings/s (small widths, largest widths) | {b['lockstep_trainings_per_s']:.2f} "
            f"({b['lockstep_trainings_per_s_small_widths']:.1f}, {b['lockstep_trainings_per_s_largest_widths']:.2f}) |",
            f"| per-model loop, unpinned, best mode, trainings/s | {b['loop_trainings_per_s']:.2f} |",
            f"| `speedup` | {b['speedup']:.2f}x |",
            f"| lockstep, fraction of the machine's float32 FMA peak: overall, largest widths | "
            f"{100 * b['matmul_fraction_overall']:.0f}%, {100 * b['matmul_fraction_largest_widths']:.0f}% |",
            *(
                [f"| `--profile`d job ({b['profiled_job']}) | {b['profiled_job_s']:.2f} s |"]
                if "profiled_job" in b
                else []
            ),
            "",
            f"Measured with {b['note']}.",
        ]
    )


def numerics_block() -> str:
    """The portable road against the MKL pin (``benchmarks/numerics.py``)."""
    n = timings()["numerics_benchmark"]
    rows = [
        f"| `{n['command']}`, {measured_on(n)} | trainings | `MKL_CBWR=COMPATIBLE`, s | OpenBLAS Haswell "
        "(portable), s | ratio | `train.numerics: native`, s | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in n["sets"].values():
        rows.append(
            f"| {r['label']} | {r['trainings']} | {r['mkl_s']:.2f} | {r['openblas_s']:.2f} | "
            f"{r['mkl_s'] / r['openblas_s']:.2f}x | {r['native_s']:.2f} | {r['mkl_s'] / r['native_s']:.2f}x |"
        )
    peak = n["largest_fraction_of_fma_peak"]
    return "\n".join(
        rows
        + [
            "",
            f"`portable speedup`: {n['portable_speedup']:.2f}x; native: {n['native_speedup']:.2f}x, so the portable "
            f"promise runs at {n['native_speedup'] / n['portable_speedup']:.2f}x the native time on this machine. "
            f"On the largest widths the engine reached "
            f"{100 * peak['openblas']:.0f}% of one core's float32 FMA peak ({n['fma_peak_gflops']:.0f} GFLOP/s on "
            f"the AVX2 kernels, measured) on the portable road, {100 * peak['native']:.0f}% native and "
            f"{100 * peak['mkl']:.0f}% under the MKL pin. Projected time of the "
            f"original's full study ({n['full_study_trainings']:,} trainings of 25 epochs) on this machine: "
            f"{n['full_study_projected_h']:.1f} h. Each path repeated its own bytes. {n['note']}",
        ]
    )


def pins_cost_block() -> str:
    c = timings()["pins_cost"]
    bench, one = c["benchmark_trainings_per_s"], c["benchmark_one_thread_trainings_per_s"]
    repro = c["cold_repro_min"]

    def change(d: dict) -> str:
        return f"{100 * (d['pinned'] / d['unpinned'] - 1):+.1f}%"

    return (
        f"The cost of the pins, {measured_on(c)}, pinned against `DIGITPAIRS_UNPINNED=1` back to back: the lockstep "
        f"benchmark (`benchmarks/lockstep.py --quick`) ran at {bench['pinned']:.2f} trainings/s against "
        f"{bench['unpinned']:.2f} ({change(bench)}; {one['pinned']:.2f} against {one['unpinned']:.2f}, {change(one)}, "
        f"with one thread per process as the pipeline runs); the loop engine's speed changed by "
        f"{100 * c['loop_engine_change']:+.0f}% (pinned, its convolutions do not use oneDNN); a cold `dvc repro` of "
        f"the defaults took {repro['pinned']} min pinned and {repro['unpinned']} min unpinned, and unpinned, "
        f"{c['outputs_differing_unpinned']} of its {c['outputs']} outputs differed from the pinned ones on that "
        "machine. (That commit's engine, stages and pins.)"
    )


def native_repro_block() -> str:
    """What ``train.numerics: native`` gave for the whole pipeline on one machine (results/timings.json)."""
    n = timings()["native_repro"]
    acc = ", ".join(
        f"{v} {100 * a['portable']:.2f}% portable, {100 * a['native']:.2f}% native"
        for v, a in n["test_accuracy"].items()
    )
    return (
        f"`train.numerics: native`, on commit `{n['commit']}` ({n['machine']}; no pins, lockstep products on "
        f"{n['gemm']}): `{n['command']}` after a portable run reran every stage but "
        f"`mnist` and `pairs` in {n['wall_s']} s, where a cold portable run of the whole pipeline took "
        f"{n['portable_wall_s']} s on the same machine; {n['outputs_differing']} of its {n['outputs']} outputs "
        "differed from the portable ones. Test "
        f"accuracy (mean of {n['n_draws']} draws): {acc}. {n['note']}"
    )


def span(r: list[float]) -> str:
    return f"{r[0]:g}-{r[1]:g}"


def cluster_failures_block() -> str:
    """The measured column of docs/clusters.md's failure table."""
    c = timings()["ray_cluster"]
    w, h = c["worker_kill"], c["head_kill"]
    stopped_at = ", ".join(map(str, h["checkpointed"]))
    return "\n".join(
        [
            f"Measured {measured_on(c)} with `{c['command']}`: {c['note']}.",
            "",
            "| event | measured on the loopback cluster |",
            "| --- | --- |",
            f"| a worker node SIGKILLed while it trained ({w['trials_recorded']} of {w['trials']} trials recorded) | "
            "Ray retried its task on the other node; the next trial was recorded "
            f"{span(w['next_trial_s'])} s after the kill, the stage ended {span(w['stage_done_s'])} s after it "
            f"({c['runs']} runs); outputs byte-identical, "
            f"{w['trials']} checkpoint rows for {w['trials']} trials |",
            f"| the head SIGKILLed ({stopped_at} trials checkpointed when the stage stopped) | "
            f"the stage exited {span(h['stage_exit_s'])} s after the kill; the rerun on a new cluster (nodes up in "
            f"{span(h['nodes_up_s'])} s) resumed the checkpointed trials and gave byte-identical outputs |",
            f"| `RAY_ADDRESS` on a closed port | {span(c['closed_port_repro_s'])} s for the whole `dvc repro` "
            "(10 s of it waiting for the address), exit status 1, outputs put back |",
        ]
    )


def cluster_cost_block() -> str:
    c = timings()["ray_cluster"]
    cost, lr = c["cost"], c["local_ray_ms_per_trial"]
    n = c["worker_kill"]["trials"]
    loaded = " and ".join(f"{a:g} s / {b:g} s" for a, b in cost["loaded_local_cluster_s"])
    return (
        f"Measured {measured_on(c)} with `{c['command']}`, the same 8 trials on the local executor with 2 processes, "
        "then on the cluster, back to back. With the machine least loaded (load average about "
        f"{cost['load_average']}): {cost['local_s']:g} s local, {cost['cluster_s']:g} s on the cluster, so about "
        f"**{(cost['cluster_s'] - cost['local_s']) / n:+.1f} s per trial** at this size, most of it fixed per run. "
        f"Under heavier load the same pair measured {loaded} (local / cluster): the difference is then below the "
        f"noise of a shared machine. Starting the three nodes took {span(c['nodes_start_s'])} s. A local Ray instance "
        f"(`tests/test_ray.py`, {lr['trials']} small trials) measured {lr['ray']} ms per trial against "
        f"{lr['local']} ms with the local executor."
    )


BLOCKS = {
    "results": results_block,
    "findings": findings_block,
    "ablation": ablation_block,
    "recipe-attempts": recipe_attempts_block,
    "frontier": frontier_block,
    "headline": headline_block,
    "faithful": faithful_block,
    "full-grid": full_grid_block,
    "full-grid-run": full_grid_run_block,
    "full-grid-results": full_grid_results_block,
    "full-scale": full_scale_block,
    "repro-time": repro_time_block,
    "cold-repro": cold_repro_block,
    "benchmark": benchmark_block,
    "pins-cost": pins_cost_block,
    "native-repro": native_repro_block,
    "numerics": numerics_block,
    "cluster-failures": cluster_failures_block,
    "cluster-cost": cluster_cost_block,
}


def block_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)


def render(text: str, blocks: dict = BLOCKS) -> str:
    """``text`` with every block it holds rewritten from the result files (by ``blocks``' functions)."""
    for name, block in blocks.items():
        pattern = block_pattern(name)
        if pattern.search(text):
            text = pattern.sub(lambda m, b=block: m.group(1) + b() + "\n" + m.group(2), text)
    return text


def placement(texts: dict[Path, str]) -> dict[str, list[Path]]:
    """The pages holding each block (each block belongs in exactly one)."""
    return {name: [p for p, t in texts.items() if block_pattern(name).search(t)] for name in BLOCKS}


def main() -> int:
    texts = {p: p.read_text() for p in pages()}
    misplaced = {name: found for name, found in placement(texts).items() if len(found) != 1}
    if misplaced:
        for name, found in misplaced.items():
            where = ", ".join(str(p.relative_to(REPO)) for p in found) or "no page"
            print(f"block <!-- {name}:begin --> ... <!-- {name}:end --> must be in exactly one page, found in {where}.")
        return 1
    stale = [p for p, t in texts.items() if render(t) != t]
    if "--check" in sys.argv[1:]:
        for p in stale:
            print(f"{p.relative_to(REPO)}: numbers differ from the result files: run `python scripts/readme.py`.")
        return 1 if stale else 0
    for p in stale:
        p.write_text(render(texts[p]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
