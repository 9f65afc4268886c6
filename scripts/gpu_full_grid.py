"""The study at the original's scale (SPEC: 1280 combinations x 10 draws x 3 variants) on a GPU machine
without DVC: the pipeline's own stages (scripts/run_stages.py) with FULL_GRID's params, as `dvc exp run -S`
would set them, under a time budget, resumable on a machine that keeps nothing (docs/full-grid.md).

    python3 scripts/gpu_full_grid.py run --mnist MNIST_DIR --out OUT [--budget 500] [--resume STATE]
    python scripts/gpu_full_grid.py publish OUT1 [OUT2 ...]      # back here: results/full-grid/
"""

import argparse
import json
import os
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]  # this checkout's package, run_stages, full_grid_report

# first: the numeric pins, before torch loads numpy (whose OpenBLAS reads its kernel choice then)
from digitpairs.core import numerics  # noqa: E402
from digitpairs.core.io import finite_or_null, read_cv_tables, replacing, write_json  # noqa: E402
from digitpairs.core.variants import GRID_ARCHS, STUDY_VARIANTS, variant_score  # noqa: E402
from digitpairs.training import study  # noqa: E402
from digitpairs.training.runner import Checkpoint, run_trials  # noqa: E402
from digitpairs.training.trials import make_trial  # noqa: E402

import full_grid_report as report  # noqa: E402
import run_stages  # noqa: E402
import torch  # noqa: E402

# The original's grid (SPEC.md, experiment 1), all ten draws, on the GPU, as `dvc exp run -S` keys.
FULL_GRID = {"train.device": "cuda", "data.n_draws": 10, "cv.n_draws": 10, "loss_weights.n_draws": 10,
             "cv.nbch1": [8, 16, 32, 64], "cv.nbch2": [8, 16, 32, 64], "cv.nbfch": [64, 128, 256, 512],
             "cv.lr": [0.001, 0.01, 0.1, 0.25, 1.0]}  # fmt: skip
NOT_KEPT = ("data/mnist", "data/pairs", "models_out/models")  # inputs, or too large for OUT
RESERVE = 30  # seconds of the budget kept for the archives
T0, LOG, OUT = time.perf_counter(), [], Path(".")


def log(msg: str) -> None:
    LOG.append(f"[{time.perf_counter() - T0:6.1f}s] {msg}")
    print(LOG[-1], flush=True)
    (OUT / "log.txt").write_text("\n".join(LOG) + "\n")


def pack(base: Path, names: list[str], dest: Path) -> None:
    """The files and folders ``names`` of ``base`` as a .tar.gz, written then renamed: never torn."""
    with replacing(dest) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for name in (n for n in names if (base / n).exists()):
            tar.add(base / name, arcname=name)


def prepare(args: argparse.Namespace) -> dict:
    """--root: the pipeline's code, params.yaml with FULL_GRID then -S, the checkpoints of --resume."""
    run_stages.bring_dvc()  # before any stage: a machine without DVC's packages stops here, saying why
    root = Path(args.root)
    for name in ("stages", "digitpairs"):
        shutil.rmtree(root / name, ignore_errors=True)
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in (FULL_GRID | {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}).items():
        p[key.split(".")[0]][key.split(".")[1]] = value
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    if args.resume:
        with tarfile.open(args.resume) as tar:
            tar.extractall(root / "data", filter="data")
    os.environ["MNIST_MIRROR"] = str(Path(args.mnist).resolve())
    return p


def environment(device: str) -> dict:
    gpu = torch.cuda.get_device_properties(0) if device == "cuda" else None
    return {
        "gpu": gpu.name if gpu else "none (CPU run)",
        "gpu_memory_gib": round(gpu.total_memory / 2**30, 1) if gpu else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "numerics": numerics.fingerprint(device),
    }


def equivalence(pairs: Path, p: dict) -> dict:
    """The lockstep engine on the run's device against the CPU loop: the study's variants on 2 draws at
    the grid's middle widths, BN and skips on, lr 0.1, the run's epochs."""
    cv, device, epochs = p["cv"], p["train"]["device"], p["train"]["epochs"]
    config = {k: sorted(cv[k])[len(cv[k]) // 2] for k in ("nbch1", "nbch2", "nbfch")}
    widths = study.widths(config | {"batch_norm": True, "skip_connections": True}, p["train"])
    trials = [make_trial(v, widths, study.train_config(p["train"], 0.1), d, 1) for v in STUDY_VARIANTS for d in (0, 1)]
    cpu = run_trials(trials, pairs, engine="loop", keep_state=True, desc="equivalence: CPU loop")
    dev = run_trials(trials, pairs, engine="lockstep", device=device, keep_state=True, desc="equivalence: lockstep")
    rows = []
    for c, g in zip(cpu, dev, strict=True):
        a, b = ({k: s[k].double() for k in s if not k.endswith("num_batches_tracked")} for s in (c.state, g.state))
        diff, v = max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a), c.trial.variant
        scores = {"cpu_test": variant_score(v, c.scores["test"]), "gpu_test": variant_score(v, g.scores["test"])}
        rows.append({"variant": v, "draw": c.trial.draw, "epochs": epochs, "weights_rel_diff": diff} | scores)
        log(f"equivalence {v} draw {c.trial.draw}: weights rel diff {diff:.2e}, test accuracy CPU loop "
            f"{rows[-1]['cpu_test']:.3f}, {device} lockstep {rows[-1]['gpu_test']:.3f}")  # fmt: skip
    return {str(epochs): rows}


def stop_stage(stopped: threading.Event) -> None:
    """The deadline: SIGTERM to this process's children, the stage under way (it checkpoints, then exits)."""
    stopped.set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                os.kill(int(stat.parent.name), signal.SIGTERM)
        except (OSError, IndexError, ValueError):
            pass  # gone meanwhile


def run(args: argparse.Namespace) -> None:
    global OUT
    OUT, root = Path(args.out), Path(args.root)
    OUT.mkdir(parents=True, exist_ok=True)
    p = prepare(args)
    prov, tuning = environment(p["train"]["device"]) | {"params": p, "wall_s": {}}, {}
    log(f"GPU {prov['gpu']}, torch {prov['torch']}; the stages run in {root}")
    stages, finished, failed, data = list(run_stages.ordered(root)), [], None, root / "data"
    stopped, done = threading.Event(), threading.Event()
    timer = threading.Timer(max(0, args.budget - RESERVE - time.perf_counter() + T0), stop_stage, [stopped])

    def snapshots() -> None:
        while not done.wait(20):
            pack(data, ["checkpoints"], OUT / "state.tar.gz")

    snapper = threading.Thread(target=snapshots)
    timer.start()
    snapper.start()
    try:
        for name in (s for s in stages if not stopped.is_set()):
            t = time.perf_counter()
            try:
                run_stages.run([name], root)
            finally:
                log(f"{name}: {prov['wall_s'].setdefault(name, round(time.perf_counter() - t, 1))} s")
            if name == "pairs" and not args.skip_check:
                tuning = {"equivalence": equivalence(data / "pairs", p)}
            finished.append(name)
    except (Exception, SystemExit) as err:  # a stage that failed, or the one the deadline stopped
        failed = None if stopped.is_set() else err
        log(f"the deadline stopped {name}" if failed is None else f"error: {err}")
    finally:
        timer.cancel()
        done.set()
        snapper.join()
        prov["complete"], prov["grid_complete"] = finished == stages, {f"cv@{a}" for a in GRID_ARCHS} <= {*finished}
        write_json(finite_or_null(prov), root / "provenance.json")
        write_json(finite_or_null(tuning), root / "tuning.json")
        kept = [o for s in run_stages.ordered(root).values() for o in run_stages.outputs(s) if o not in NOT_KEPT]
        pack(root, [*kept, "provenance.json", "tuning.json"], OUT / "results.tar.gz")
        pack(data, ["checkpoints"], OUT / "state.tar.gz")
        budget = "; budget reached: rerun with --resume OUT/state.tar.gz" if stopped.is_set() else ""
        log(f"done; {len(finished)} of {len(stages)} stages finished{budget}")
    if failed is not None:
        sys.exit(1)


def publish(args: argparse.Namespace) -> None:
    """GPU runs -> --dest: the report (full_grid_report.py) of their provenance, tuning, and the grid's
    trials checkpointed by the last one."""
    runs = [Path(r) for r in args.runs]
    archives = [tarfile.open(r / "results.tar.gz") for r in runs]
    provs = [json.load(a.extractfile("provenance.json")) for a in archives]
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(runs[-1] / "state.tar.gz") as tar:
        tar.extractall(tmp, filter="data")
        rows = [row for f in sorted(Path(tmp).rglob("cv*.jsonl")) for row in Checkpoint(f).done.values()]
    logs = [f"## run {i}\n" + (r / "log.txt").read_text() for i, r in enumerate(runs, 1)]
    tuning = json.load(archives[0].extractfile("tuning.json"))
    report.write(Path(args.dest), rows, provs, tuning, "\n".join(logs), read_cv_tables(Path(args.default_cv)))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the pipeline's stages at the full grid, under a time budget")
    r.add_argument("--mnist", required=True, help="a folder with the four MNIST .gz files")
    r.add_argument("--out", required=True)
    r.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "digitpairs-full-grid"))
    r.add_argument("--budget", type=float, default=500, help="seconds for the whole run")
    r.add_argument("--resume", help="a state.tar.gz of an earlier run: its checkpoints")
    r.add_argument("-S", "--set", action="append", default=[], help="KEY=VALUE over FULL_GRID, as dvc exp run -S")
    r.add_argument("--skip-check", action="store_true", help="no equivalence check (a resumed run)")
    pb = sub.add_parser("publish", help="run folders (each: log.txt, results.tar.gz; the last: state.tar.gz)")
    pb.add_argument("runs", nargs="+")
    pb.add_argument("--default-cv", default="data/cv", help="the default run's CV tables, for comparison.json")
    pb.add_argument("--dest", default=str(REPO / "results/full-grid"))
    args = ap.parse_args()
    {"run": run, "publish": publish}[args.cmd](args)
