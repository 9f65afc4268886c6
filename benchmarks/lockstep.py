"""Benchmark: per-model loop vs lockstep engine on a set of trainings spanning the study's grid.

Both engines run the same trainings through ``digitpairs.training.runner.run_trials`` on this machine,
each with both ways of using the cores (1 process x all threads, or one 1-thread process per core);
the faster of the two is reported for each engine. The lockstep engine runs as the pipeline does
(numeric pins on, its products on the portable road); the per-model loop runs as a user would run it
without this project, in a child process with no pins at all (PyTorch's defaults), so the baseline
is the fastest plain PyTorch here. FLOPs are counted analytically (training: 3 x forward MACs x 2 per
sample and epoch; evaluation: forward MACs x 2 per val/test pair) and compared with the machine's
float32 FMA peak (:func:`fma_peak` on every core).

    python -m benchmarks.lockstep --quick        # under 5 minutes on a 2-core machine
    python -m benchmarks.lockstep --quick --profile   # also the top operators of one lockstep job
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from digitpairs.core import numerics
from digitpairs.data import mnist
from digitpairs.data.pairs import draw_path, load_draw, write_draws
from digitpairs.training.lockstep import run_lockstep
from digitpairs.training.models import ModelConfig
from digitpairs.training.runner import run_trials
from digitpairs.training.semantics import TrainConfig
from digitpairs.training.trials import Trial, make_trial

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SMALL, LARGE = dict(nbch1=8, nbch2=8, nbfch=64), dict(nbch1=64, nbch2=64, nbfch=512)
LRS = (0.001, 0.01, 0.1, 0.25, 1.0)


def forward_macs(cfg: ModelConfig) -> int:
    """Multiply-accumulates of one pair's forward pass (conv2 on a 6x6 map is a 36*nbch1-input linear)."""
    d = 1 if cfg.arch == "pair" else 2  # images through the branch per pair
    n1, n2, nf, n_out = cfg.nbch1, cfg.nbch2, cfg.nbfch, 2 if cfg.arch == "pair" else 10
    macs = d * (144 * 9 * (3 - d) * n1 + 36 * n1 * n2 + n2 * nf + nf * n_out)
    if cfg.skip_connections:
        macs += 392 * (36 * n1 + n2)
    return macs + (20 * 2 if cfg.arch == "siamese" else 0)


def trial_flops(t: Trial, n_train: int = 1000, n_eval: int = 2000) -> float:
    """Training plus evaluation FLOPs of one trial."""
    macs = forward_macs(t.model)
    return 2.0 * macs * (3 * n_train * t.train.epochs + n_eval)


def fma_peak(n: int = 2048, reps: int = 5) -> float:
    """float32 FLOP/s of one core: the best of ``reps`` n^3 products on OpenBLAS's Haswell kernels (AVX2 +
    FMA), one thread; a large product runs them near the rate of the core's FMA units."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    best = float("inf")
    with numerics.blas_threads(1):
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def spanning_set(per_config: int, epochs: int, full: bool) -> dict[str, list[Trial]]:
    """Trials of both archs, small and large widths, with and without batch norm and skip connections."""
    combos = [(False, False), (True, True)] + ([(True, False), (False, True)] if full else [])
    sets: dict[str, list[Trial]] = {"small": [], "large": []}
    for name, widths in (("small", SMALL), ("large", LARGE)):
        for variant in ("pair", "siamese-2"):
            for bn, skip in combos:
                for i in range(per_config):
                    cfg = TrainConfig(lr=LRS[i % len(LRS)], epochs=epochs)
                    w = dict(widths, batch_norm=bn, skip_connections=skip)
                    sets[name].append(make_trial(variant, w, cfg, draw=i % 4, seed=1))
    return sets


def profile_job(trials: list[Trial], pairs: Path, rows: int = 15) -> None:
    """Top operators by self CPU time (torch.profiler) of one lockstep job, run in this process with
    the current thread count: the largest widths' siamese trials with batch norm and skips (the
    slowest group of the set), as ``run_lockstep`` runs them (split into CPU chunks)."""
    from torch.profiler import ProfilerActivity, profile

    job = [t for t in trials if t.model.arch == "siamese" and t.model.batch_norm and t.model.skip_connections]
    job = job or trials
    draws = {d: load_draw(draw_path(pairs, d)) for d in sorted({t.draw for t in job})}
    run_lockstep(job[:2], draws)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        run_lockstep(job, draws)
        secs = time.perf_counter() - t0
    cfg = job[0].model
    print(
        f"profile: {len(job)} {cfg.arch} trainings, widths {cfg.nbch1}/{cfg.nbch2}/{cfg.nbfch}, batch norm and "
        f"skips, {job[0].train.epochs} epoch(s), {torch.get_num_threads()} threads: {secs:.2f} s (profiled)"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))


def pair_draws(folder: Path, mirror: str) -> Path:
    """Four pair draws of seed 1 in ``folder``, from the MNIST files in ``mirror``."""
    os.environ[mnist.MIRROR_ENV] = mirror
    root = mnist.download(folder / "mnist")
    splits = (*mnist.load(root, train=True), *mnist.load(root, train=False))
    write_draws(splits, folder / "pairs", n_draws=4, seed=1)
    return folder / "pairs"


def timed(trials: list[Trial], pairs: Path, engine: str, workers: int, batch: int) -> float:
    t0 = time.perf_counter()
    threads = max(1, (os.cpu_count() or 1) // workers)
    run_trials(trials, pairs, engine=engine, workers=workers, threads=threads, batch=batch, desc=engine)
    return time.perf_counter() - t0


def measure(engine: str, sets: dict[str, list[Trial]], pairs: Path, batch: int) -> dict:
    """Seconds per set in each way of using the cores; returns the fastest way's, with its name."""
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    run_trials([sets["small"][0], sets["large"][0]], pairs, engine=engine, workers=1, batch=2)  # warm-up
    best: dict = {}
    for mode, workers in {f"1 process x {cores} threads": 1, f"{cores} processes x 1 thread": cores}.items():
        secs = {name: timed(trials, pairs, engine, workers, batch) for name, trials in sets.items()}
        total, n = sum(secs.values()), sum(len(t) for t in sets.values())
        rates = ", ".join(f"{k} {len(sets[k]) / v:.2f}/s" for k, v in secs.items())
        print(f"{engine:8s} {mode:24s}: {n / total:7.2f} trainings/s  ({rates})", file=sys.stderr, flush=True)
        if not best or total < best["total"]:
            best = {"total": total, "mode": mode, **secs}
    return best


def unpinned_loop(args: argparse.Namespace) -> dict:
    """The per-model loop as a user would run it without this project: a child process with none of the
    numeric pins (PyTorch's defaults: the CPU's own ISA, oneDNN and MKL's fastest paths)."""
    env = numerics.child_env("native")
    cmd = [sys.executable, "-m", "benchmarks.lockstep", "--engine", "loop", "--mnist", args.mnist]
    cmd += ["--batch", str(args.batch)]
    cmd += ["--quick"] * args.quick + ["--epochs", str(args.epochs)] * bool(args.epochs)
    cmd += ["--per-config", str(args.per_config)] * bool(args.per_config)
    cp = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(cp.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist", default=os.environ.get(mnist.MIRROR_ENV, str(REPO.parent / "shared/mnist")))
    ap.add_argument("--quick", action="store_true", help="fewer trainings, 1 epoch, two (bn, skip) combos")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--per-config", type=int, default=None, help="trainings per (arch, widths, bn, skip)")
    ap.add_argument("--batch", type=int, default=64, help="lockstep K upper bound (run_lockstep splits further on CPU)")
    ap.add_argument("--profile", action="store_true", help="also print the top operators of one lockstep job")
    ap.add_argument("--engine", choices=("both", "loop"), default="both", help=argparse.SUPPRESS)  # the child's
    args = ap.parse_args()
    epochs = args.epochs or (1 if args.quick else 5)
    per_config = args.per_config or (12 if args.quick else 40)
    cores = os.cpu_count() or 1
    os.environ["TQDM_DISABLE"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        pairs = pair_draws(Path(tmp), args.mnist)
        sets = spanning_set(per_config, epochs, full=not args.quick)
        if args.engine == "loop":
            print(json.dumps(measure("loop", sets, pairs, args.batch)))
            return
        peak = fma_peak() * cores
        print(f"float32 FMA peak: {peak / 1e9:.1f} GFLOP/s ({cores} x one core's 2048^3 product, Haswell kernels)")
        best = {"lockstep": measure("lockstep", sets, pairs, args.batch), "loop": unpinned_loop(args)}
        if args.profile:
            profile_job(sets["large"], pairs)
    summary(sets, best, peak, epochs, args.batch)


def summary(sets: dict[str, list[Trial]], best: dict, peak: float, epochs: int, batch: int) -> None:
    n = sum(len(t) for t in sets.values())
    flops = {name: sum(trial_flops(t) for t in trials) for name, trials in sets.items()}
    loop, lock = best["loop"], best["lockstep"]
    print(f"set: {n} trainings, {epochs} epoch(s), both archs, widths {SMALL} and {LARGE}")
    print(f"loop     best, unpinned ({loop['mode']}): {n / loop['total']:.2f} trainings/s")
    print(f"lockstep best, portable ({lock['mode']}, K<={batch}): {n / lock['total']:.2f} trainings/s")
    for engine, res in (("loop", loop), ("lockstep", lock)):
        whole = sum(flops.values()) / res["total"]
        large = flops["large"] / res["large"]
        print(
            f"{engine:8s} FLOP/s: {whole / 1e9:.1f} G = {whole / peak:.0%} of the FMA peak; "
            f"largest widths: {large / 1e9:.1f} G = {large / peak:.0%}"
        )
    print(f"speedup: {loop['total'] / lock['total']:.2f}x")


if __name__ == "__main__":
    main()
