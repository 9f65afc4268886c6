"""The study's full grid (SPEC experiment 1: 1280 combinations x 10 draws x 3 variants) on one GPU.

On a CUDA machine, from a copy of the repository (no dvc needed; torch, pandas, pyyaml, safetensors,
torchvision, tqdm), with the four MNIST files in a folder:

    python3 scripts/gpu_full_grid.py run --mnist MNIST_DIR --out OUT [--state STATE] [--budget 500]

It checks the CUDA lockstep engine against the CPU loop, checks determinism, tunes (CUDA graphs,
TF32, processes per GPU), projects the grid's time, runs the grid, then the loss-weight sweep, the
gradient norms and the final training on all 10 draws, and writes OUT/results.tar.gz, OUT/log.txt and
OUT/profile.txt. Trials are checkpointed in STATE: a second run resumes where the first stopped (a
copy of STATE goes to OUT/state.tar.gz every 20 s, for machines that keep nothing). Back on a
machine with the project installed:

    python scripts/gpu_full_grid.py publish OUT1 [OUT2 ...]        # -> results/full-grid/
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import replace
from hashlib import sha256
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's package, whatever is installed

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import digitpairs  # noqa: E402,F401  (numeric pins before torch computes)
from benchmarks.lockstep import trial_flops  # noqa: E402
from digitpairs.core import numerics, params  # noqa: E402
from digitpairs.core.io import finite_or_null, read_cv_tables, replacing, write_csv, write_json  # noqa: E402
from digitpairs.core.variants import GRID_ARCHS, variant_score  # noqa: E402

# the study's three variants, those of the grid (siamese-plus has its own stage, `recipe`)
from digitpairs.core.variants import STUDY_VARIANTS as VARIANTS  # noqa: E402
from digitpairs.data import mnist  # noqa: E402
from digitpairs.data.pairs import draw_path, load_draw, write_draws  # noqa: E402
from digitpairs.training import lockstep, study  # noqa: E402
from digitpairs.training.models import ModelConfig  # noqa: E402
from digitpairs.training.runner import Checkpoint, run_trials  # noqa: E402
from digitpairs.training.train import TrainConfig  # noqa: E402
from digitpairs.training.trials import Outcome, Trial, make_trial  # noqa: E402

# The original's grid (SPEC.md, experiment 1), all ten draws everywhere, on the GPU.
FULL_GRID = {
    "data": {"n_draws": 10},
    "train": {"device": "cuda"},
    "cv": {
        "n_draws": 10,
        "nbch1": [8, 16, 32, 64],
        "nbch2": [8, 16, 32, 64],
        "nbfch": [64, 128, 256, 512],
        "lr": [0.001, 0.01, 0.1, 0.25, 1.0],
    },
    "loss_weights": {"n_draws": 10},
}
# --tiny: the same run in a minute on a CPU, to test this script without a GPU.
TINY_GRID = {
    "data": {"n_draws": 2},
    "train": {"epochs": 2},
    "cv": {"n_draws": 2, "nbch1": [4, 8], "nbch2": [8], "nbfch": [16], "lr": [0.1, 1.0]},
    "loss_weights": {"n_draws": 2},
    "recipe": {"n_draws": 2},  # unused by the grid script, but validated with the rest
}
RESULTS = REPO / "results/full-grid"
LARGEST = dict(nbch1=64, nbch2=64, nbfch=512, batch_norm=True, skip_connections=True)
T0 = time.perf_counter()
LOG: list[str] = []
OUT = Path(".")
DEV = "cuda"


class Deadline(BaseException):
    """Raised by the budget alarm; run_trials cancels queued jobs and keeps the checkpoint."""


def log(msg: str) -> None:
    line = f"[{time.perf_counter() - T0:6.1f}s] {msg}"
    print(line, flush=True)
    LOG.append(line)
    (OUT / "log.txt").write_text("\n".join(LOG) + "\n")


def full_params(tiny: bool) -> dict:
    p = params.load(REPO / "params.yaml")
    for grid in (FULL_GRID, TINY_GRID) if tiny else (FULL_GRID,):
        for section, values in grid.items():
            p[section] = {**p[section], **values}
    p["train"]["device"] = DEV
    return params.validate(p)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def sh(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        return f"unavailable: {err}"


def snapshot(state: Path, stop: threading.Event) -> None:
    """Every 20 s, STATE as OUT/state.tar.gz (written then renamed: never a torn archive)."""
    while not stop.wait(20):
        pack(state, OUT / "state.tar.gz", "state", "*.jsonl")


def pack(folder: Path, dest: Path, arcname: str, pattern: str = "**/*") -> None:
    """``folder``'s files matching ``pattern`` as a .tar.gz (written, then renamed: never torn)."""
    with replacing(dest) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for f in sorted(folder.glob(pattern)):
            if f.is_file() and not f.name.endswith(".partial"):
                tar.add(f, arcname=f"{arcname}/{f.relative_to(folder)}")


def cuda_time(fn, reps: int = 1) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def matmul_peak(tf32: bool) -> float:
    n = 8192 if DEV == "cuda" else 1024
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a, b = torch.randn(n, n, device=DEV), torch.randn(n, n, device=DEV)
    cuda_time(lambda: a @ b, 3)
    secs = cuda_time(lambda: a @ b, 10)
    torch.backends.cuda.matmul.allow_tf32 = False
    return 2 * n**3 / secs


def states_equal(a, b) -> bool:
    return all(
        x.trial == y.trial and x.scores == y.scores and all(torch.equal(x.state[k], y.state[k]) for k in x.state)
        for x, y in zip(a, b, strict=True)
    )


def rel_diff(a: dict, b: dict) -> float:
    return max(
        float((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp_min(1e-12))
        for k in a
        if not k.endswith("num_batches_tracked")
    )


def run(args: argparse.Namespace) -> None:
    global OUT, DEV, LARGEST
    OUT, DEV = Path(args.out), args.device
    if args.tiny:
        LARGEST = dict(LARGEST, nbch1=8, nbch2=8, nbfch=16)
    OUT.mkdir(parents=True, exist_ok=True)
    state = Path(args.state)
    pairs = state / "pairs"
    state.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    snapper = threading.Thread(target=snapshot, args=(state, stop), daemon=True)
    snapper.start()
    prov: dict = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": {}}
    tuning: dict = {}

    def phase(name: str, t: float) -> None:
        prov["wall_s"][name] = round(time.perf_counter() - t, 1)

    # 1. environment
    t = time.perf_counter()
    p = full_params(args.tiny)
    cuda = DEV == "cuda"
    props = torch.cuda.get_device_properties(0) if cuda else None
    prov |= {
        "gpu": torch.cuda.get_device_name(0) if cuda else "none (CPU test run)",
        "gpu_memory_gib": round(props.total_memory / 2**30, 1) if cuda else 0,
        "multiprocessors": props.multi_processor_count if cuda else 0,
        "nvidia_smi": sh("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv"),
        "cpu": sh("sh", "-c", "lscpu | grep -E 'Model name|Vendor ID|^CPU\\(s\\)'"),
        "cpu_avx512": "avx512f" in Path("/proc/cpuinfo").read_text(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "numerics": numerics.fingerprint(DEV),
        "params": p,
    }
    log(f"GPU {prov['gpu']} ({prov['gpu_memory_gib']} GiB, {prov['multiprocessors']} SMs); torch {torch.__version__}")
    log(f"CPU: {prov['cpu']!r}; avx512: {prov['cpu_avx512']}")

    # 2. pair draws, exactly as the pipeline's pairs stage makes them
    os.environ[mnist.MIRROR_ENV] = str(Path(args.mnist).resolve())
    root = mnist.download(state / "mnist")
    splits = (*mnist.load(root, train=True), *mnist.load(root, train=False))
    write_draws(splits, pairs, p["data"]["n_draws"], p["data"]["seed"], p["data"]["n_pairs"])
    prov["draw_sha256"] = [sha256(draw_path(pairs, d).read_bytes()).hexdigest() for d in range(p["data"]["n_draws"])]
    log(f"draws ready; draw 0 sha256 {prov['draw_sha256'][0][:16]}")
    fp = (
        None
        if args.skip_checks
        else subprocess.run(
            [sys.executable, "-m", "tests.cpu_fingerprint", str(pairs)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
    )
    prov["cpu_fingerprint"] = (fp.stdout.strip() or fp.stderr[-500:]) if fp else "skipped"
    log(f"CPU fingerprint with pins on this host's CPU: {prov['cpu_fingerprint']}")
    if (
        cuda and not args.skip_checks
    ):  # a CUDA-graph capture that fails can spoil its process's CUDA context: try it in a child first
        smoke = subprocess.run(
            [sys.executable, __file__, "graph-smoke", str(pairs)], cwd=REPO, capture_output=True, text=True, timeout=300
        )
        ok = smoke.returncode == 0
        prov["cuda_graphs"] = "on" if ok else f"off: {smoke.stderr[-800:]}"
        os.environ["DIGITPAIRS_CUDA_GRAPHS"] = "1" if ok else "0"
        lockstep.CUDA_GRAPHS = ok
        log(f"CUDA graphs smoke test: {'passed' if ok else 'FAILED, graphs off'} {smoke.stdout.strip()[-300:]}")
        if not ok:
            log(smoke.stderr[-1500:])
    phase("environment_and_draws", t)

    trials = {arch: study.cv_trials(arch, p) for arch in GRID_ARCHS}
    total = sum(len(v) for v in trials.values())
    ckpt = state / "cv.jsonl"  # one record of every grid trial, whichever phase trained it
    workers = args.workers
    if not args.skip_checks:
        workers = checks_and_tuning(args, p, pairs, prov, tuning, trials, ckpt, phase)

    # 6. the grid, under the budget
    left = args.budget - (time.perf_counter() - T0)
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(Deadline()))
    signal.alarm(max(1, int(left - args.reserve)))  # keep time for the small experiments and the tables
    t = time.perf_counter()
    outcomes, complete = {}, True
    try:
        for arch in trials:
            outcomes[arch] = run_trials(
                trials[arch],
                pairs,
                engine="lockstep",
                device=DEV,
                workers=workers,
                batch=100,
                checkpoint=ckpt,
                desc=f"cv@{arch}",
            )
            log(f"cv@{arch}: {len(trials[arch])} trainings done")
    except Deadline:
        complete = False
        log("budget reached: the grid is partial; rerun the same command to resume from the checkpoints")
    signal.alarm(0)
    grid_s = time.perf_counter() - t
    phase("grid", t)
    prov["grid_complete"] = complete
    tables = state / "results"
    if complete:
        grid_flops = sum(trial_flops(x) for v in trials.values() for x in v)
        tuning["grid"] = {
            "trainings": total,
            "wall_s": grid_s,
            "trainings_per_s": total / grid_s,
            "tflops": grid_flops / grid_s / 1e12,
        }
        log(
            f"grid: {total} trainings in {grid_s:.0f} s = {total / grid_s:.0f}/s, "
            f"{grid_flops / grid_s / 1e12:.1f} TFLOP/s"
        )
        selected = {}
        for arch, outs in outcomes.items():
            table = study.cv_table(outs, p["cv"]["score_on"])
            write_csv(table, tables / f"cv/{arch}.csv")
            selected |= study.select(table)
            write_json(study.select(table), tables / f"cv/{arch}_selected.json")
        # 7. the experiments that follow the selection, on all draws
        t = time.perf_counter()
        lw = p["loss_weights"]
        outs = run_trials(
            study.loss_weight_trials(selected, p),
            pairs,
            engine="lockstep",
            device=DEV,
            workers=workers,
            batch=100,
            checkpoint=state / "loss_weights.jsonl",
            desc="loss_weights",
        )
        write_csv(study.loss_weight_table(outs, lw["exponents"], lw["score_on"]), tables / "loss_weights.csv")
        outs = run_trials(
            study.grad_norm_trials(selected, p),
            pairs,
            engine="lockstep",
            device=DEV,
            workers=1,
            record_grad_norms=True,
            desc="grad_norms",
        )
        write_csv(study.grad_norm_table(outs), tables / "grad_norms.csv")
        outs = run_trials(
            study.final_trials(selected, p, VARIANTS),
            pairs,
            engine="lockstep",
            device=DEV,
            workers=1,
            batch=100,
            desc="train",
        )
        scores = pd.DataFrame(
            [
                {
                    "variant": o.trial.variant,
                    "draw": o.trial.draw,
                    "accuracy": variant_score(o.trial.variant, o.scores["test"]),
                }
                for o in outs
            ]
        )
        write_csv(scores, tables / "test_scores.csv")
        write_json(study.final_metrics(scores, selected, VARIANTS), tables / "metrics.json")
        phase("loss_weights_grad_norms_final", t)
        for v, m in json.loads((tables / "metrics.json").read_text()).items():
            log(
                f"final {v:10s}: test {m['accuracy_mean']:.4f} +- {m['accuracy_std']:.4f} "
                f"CI [{m['ci95_low']:.4f}, {m['ci95_high']:.4f}] config {m['config']}"
            )
    prov["total_wall_s"] = round(time.perf_counter() - T0, 1)
    write_json(finite_or_null(prov), tables / "provenance.json")
    write_json(finite_or_null(tuning), tables / "tuning.json")
    shutil.copy(OUT / "log.txt", tables / "log.txt")
    pack(tables, OUT / "results.tar.gz", "results")
    stop.set()
    snapper.join()
    pack(state, OUT / "state.tar.gz", "state", "*.jsonl")
    log(f"done in {prov['total_wall_s']} s; complete: {complete}")


def checks_and_tuning(args, p: dict, pairs: Path, prov: dict, tuning: dict, trials: dict, ckpt: Path, phase) -> int:
    """Phases 3-5: CUDA against the CPU loop, determinism, tuning, processes per GPU; returns the processes."""
    cuda = DEV == "cuda"
    # 3. CUDA lockstep against the CPU loop
    t = time.perf_counter()
    widths = dict(nbch1=32, nbch2=64, nbfch=256, batch_norm=True, skip_connections=True)
    equiv = {}
    for epochs in (1, 25):
        eq = [
            make_trial(v, widths if not args.tiny else LARGEST, TrainConfig(lr=0.1, epochs=epochs), draw=d, seed=1)
            for v in VARIANTS
            for d in (0, 1)
        ]
        cpu = run_trials(eq, pairs, engine="loop", device="cpu", workers=6, keep_state=True, desc="cpu")
        gpu = run_trials(eq, pairs, engine="lockstep", device=DEV, workers=1, keep_state=True, desc="gpu")
        rows = []
        for c, g in zip(cpu, gpu, strict=True):
            v = c.trial.variant
            rows.append(
                {
                    "variant": v,
                    "draw": c.trial.draw,
                    "epochs": epochs,
                    "weights_rel_diff": rel_diff(c.state, g.state),
                    "cpu_test": variant_score(v, c.scores["test"]),
                    "gpu_test": variant_score(v, g.scores["test"]),
                }
            )
        equiv[epochs] = rows
        for r in rows:
            log(
                f"equivalence {epochs:2d} epoch(s) {r['variant']:10s} draw {r['draw']}: weights rel diff "
                f"{r['weights_rel_diff']:.2e}, test acc cpu {r['cpu_test']:.3f} gpu {r['gpu_test']:.3f}"
            )
    tuning["equivalence"] = equiv
    phase("equivalence", t)

    # 4. determinism, CUDA graphs, TF32, deterministic-mode cost: one job of the largest widths (K=100)
    t = time.perf_counter()
    nd = p["data"]["n_draws"]
    big = [
        make_trial(v.name, LARGEST, TrainConfig(lr=lr, epochs=p["train"]["epochs"]), draw=d, seed=1)
        for v in study.variants_of("siamese")
        for lr in p["cv"]["lr"]
        for d in range(nd)
    ]
    draws = {d: load_draw(draw_path(pairs, d)) for d in range(nd)}
    if cuda:
        numerics.deterministic_cuda()
    graphs_ok = lockstep.CUDA_GRAPHS  # off if the smoke test failed: then every "graphs" run is eager

    def job(graphs: bool) -> tuple[float, list]:
        lockstep.CUDA_GRAPHS = graphs
        res: list = []
        secs = cuda_time(lambda: res.extend(lockstep.run_lockstep(big, draws, device=DEV)))
        return secs, res

    job(graphs_ok)  # warm-up: kernels, cuBLAS handles
    t_graph, a = job(graphs_ok)
    t_graph2, b = job(graphs_ok)
    t_eager, e = job(False)
    torch.use_deterministic_algorithms(False)
    t_nondet, _ = job(graphs_ok)
    torch.backends.cuda.matmul.allow_tf32 = True
    t_tf32, f = job(graphs_ok)
    torch.backends.cuda.matmul.allow_tf32 = False
    if cuda:
        numerics.deterministic_cuda()
    lockstep.CUDA_GRAPHS = graphs_ok
    flops = sum(trial_flops(x) for x in big)
    acc = {
        name: sum(variant_score(o.trial.variant, o.scores["test"]) for o in res) / len(res)
        for name, res in (("fp32", a), ("tf32", f))
    }
    peak32, peak_tf32 = matmul_peak(False), matmul_peak(True)
    tuning["largest_job"] = {
        "trials": len(big),
        "widths": LARGEST,
        "flops": flops,
        "graphs_s": t_graph,
        "graphs_repeat_s": t_graph2,
        "eager_s": t_eager,
        "nondeterministic_s": t_nondet,
        "tf32_s": t_tf32,
        "repeat_identical": states_equal(a, b),
        "graphs_equal_eager": states_equal(a, e),
        "mean_test_acc_fp32": acc["fp32"],
        "mean_test_acc_tf32": acc["tf32"],
        "max_abs_test_acc_diff_tf32": max(
            abs(variant_score(x.trial.variant, x.scores["test"]) - variant_score(y.trial.variant, y.scores["test"]))
            for x, y in zip(a, f, strict=True)
        ),
        "matmul_fp32_flops": peak32,
        "matmul_tf32_flops": peak_tf32,
        "fraction_of_fp32_matmul": flops / t_graph / peak32,
    }
    j = tuning["largest_job"]
    log(
        f"largest widths, {len(big)} trials: graphs {t_graph:.2f}s "
        f"(again {t_graph2:.2f}s, identical: {j['repeat_identical']}),"
        f" eager {t_eager:.2f}s (equal to graphs: {j['graphs_equal_eager']}), non-deterministic {t_nondet:.2f}s,"
        f" TF32 {t_tf32:.2f}s"
    )
    log(
        f"  {flops / t_graph / 1e12:.1f} TFLOP/s = {j['fraction_of_fp32_matmul']:.0%} of measured fp32 matmul "
        f"({peak32 / 1e12:.1f} TFLOP/s; TF32 matmul {peak_tf32 / 1e12:.1f}); mean test acc fp32 {acc['fp32']:.4f}"
        f" tf32 {acc['tf32']:.4f}, max per-trial diff {j['max_abs_test_acc_diff_tf32']:.3f}"
    )
    profile(big[:20], draws)
    phase("determinism_and_tuning", t)

    # 5. processes per GPU, on samples of the grid itself (checkpointed: they count towards it)
    t = time.perf_counter()
    total = sum(len(v) for v in trials.values())
    groups = {arch: lockstep.group_trials(v, 100) for arch, v in trials.items()}
    rates = {}
    for i, workers in enumerate((1, args.workers)):
        sample = [x for arch in trials for g in groups[arch][i * 8 :: 32] for x in g]
        if not sample:
            continue
        done = time.perf_counter()
        run_trials(
            sample, pairs, engine="lockstep", device=DEV, workers=workers, batch=100, checkpoint=ckpt, desc="sample"
        )
        rates[workers] = len(sample) / (time.perf_counter() - done)
        log(f"sample of {len(sample)} grid trials with {workers} process(es): {rates[workers]:.0f} trainings/s")
    workers = max(rates, key=rates.get)
    projection = total / rates[workers]
    tuning["processes"] = {"trainings_per_s": rates, "chosen": workers, "projected_grid_s": projection}
    log(f"projected full grid ({total} trainings) with {workers} processes: {projection:.0f} s")
    phase("process_tuning", t)
    return workers


def profile(job, draws) -> None:
    """Where one eager job's time goes on the GPU (top kernels), to OUT/profile.txt."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    short = [replace(x, train=replace(x.train, epochs=2)) for x in job]
    graphs, lockstep.CUDA_GRAPHS = lockstep.CUDA_GRAPHS, False
    try:
        cuda = DEV == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with prof(activities=activities) as pr:
            lockstep.run_lockstep(short, draws, device=DEV)
            sync()
        table = pr.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=25)
    except Exception as err:  # the profile is a report, not a result: never let it stop the run
        table = f"profile failed: {err!r}"
    lockstep.CUDA_GRAPHS = graphs
    (OUT / "profile.txt").write_text(table + "\n")
    log("profile written to profile.txt")


def graph_smoke(pairs: Path) -> None:
    """Child process: one small job with and without CUDA graphs; exit 1 on an error or a real difference
    (bitwise equality is reported, and checked again on the largest job)."""
    numerics.deterministic_cuda()
    widths = dict(nbch1=8, nbch2=16, nbfch=32, batch_norm=True, skip_connections=True)
    job = [make_trial(v, widths, TrainConfig(lr=0.1, epochs=2), draw=0, seed=1) for v in ("siamese-2", "siamese-10")]
    draws = {0: load_draw(draw_path(pairs, 0))}
    lockstep.CUDA_GRAPHS = True
    a = lockstep.run_lockstep(job, draws, device="cuda")
    lockstep.CUDA_GRAPHS = False
    b = lockstep.run_lockstep(job, draws, device="cuda")
    diff = max(rel_diff(x.state, y.state) for x, y in zip(a, b, strict=True))
    print(f"graphs equal eager bit for bit: {states_equal(a, b)}; weights rel diff {diff:.1e}")
    sys.exit(0 if diff < 1e-3 else 1)


def publish(args: argparse.Namespace) -> None:
    """GPU runs -> results/full-grid/: tables from the trial checkpoint (complete or not), the run's
    reports, provenance, and the study's cross-validation figures drawn by the project's own code."""
    from digitpairs.report import figures

    global DEV
    DEV = "cpu"  # the params as the GPU ran them, validated here without a GPU
    runs = [Path(r) for r in args.runs]
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(runs[-1] / "state.tar.gz") as tar:
            tar.extractall(tmp, filter="data")
        done = Checkpoint(Path(tmp) / "state/cv.jsonl").done.values()
    by_key = {}
    for row in done:
        t = row["trial"]
        trial = Trial(t["variant"], ModelConfig(**t["model"]), TrainConfig(**t["train"]), t["draw"], t["seed"])
        by_key[trial.key()] = Outcome(trial, row["scores"])
    p = full_params(tiny=False)
    dest = RESULTS
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "cv").mkdir(parents=True)
    summary, frames = {}, []
    for arch in GRID_ARCHS:
        grid = study.cv_trials(arch, p)
        outs = [by_key[t.key()] for t in grid if t.key() in by_key]
        table = study.cv_table(outs, p["cv"]["score_on"])
        # a combination counts once all its draws finished; the rest are listed as missing
        key = [*study.CONFIG_KEYS, "variant"]
        counts = table.groupby(key)["draw"].transform("count")
        complete = table[counts == p["cv"]["n_draws"]]
        frames.append(complete)
        missing = len(grid) - len(outs)
        write_table(table, dest / f"cv/{arch}.csv")
        selected = study.select(complete)
        write_json(selected, dest / f"cv/{arch}_selected.json")
        shapes = {
            (t.model.nbch1, t.model.nbch2, t.model.nbfch, t.model.batch_norm, t.model.skip_connections)
            for t in grid
            if t.key() not in by_key
        }
        summary[arch] = {
            "trainings": len(grid),
            "finished": len(outs),
            "missing": missing,
            "combinations_complete": int(len(complete) / p["cv"]["n_draws"] / len(study.variants_of(arch))),
            "combinations": len(study.grid(p["cv"])),
            "shapes_missing": sorted(map(list, shapes)),
            "selected_over_complete_combinations": selected,
        }
    cv = pd.concat(frames, ignore_index=True)
    for name in figures.CV_FIGURES:
        figures.save(figures.draw_cv(cv, name), dest / "plots", name, 150)
    provs = []
    for run in runs:
        with tarfile.open(run / "results.tar.gz") as tar:
            provs.append(json.loads(tar.extractfile("results/provenance.json").read()))
    with tarfile.open(runs[0] / "results.tar.gz") as tar:
        tuning = json.loads(tar.extractfile("results/tuning.json").read())
    first = provs[0]  # the run that checked and tuned: environment, draws, numerics
    run_walls = [{"wall_s": q["wall_s"], "grid_complete": q["grid_complete"]} for q in provs]
    logs = [f"## run {i}\n" + (run / "log.txt").read_text() for i, run in enumerate(runs, 1)]
    (dest / "log.txt").write_text("\n".join(logs))
    shutil.copy(runs[0] / "profile.txt", dest / "profile.txt")
    write_json(finite_or_null(tuning), dest / "tuning.json")
    grid_s = sum(r["wall_s"].get("grid", 0) + r["wall_s"].get("process_tuning", 0) for r in run_walls)
    finished = summary["pair"]["finished"] + summary["siamese"]["finished"]
    provenance = {
        k: first[k]
        for k in (
            "gpu",
            "gpu_memory_gib",
            "multiprocessors",
            "nvidia_smi",
            "cpu",
            "cpu_avx512",
            "torch",
            "cuda",
            "python",
            "numerics",
            "params",
            "draw_sha256",
        )
    }
    provenance["grid"] = {
        "complete": all(summary[a]["missing"] == 0 for a in GRID_ARCHS),
        "trainings_finished": finished,
        "trainings_total": summary["pair"]["trainings"] + summary["siamese"]["trainings"],
        "wall_s": round(grid_s, 1),
        "trainings_per_s": round(finished / grid_s, 1),
        "per_arch": {
            a: {k: v for k, v in summary[a].items() if k != "selected_over_complete_combinations"} for a in GRID_ARCHS
        },
        "runs": run_walls,
    }
    provenance["params"]["train"]["device"] = "cuda"
    default = read_cv_tables(Path(args.default_cv))
    write_json(finite_or_null(comparison(default, cv)), dest / "comparison.json")
    provenance["selected"] = {a: summary[a]["selected_over_complete_combinations"] for a in GRID_ARCHS}
    write_json(finite_or_null(provenance), dest / "provenance.json")
    print(json.dumps(provenance["grid"], indent=1)[:3000])


DIMENSIONS = {"nbch1": ("nbch1",), "nbch2": ("nbch2",), "nbfch": ("nbfch",), "lr": ("lr",),
              "BN/skip": ("batch_norm", "skip_connections")}  # fmt: skip


def comparison(default: pd.DataFrame, full: pd.DataFrame) -> dict:
    """What the full grid changes against the default subset: each variant's selected configuration,
    the value each cross-validation figure peaks at, and the ranking of the variants."""
    out: dict = {"dimensions": list(DIMENSIONS), "variants": {}, "ranking": {}}
    for name, cv in (("default", default), ("full", full)):
        means = cv.groupby(["variant", *study.CONFIG_KEYS])["score"].mean().reset_index()
        selected = study.select(cv)
        ranking = means.groupby("variant")["score"].mean().sort_values(ascending=False)
        out["ranking"][name] = list(ranking.index)
        for variant in VARIANTS:
            v = out["variants"].setdefault(variant, {"best": {d: {} for d in DIMENSIONS}})
            sel = selected[variant]
            v[name] = {"config": {k: sel[k] for k in study.CONFIG_KEYS}, "score": sel["score_mean"]}
            mine = means[means["variant"] == variant]
            for dim, keys in DIMENSIONS.items():
                best = mine.groupby(list(keys))["score"].mean().idxmax()
                best = best if isinstance(best, tuple) else (best,)
                label = "/".join(("on" if b else "off") if isinstance(b, bool | np.bool_) else f"{b:g}" for b in best)
                v["best"][dim][name] = label
    return out


def write_table(df: pd.DataFrame, path: Path) -> None:
    """CSV, gzip-compressed (reproducibly: no timestamp) when over 1 MiB, so nothing committed tops 2 MiB."""
    text = df.to_csv(index=False, lineterminator="\n").encode()
    if len(text) <= 1 << 20:
        path.write_bytes(text)
    else:
        path.with_suffix(".csv.gz").write_bytes(gzip.compress(text, mtime=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--mnist", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--state", default=".gpu/state")
    r.add_argument("--budget", type=float, default=500, help="seconds for the whole run")
    r.add_argument("--workers", type=int, default=8, help="processes per GPU to try against 1")
    r.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: test this script without a GPU")
    r.add_argument("--tiny", action="store_true", help="a tiny grid (with --device cpu: a test of this script)")
    r.add_argument("--reserve", type=float, default=45, help="seconds kept after the grid for the rest")
    r.add_argument(
        "--skip-checks", action="store_true", help="straight to the grid (a resumed run), --workers processes"
    )
    pb = sub.add_parser("publish", help="GPU run folders (each: log.txt, results.tar.gz; the last: state.tar.gz)")
    pb.add_argument("runs", nargs="+")
    pb.add_argument("--default-cv", default="data/cv", help="the default run's CV tables, for comparison.json")
    sub.add_parser("graph-smoke").add_argument("pairs")
    args = ap.parse_args()
    if args.cmd == "graph-smoke":
        graph_smoke(Path(args.pairs))
    else:
        run(args) if args.cmd == "run" else publish(args)


if __name__ == "__main__":
    main()
