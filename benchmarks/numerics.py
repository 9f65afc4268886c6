"""Benchmark: the lockstep engine's portable products (OpenBLAS's Haswell kernels) against the MKL pin.

The same trials, the pipeline's own (a sample of the default cross-validation grid, and siamese-plus's
recipe at the largest widths, 32/256/256), run twice on each path in this process with one thread, as
each of the pipeline's job processes runs them: ``DIGITPAIRS_GEMM=mkl`` (``torch.bmm`` under
``MKL_CBWR=COMPATIBLE``) and the default road (:mod:`digitpairs.core.gemm`). Each path must repeat its
own bytes; the run ends with ``portable speedup: <ratio>x`` (MKL's time over the road's, best of two
each). A child process without the pins measures ``train.numerics: native`` too (PyTorch's defaults:
MKL's and ATen's own kernels for this CPU, reproducible on this machine only), the speed the portable
promise costs here. It also prints the fraction of one core's float32 FMA peak reached on the largest
widths (the peak measured as a 2048^3 product on OpenBLAS's Haswell kernels, one thread) and the
projected wall time of the original's full study on this machine (its trainings spread over every core).

    python benchmarks/numerics.py --quick      # about 2 minutes on a 2-core machine
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from hashlib import sha256
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: this checkout's package and benchmarks

from digitpairs.core import numerics  # noqa: E402  (first: the numeric pins before numpy loads)
from digitpairs.core import params as params_file  # noqa: E402
from digitpairs.core.variants import PLUS  # noqa: E402
from digitpairs.data import mnist  # noqa: E402
from digitpairs.training import study  # noqa: E402
from digitpairs.training.runner import THREADS_PER_JOB, cpu_count, run_trials  # noqa: E402
from digitpairs.training.trials import Trial, make_trial  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.lockstep import fma_peak, pair_draws, trial_flops  # noqa: E402

LARGEST = dict(nbch1=32, nbch2=256, nbfch=256, batch_norm=True, skip_connections=False)  # siamese-plus's


def trial_sets(params: dict, epochs: int, per_config: int) -> dict[str, list[Trial]]:
    """``cv``: both architectures at the default grid's smallest and largest widths, batch norm and
    skips both on or both off; ``largest``: siamese-plus's recipe at its widths. ``per_config`` trainings
    each (learning rates, draws and seeds in turn: no two alike, since the runner trains a trial once)."""
    train = dict(params["train"], epochs=epochs)
    lrs = params["cv"]["lr"]
    cv = []
    for variant in ("pair", "siamese-2"):
        for n1, n2, nf in ((8, 8, 64), (32, 32, 256)):
            for on in (True, False):
                w = dict(nbch1=n1, nbch2=n2, nbfch=nf, batch_norm=on, skip_connections=on, relu_logits=False)
                for i in range(per_config):
                    cv.append(make_trial(variant, w, study.train_config(train, lrs[i % len(lrs)]), i % 4, seed=i))
    p = dict(params, train=train)
    largest = [
        make_trial(PLUS, LARGEST, study.recipe_config(p, params["recipe"]["lr"][i % 2]), i % 4, seed=i)
        for i in range(2 * per_config)
    ]
    return {"cv": cv, "largest": largest}


def timed_run(trials: list[Trial], pairs: Path, path: str) -> tuple[float, str]:
    """Seconds and a hash of every outcome (final weights and scores) on one numeric path (``native``:
    the unpinned default, in a process started without the pins)."""
    if path == "native":
        os.environ.pop(numerics.GEMM_ENV, None)
    else:
        os.environ[numerics.GEMM_ENV] = path
    t0 = time.perf_counter()
    outs = run_trials(trials, pairs, engine="lockstep", keep_state=True, desc=path, workers=1)
    secs = time.perf_counter() - t0
    h = sha256()
    for o in outs:
        h.update(json.dumps(o.scores, sort_keys=True).encode())
        for name, t in sorted(o.state.items()):
            h.update(name.encode() + t.contiguous().numpy().tobytes())
    return secs, h.hexdigest()


def best_times(sets: dict[str, list[Trial]], pairs: Path, path: str) -> dict[str, float]:
    """Each set's best of two runs on ``path``, which must repeat its own bytes."""
    best = {}
    for name, trials in sets.items():
        (s1, h1), (s2, h2) = timed_run(trials, pairs, path), timed_run(trials, pairs, path)
        if h1 != h2:
            raise SystemExit(f"{path}: two runs of the {name} set gave different bytes")
        best[name] = min(s1, s2)
        print(f"{path:9s} {name:8s}: {len(trials)} trainings, {best[name]:6.2f} s, same bytes twice", file=sys.stderr)
    return best


def native_times(args: argparse.Namespace, pairs: Path) -> dict[str, float]:
    """:func:`best_times` of ``native`` (``train.numerics: native``: no pins, torch's own MKL and ISA for
    this CPU), in a child process, since a process's pins are set before its libraries load."""
    cmd = [sys.executable, __file__, "--native-child", str(pairs), "--mnist", args.mnist] + ["--quick"] * args.quick
    env = numerics.child_env("native")
    cp = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(cp.stdout.strip().splitlines()[-1])


def full_study(params: dict) -> list[Trial]:
    """The original's study: its grid (scripts/full_grid.py's FULL_GRID) on 10 draws for
    both architectures, plus the loss-weight sweep at the grid's middle widths."""
    spec = importlib.util.spec_from_file_location("full_grid", REPO / "scripts/full_grid.py")
    grid_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid_script)
    p = json.loads(json.dumps(params))
    for key, value in grid_script.FULL_GRID.items():
        section, name = key.split(".")
        p[section][name] = value
    trials = study.cv_trials("pair", p) + study.cv_trials("siamese", p)
    middle = dict(nbch1=32, nbch2=32, nbfch=256, batch_norm=True, skip_connections=True, lr=0.1)
    return trials + study.loss_weight_trials({"siamese-2": middle}, p)


def projection(sets: dict[str, list[Trial]], secs: dict[str, float], study_trials: list[Trial]) -> float:
    """Seconds of the full study here: seconds per training on one core = a + b x FLOPs, the line through
    the two measured sets' means, applied to each of ``study_trials`` (:func:`full_study`: 25 epochs' FLOPs),
    divided by the cores (one job process each, as the pipeline runs)."""
    points = [(np.mean([trial_flops(t) for t in sets[k]]), secs[k] / len(sets[k])) for k in ("cv", "largest")]
    (f0, t0), (f1, t1) = points
    b = (t1 - t0) / (f1 - f0)
    a = t0 - b * f0
    return sum(a + b * trial_flops(t) for t in study_trials) / (cpu_count() // THREADS_PER_JOB)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist", default=os.environ.get(mnist.MIRROR_ENV, str(REPO.parent / "shared/mnist")))
    ap.add_argument("--quick", action="store_true", help="3 epochs, 6 trainings per configuration")
    ap.add_argument("--record", metavar="NOTE", help="add the run to results/timings.json, with this note")
    ap.add_argument("--native-child", metavar="PAIRS", help=argparse.SUPPRESS)  # native_times' own child
    args = ap.parse_args()
    epochs, per_config = (3, 6) if args.quick else (10, 6)
    os.environ["TQDM_DISABLE"] = "1"
    params = params_file.load(REPO / "params.yaml")
    sets = trial_sets(params, epochs, per_config)
    if args.native_child:
        print(json.dumps(best_times(sets, Path(args.native_child), "native")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        pairs = pair_draws(Path(tmp), args.mnist)
        peak = fma_peak()
        print(f"float32 FMA peak of one core: {peak / 1e9:.1f} GFLOP/s (a 2048^3 product on the Haswell kernels)")
        best = {path: best_times(sets, pairs, path) for path in ("mkl", "openblas")}
        best["native"] = native_times(args, pairs)
    os.environ.pop(numerics.GEMM_ENV)
    s = summary(sets, best, peak, params, epochs)
    report(s)
    if args.record is not None:
        record(s, args.record)


def summary(sets: dict[str, list[Trial]], best: dict, peak: float, params: dict, epochs: int) -> dict:
    """The measurements, as ``results/timings.json`` records them (``--record``)."""
    largest = sum(trial_flops(t) for t in sets["largest"])
    study_trials = full_study(params)  # builds the original's 38,500 trials: once
    labels = {"cv": "default cross-validation grid, sampled", "largest": "siamese-plus's recipe, 32/256/256"}
    return {
        "sets": {
            name: {
                "label": f"{labels[name]} ({epochs} epochs)",
                "trainings": len(trials),
                **{f"{path}_s": round(best[path][name], 2) for path in best},
            }
            for name, trials in sets.items()
        },
        "portable_speedup": round(sum(best["mkl"].values()) / sum(best["openblas"].values()), 2),
        "native_speedup": round(sum(best["mkl"].values()) / sum(best["native"].values()), 2),
        "fma_peak_gflops": round(peak / 1e9, 1),
        "largest_fraction_of_fma_peak": {p: round(largest / best[p]["largest"] / peak, 2) for p in best},
        "full_study_trainings": len(study_trials),
        "full_study_projected_h": round(projection(sets, best["openblas"], study_trials) / 3600, 1),
    }


def report(s: dict) -> None:
    print("| set | trainings | MKL_CBWR=COMPATIBLE, s | OpenBLAS Haswell, s | ratio | native (no pins), s | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in s["sets"].values():
        print(
            f"| {r['label']} | {r['trainings']} | {r['mkl_s']:.2f} | {r['openblas_s']:.2f} | "
            f"{r['mkl_s'] / r['openblas_s']:.2f}x | {r['native_s']:.2f} | {r['mkl_s'] / r['native_s']:.2f}x |"
        )
    for path, fraction in s["largest_fraction_of_fma_peak"].items():
        print(f"{path}: largest widths at {fraction:.0%} of one core's FMA peak")
    print(
        f"projected full study here ({s['full_study_trainings']} trainings of 25 epochs, portable road, "
        f"{cpu_count()} cores): {s['full_study_projected_h']:.1f} h"
    )
    print(f"native speedup (train.numerics: native, no pins, this machine only): {s['native_speedup']:.2f}x")
    print(f"portable speedup: {s['portable_speedup']:.2f}x")


def record(s: dict, note: str) -> None:
    """Add the run to results/timings.json, with its command, commit and machine."""
    path = REPO / "results/timings.json"
    timings = json.loads(path.read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    timings["numerics_benchmark"] = {
        "command": "python benchmarks/numerics.py --quick",
        "commit": commit.stdout.strip(),
        "machine": numerics.machine(),
        "mkl_cbwr": numerics.ENV_PINS["MKL_CBWR"],
        "gemm": numerics.products(),
        "note": note,
        **s,
    }
    path.write_text(json.dumps(timings, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
