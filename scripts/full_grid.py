"""The original's study at full scale (SPEC: 1280 combinations x 10 draws x 3 variants, then the sweep,
the gradient norms and the final training on ten draws) through the pipeline's own stages, on a CPU or a
GPU, in pieces that any machine can carry on (docs/full-grid.md).

    python scripts/full_grid.py run --mnist MNIST_DIR [--budget 3600] [--device cpu|cuda] [--commit]
    python scripts/full_grid.py status          # another shell: trials done, trainings/s, time left
    python scripts/full_grid.py publish         # results/full-grid/ from the piece that completed the run
    python scripts/full_grid.py takeover --code COMMIT --mnist MNIST_DIR   # a later commit, once it agrees
    python scripts/full_grid.py compare --checkpoints data/checkpoints     # against the default run

A piece copies the stages of the run's one commit (``git archive``; ``records/run.json`` names it, set
by the first piece) to ``--root`` with FULL_GRID's params, as ``dvc exp run -S`` would set them, puts
back the trials of ``--records`` as checkpoints, and runs the stages with ``scripts/run_stages.py`` at
low priority under a time budget. What finishes is written to ``--records`` as append-only parts
(gzip-compressed JSON lines, one trial each with its weights digest); ``--commit`` commits each part.
On a CPU unlike every one that computed the carried trials, a sample of them is trained again first
and must give the same weights digests.
"""

import argparse
import fcntl
import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# the package: this checkout's, or (audit, equivalence: the child processes run in --root) the run's commit's
CODE = Path(os.environ.get("FULL_GRID_CODE", REPO))
sys.path[:0] = [str(CODE), str(REPO / "scripts")]

# first: the numeric pins, before torch loads numpy (whose OpenBLAS reads its kernel choice then)
from digitpairs.core import numerics  # noqa: E402
from digitpairs.core.io import finite_or_null, replacing, write_json  # noqa: E402
from digitpairs.core.variants import GRID_ARCHS, STUDY_VARIANTS, variant_score, variants_of  # noqa: E402
from digitpairs.training import study  # noqa: E402
from digitpairs.training.models import ModelConfig  # noqa: E402
from digitpairs.training.runner import Checkpoint, code_digest, run_trials  # noqa: E402
from digitpairs.training.train import TrainConfig  # noqa: E402 (the name every commit of a run has)
from digitpairs.training.trials import Trial, make_trial  # noqa: E402

import full_grid_report as report  # noqa: E402
import run_stages  # noqa: E402

# The original's grid (SPEC.md, experiment 1) on all ten draws, as `dvc exp run -S` keys; --device adds
# train.device. The numerics are portable: a trial's bytes do not depend on the CPU that computes it.
FULL_GRID = {"data.n_draws": 10, "cv.n_draws": 10, "loss_weights.n_draws": 10, "train.numerics": "portable",
             "cv.nbch1": [8, 16, 32, 64], "cv.nbch2": [8, 16, 32, 64], "cv.nbfch": [64, 128, 256, 512],
             "cv.lr": [0.001, 0.01, 0.1, 0.25, 1.0]}  # fmt: skip
RECORDS = REPO / "results/full-grid/records"
EARLIER = REPO / "results/full-grid/earlier-gpu"  # an earlier run on a GPU, older code, partial: compared with
PAGES = (REPO / "docs/full-grid.md", REPO / "README.md")  # their full-grid-run and full-scale blocks show the records
NOT_KEPT = ("data/mnist", "data/pairs", "models_out/models")  # inputs, or too large for OUT
RESERVE = 30  # seconds of the budget kept for the records and archives
AUDIT_SAMPLE = 24  # carried trials trained again on a CPU unlike those that computed them
PROGRESS_EVERY = 300  # seconds between progress lines in the log (the progress file: every 15 s)
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


# --- the records: what finished, carried between machines in the repository ---------------------------


def carried(records: Path) -> dict[str, dict]:
    """Every trial of the records' parts, ``{"checkpoint": file stem, "row": row}``, by its checkpoint key
    under the run's commit (:func:`current_key`)."""
    out, takeovers = {}, takeovers_of(records)
    for part in sorted(records.glob("part-*.jsonl.gz")):
        for line in gzip.decompress(part.read_bytes()).decode().splitlines():
            rec = json.loads(line)
            rec["row"]["key"] = current_key(rec["row"]["key"], takeovers)
            out[rec["row"]["key"]] = rec
    return out


def takeovers_of(records: Path) -> list[dict]:
    run = records / "run.json"
    return json.loads(run.read_text()).get("takeovers", []) if run.exists() else []


def current_key(key: str, takeovers: list[dict]) -> str:
    """A record's checkpoint key under the run's commit: each takeover (:func:`takeover`) vouched that its
    new code trains what the old did, so the key's code digest (its second-last field) is swapped."""
    for t in takeovers:
        head, code, numeric = key.rsplit("-", 2)
        key = f"{head}-{t['code_digests'][1]}-{numeric}" if code == t["code_digests"][0] else key
    return key


def checkpointed(ckpts: Path) -> dict[str, dict]:
    """Every trial the stages checkpointed in ``ckpts``, in :func:`carried`'s form."""
    return {k: {"checkpoint": f.stem, "row": row} for f in sorted(ckpts.glob("*.jsonl")) for k, row in
            Checkpoint(f).done.items()}  # fmt: skip


def export(ckpts: Path, records: Path) -> tuple[Path | None, int]:
    """The trials of ``ckpts`` that no part holds yet, as a new part named by its content (two machines
    never write the same name); with the number of trials it holds. Parts are only ever added."""
    held, takeovers = carried(records), takeovers_of(records)
    new = [rec for key, rec in sorted(checkpointed(ckpts).items())
           if current_key(key, takeovers) not in held and rec["row"].get("weights")]  # fmt: skip
    if not new:
        return None, 0
    data = gzip.compress("".join(json.dumps(r, sort_keys=True) + "\n" for r in new).encode(), mtime=0)
    part = records / f"part-{hashlib.sha256(data).hexdigest()[:16]}.jsonl.gz"
    with replacing(part) as tmp:
        tmp.write_bytes(data)
    return part, len(new)


def restore(records: Path, ckpts: Path) -> int:
    """The carried trials as the stages' checkpoints in ``ckpts`` (those not there yet): they resume."""
    by_file: dict[str, list[dict]] = {}
    for rec in carried(records).values():
        by_file.setdefault(rec["checkpoint"], []).append(rec["row"])
    n = 0
    for stem, rows in by_file.items():
        ckpt = Checkpoint(ckpts / f"{stem}.jsonl")
        new = [r for r in rows if r["key"] not in ckpt.done]
        ckpt.extend(new)
        n += len(new)
    return n


def remap(ckpts: Path, takeovers: list[dict]) -> None:
    """A root's checkpoints under the keys of the run's commit, each trial once, where a takeover changed the
    code digest since they were written (else the next piece would count their trials twice)."""
    for f in sorted(ckpts.glob("*.jsonl")) if takeovers else []:  # without a takeover every key is current
        done = Checkpoint(f).done
        rows = {}
        for r in done.values():
            key = current_key(r["key"], takeovers)
            rows[key] = r | {"key": key}
        if rows.keys() != done.keys():
            new = f.with_suffix(".remapped")
            new.unlink(missing_ok=True)
            Checkpoint(new).extend(list(rows.values()))
            new.replace(f)


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def render_pages(pages: list[Path]) -> bool:
    """``pages``' blocks rewritten by the checkout's scripts/readme.py as it is now (a child process: a piece
    runs for hours while the checkout changes); a failure is said, and the records go without them."""
    code = "import sys, pathlib, readme\nfor p in map(pathlib.Path, sys.argv[1:]):\n"
    code += "    p.write_text(readme.render(p.read_text()))"
    done = subprocess.run([sys.executable, "-c", code, *map(str, pages)], cwd=REPO / "scripts", capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode:
        log(f"warning: pages not rewritten ({done.stderr.strip()[-300:]}); run scripts/readme.py by hand")
    return done.returncode == 0


def commit_records(records: Path, message: str) -> None:
    """Commit ``records`` alone (other staged or changed files stay as they are), with the pages that show
    them (:data:`PAGES`, their blocks rewritten by scripts/readme.py) where a page had no other change;
    retried while another git command holds the index."""
    paths = [str(records)]
    if records.resolve() == RECORDS.resolve():
        clean = [page for page in PAGES if not git("status", "--porcelain", "--", str(page))]
        paths += [str(page) for page in clean] if clean and render_pages(clean) else []
    for attempt in range(10):
        try:
            git("add", "--", *paths)
            if git("status", "--porcelain", "--", *paths):
                git("commit", "-q", "-m", message, "--", *paths)
            return
        except subprocess.CalledProcessError as err:
            if "index.lock" not in err.stderr or attempt == 9:
                log(f"warning: could not commit {records}: {err.stderr.strip()}; commit it by hand")
                return
            time.sleep(3)


# --- a piece: the run's commit's stages, with the run's params ------------------------------------------


def hold(folder: Path, what: str) -> None:
    """An exclusive lock on ``folder`` for the rest of this process: a second piece on the same root would
    rewrite the stages' code and checkpoints under the first, and one on the same records its pieces.json.
    The kernel releases it however the process ends, SIGKILL included: no stale lock."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)  # not inherited: the stages' processes do not hold it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"error: {what} {folder} is in use by another piece or takeover on this machine: "
                         f"let it end (`python scripts/full_grid.py status` shows its progress) or stop it "
                         f"(`kill -TERM` its pid, from `pgrep -f full_grid.py`), then rerun") from None  # fmt: skip


def run_state(args: argparse.Namespace) -> dict:
    """``records/run.json``: the commit the whole run computes with and its settings, fixed by the first
    piece (:func:`start_piece` writes it); a later piece with other settings is refused (its trials would
    be another study's)."""
    path = Path(args.records) / "run.json"
    settings = FULL_GRID | {"train.device": args.device} | {k: yaml.safe_load(v) for k, v in
                                                            (s.split("=", 1) for s in args.set)}  # fmt: skip
    if path.exists():
        state = json.loads(path.read_text())
        if state["settings"] != settings:
            changed = sorted(k for k in settings.keys() | state["settings"].keys()
                             if settings.get(k) != state["settings"].get(k))  # fmt: skip
            raise SystemExit(f"error: {path} is a run with other settings ({', '.join(changed)}); give the same "
                             "--device and -S, or --records DIR for a new run")  # fmt: skip
        return state
    return {"commit": args.code or git("rev-parse", "HEAD"), "settings": settings}


def prepare(root: Path, commit: str, settings: dict) -> dict:
    """``root``: the commit's stages, package and dvc.yaml, and its params.yaml with ``settings``."""
    run_stages.bring_dvc()  # before any stage: a machine without DVC's packages stops here, saying why
    names = ["stages", "digitpairs", "dvc.yaml", "params.yaml", ".dvcignore"]
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, *names], capture_output=True)
    if archive.returncode:
        why = archive.stderr.decode().strip()
        raise SystemExit(f"error: this checkout cannot give commit {commit}'s code ({why}); the run computes "
                         "with that commit only: run from a clone that holds it (`git fetch`)")  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.rmtree(root / name, ignore_errors=True) if (root / name).is_dir() else (root / name).unlink(True)
    with tempfile.TemporaryFile() as f:
        f.write(archive.stdout)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(root, filter="data")
    p = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in settings.items():
        p[key.split(".")[0]][key.split(".")[1]] = value
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return p


def in_root(root: Path, *args: str) -> subprocess.CompletedProcess:
    """This script's ``args`` in a child process that computes with ``root``'s package (the run's commit)."""
    env = numerics.child_env("portable") | {"FULL_GRID_CODE": str(root)}
    return subprocess.run([sys.executable, __file__, *args], cwd=root, env=env, capture_output=True, text=True)


def totals(p: dict) -> dict[str, int]:
    """The cross-validation trainings of each checkpoint file (the grid: 38,400 in all)."""
    return {f"cv-{a}": len(study.grid(p["cv"])) * p["cv"]["n_draws"] * len(variants_of(a)) for a in GRID_ARCHS}


def trial_flops(t: Trial) -> float:
    """FLOPs of training and scoring ``t``: benchmarks/lockstep.py's count, the progress's cost model (imported
    here: the children that compute in --root, the audit's and the equivalence check's, have no benchmarks/)."""
    from benchmarks.lockstep import trial_flops as flops

    return flops(t)


def grid_flops(p: dict) -> float:
    """The FLOPs of the grid's trainings (``benchmarks.lockstep.trial_flops``): the widths grow along the
    grid, and a piece computes FLOPs at a steadier rate than trainings (docs/full-grid.md, 'Shows progress')."""
    return sum(trial_flops(t) for a in GRID_ARCHS for t in study.cv_trials(a, p))


class Tally:
    """Trials and their FLOPs in each checkpoint file of ``ckpts``, read as the files grow: the progress
    reads them every 15 s, and a full grid's files hold tens of thousands of lines."""

    def __init__(self, ckpts: Path) -> None:
        self.ckpts, self.seen = ckpts, {}  # stem -> (inode, bytes read, trials, FLOPs)

    def __call__(self) -> dict[str, tuple[int, float]]:
        for f in sorted(self.ckpts.glob("*.jsonl")):
            st = f.stat()
            inode, read, n, flops = self.seen.get(f.stem, (st.st_ino, 0, 0, 0.0))
            if inode != st.st_ino or st.st_size < read:  # rewritten (Checkpoint drops torn lines): read again
                inode, read, n, flops = st.st_ino, 0, 0, 0.0
            with f.open("rb") as fh:
                fh.seek(read)
                data = fh.read()
            lines = data[: data.rfind(b"\n") + 1]  # whole lines: the last may be being written
            for line in lines.splitlines():
                try:
                    flops += trial_flops(trial_of(json.loads(line)["row"]["trial"]))
                    n += 1
                except (ValueError, KeyError, TypeError):
                    pass  # a torn or damaged line: the stage recomputes its trial
            self.seen[f.stem] = (inode, read + len(lines), n, flops)
        return {stem: (n, flops) for stem, (_, _, n, flops) in self.seen.items()}


def progress(
    done: dict[str, tuple[int, float]], p: dict, start: dict[str, tuple[int, float]], seconds: float, total_flops: float
) -> dict:
    """Trials done per checkpoint file (of its total, for the grid), this piece's trainings and FLOPs per
    second, and the grid's time left: its FLOPs left (of ``total_flops``) at this piece's FLOP rate."""
    new, new_flops = (sum(d[i] for d in done.values()) - sum(d[i] for d in start.values()) for i in (0, 1))
    rate, flop_rate = (x / seconds if seconds > 0 else 0.0 for x in (new, new_flops))
    grid = totals(p)
    left = sum(max(0, n - done.get(stem, (0, 0.0))[0]) for stem, n in grid.items())
    left_flops = max(0.0, total_flops - sum(done.get(stem, (0, 0.0))[1] for stem in grid)) if left else 0.0
    return {"done": {s: {"trials": n, "of": grid.get(s)} for s, (n, _) in done.items()}, "this_piece": new,
            "trainings_per_s": round(rate, 2), "gflop_per_s": round(flop_rate / 1e9, 1), "grid_left": left,
            "grid_left_h": round(left_flops / flop_rate / 3600, 1) if flop_rate else None,
            "updated": time.strftime("%Y-%m-%d %H:%M:%S %Z")}  # fmt: skip


def progress_line(q: dict) -> str:
    parts = [f"{s} {d['trials']:,}" + (f" of {d['of']:,}" if d["of"] else "") for s, d in q["done"].items()]
    eta = f"{q['grid_left_h']} h" if q["grid_left_h"] is not None else "unknown"
    rate = f"{q['trainings_per_s']} trainings/s" + (f" ({q['gflop_per_s']} GFLOP/s)" if "gflop_per_s" in q else "")
    return f"{'; '.join(parts) or 'no trial yet'}; {rate}; grid left {eta}"


def stop_stage(stopped: threading.Event) -> None:
    """The deadline: SIGTERM to this process's children, the stage under way (it checkpoints, then exits)."""
    stopped.set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                os.kill(int(stat.parent.name), signal.SIGTERM)
        except (OSError, IndexError, ValueError):
            pass  # gone meanwhile


# --- the audit: bytes, not rounded scores, across machines ----------------------------------------------


def cpu_id(cpu: dict) -> tuple:
    return tuple(cpu[k] for k in ("vendor", "model", "family_model", "avx512"))


def audit_sample(recs: list[dict], n: int, seed: str) -> list[dict]:
    """``n`` carried cross-validation trials at random, both architectures alternately and one per model
    shape (widths, batch norm, skips) until every shape has one."""
    rng, shapes = random.Random(seed), {}
    for rec in (r for r in recs if r["checkpoint"].startswith("cv-")):
        m = rec["row"]["trial"]["model"]
        shapes.setdefault(m["arch"], {}).setdefault(json.dumps(m, sort_keys=True), []).append(rec["row"])
    pools = {arch: rng.sample(sorted(s.values(), key=len), len(s)) for arch, s in sorted(shapes.items())}
    out = []
    while len(out) < n and any(pools.values()):
        for arch in sorted(pools):
            if pools[arch] and len(out) < n:
                rows = pools[arch].pop()
                out.append(rng.choice(rows))
                if not pools[arch] and len(out) < n:  # every shape used: again, other draws and lrs
                    pools[arch] = [[r for r in v if r not in out] for v in shapes[arch].values()]
                    pools[arch] = [v for v in pools[arch] if v]
    return out


def describe(d: dict) -> str:
    """A trial as a person reads it: ``pair 8/8/16 BN on skip off, lr 0.1, draw 0, seed 1``."""
    m, on = d["model"], {True: "on", False: "off"}
    return (f"{d['variant']} {m['nbch1']}/{m['nbch2']}/{m['nbfch']} BN {on[m['batch_norm']]} skip "
            f"{on[m['skip_connections']]}, lr {d['train']['lr']:g}, draw {d['draw']}, seed {d['seed']}")  # fmt: skip


def trial_of(d: dict) -> Trial:
    return Trial(d["variant"], ModelConfig(**d["model"]), TrainConfig(**d["train"]), d["draw"], d["seed"])


def audit_here(args: argparse.Namespace) -> None:
    """(In --root, with the run's commit's package.) Train the sampled trials again; write each one's
    weights digest and scores beside the carried ones."""
    p, rows = yaml.safe_load(Path("params.yaml").read_text()), json.loads(Path(args.sample).read_text())
    trials = [trial_of(r["trial"]) for r in rows]
    outs = run_trials(trials, Path("data/pairs"), engine=p["train"]["engine"], device=p["train"]["device"],
                      desc="audit")  # fmt: skip
    result = [{"trial": r["trial"], "key": r["key"], "carried": r["weights"], "here": o.weights,
               "equal": o.weights == r["weights"] and o.scores == r["scores"]}
              for r, o in zip(rows, outs, strict=True)]  # fmt: skip
    write_json({"code_digest": code_digest(), "rows": result}, Path(args.result))


def recompute(root: Path, sample: list[dict], name: str) -> dict:
    """``sample`` trained again in ``root`` (its code): how many gave the carried weights and scores."""
    write_json(sample, OUT / f"{name}_sample.json")
    t = time.perf_counter()
    child = in_root(root, "audit", "--sample", str(OUT / f"{name}_sample.json"), "--result", str(OUT / f"{name}.json"))
    if child.returncode:
        raise SystemExit(f"error: the {name} could not run: {child.stderr.strip()[-2000:]}")
    answer = json.loads((OUT / f"{name}.json").read_text())
    result, bad = answer["rows"], [r for r in answer["rows"] if not r["equal"]]
    out = {"needed": True, "trials": len(result), "equal": len(result) - len(bad),
           "wall_s": round(time.perf_counter() - t, 1), "code_digest": answer["code_digest"],
           "shapes": len({json.dumps(r["trial"]["model"], sort_keys=True) for r in result}),
           "mismatch": [f"{describe(r['trial'])} (key {r['key']})" for r in bad]}  # fmt: skip
    log(f"{name}: {out['equal']} of {out['trials']} carried trials ({out['shapes']} shapes) gave the same weights")
    return out


def audit(root: Path, records: Path, pieces: list[dict], cpu: dict) -> dict:
    """On a CPU unlike every one that computed the carried trials: :data:`AUDIT_SAMPLE` of them trained
    again, which must give the same weights; a mismatch stops the run, naming the trial."""
    recs = list(carried(records).values())
    seen = {cpu_id(q["cpu"]) for q in pieces if q.get("computed")}
    if not recs or cpu_id(cpu) in seen:
        return {"needed": False, "why": "no carried trials" if not recs else "a piece on this CPU computed some"}
    return recompute(root, audit_sample(recs, AUDIT_SAMPLE, f"audit-{len(pieces)}"), "audit")


def takeover(args: argparse.Namespace) -> None:
    """Let commit ``--code`` compute the rest of the run: it trains :data:`AUDIT_SAMPLE` carried trials
    again first, and only if every one gives the same weights and scores does run.json name it (with the
    code digests it maps, so the carried trials resume under it); ``--dry-run`` only reports."""
    global OUT
    records, root = Path(args.records), Path(args.root)
    hold(root, "the root")
    if not args.dry_run:  # it writes run.json
        hold(records, "the records")
    OUT = Path(args.out or root / "out")
    OUT.mkdir(parents=True, exist_ok=True)
    state = json.loads((records / "run.json").read_text())
    new = git("rev-parse", args.code)
    prepare(root, new, state["settings"])
    os.environ["MNIST_MIRROR"] = str(Path(args.mnist).resolve())
    run_stages.run(["check_params", "mnist", "pairs"], root)
    recs = list(carried(records).values())
    sample = audit_sample(recs, AUDIT_SAMPLE, f"takeover-{new}")
    result = recompute(root, sample, "takeover")
    old_digests = {r["key"].rsplit("-", 2)[1] for r in sample}
    if result["mismatch"] or len(old_digests) != 1:
        raise SystemExit(f"error: commit {new[:12]} cannot take over the run: {result['mismatch'][:1] or old_digests}")
    if args.dry_run:
        return
    entry = {"from": state["commit"], "to": new, "code_digests": [old_digests.pop(), result["code_digest"]],
             "audit": {k: v for k, v in result.items() if k != "code_digest"}, "at": utc()}  # fmt: skip
    write_json(state | {"commit": new, "takeovers": [*state.get("takeovers", []), entry]}, records / "run.json")
    log(f"commit {new[:12]} computes the rest of the run (records/run.json)")


def equivalence_here(args: argparse.Namespace) -> None:
    """(In --root.) The lockstep engine on the run's device against the CPU loop: the study's variants on 2
    draws at the grid's middle widths, BN and skips on, lr 0.1, the run's epochs."""
    p = yaml.safe_load(Path("params.yaml").read_text())
    cv, device, epochs = p["cv"], p["train"]["device"], p["train"]["epochs"]
    config = {k: sorted(cv[k])[len(cv[k]) // 2] for k in ("nbch1", "nbch2", "nbfch")}
    widths = study.widths(config | {"batch_norm": True, "skip_connections": True}, p["train"])
    trials = [make_trial(v, widths, study.train_config(p["train"], 0.1), d, 1) for v in STUDY_VARIANTS for d in (0, 1)]
    cpu = run_trials(trials, Path("data/pairs"), engine="loop", keep_state=True, desc="equivalence: CPU loop")
    dev = run_trials(trials, Path("data/pairs"), engine="lockstep", device=device, keep_state=True, desc="equivalence")
    rows = []
    for c, g in zip(cpu, dev, strict=True):
        a, b = ({k: s[k].double() for k in s if not k.endswith("num_batches_tracked")} for s in (c.state, g.state))
        diff, v = max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a), c.trial.variant
        scores = {"cpu_test": variant_score(v, c.scores["test"]), "gpu_test": variant_score(v, g.scores["test"])}
        rows.append({"variant": v, "draw": c.trial.draw, "epochs": epochs, "weights_rel_diff": diff} | scores)
    write_json(finite_or_null({str(epochs): rows}), Path(args.result))


# --- run, status, publish -------------------------------------------------------------------------------


def environment(device: str) -> dict:
    import torch

    gpu = torch.cuda.get_device_properties(0) if device == "cuda" else None
    return {
        "gpu": gpu.name if gpu else "none (CPU run)",
        "gpu_memory_gib": round(gpu.total_memory / 2**30, 1) if gpu else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "numerics": numerics.fingerprint(device),
    }


class Piece:
    """This piece's record in ``records/pieces.json`` (one entry a piece, every machine's): its CPU, the
    trials it computed, its trainings per second and its audit; and the exports that carry its trials."""

    def __init__(self, records: Path, ckpts: Path, commit: str, device: str) -> None:
        self.records, self.ckpts, self.path, self.lock = records, ckpts, records / "pieces.json", threading.Lock()
        self.pieces = json.loads(self.path.read_text()) if self.path.exists() else []
        self.entry = {"started": utc(), "commit": commit, "cpu": numerics.cpu(), "device": device,
                      "products": numerics.products(), "nice": os.nice(0), "carried_at_start": len(carried(records)),
                      "audit": None, "computed": 0, "recovered": 0, "training_s": 0.0, "trainings_per_s": None,
                      "parts": [], "stopped_by": None, "ended": None}  # fmt: skip
        self.trains_since: float | None = None  # set once the training stages begin
        self.counts, self.grid_flops = Tally(ckpts), 0.0
        self.start = self.counts()

    def progress(self, p: dict) -> dict:
        self.grid_flops = self.grid_flops or grid_flops(p)
        return progress(self.counts(), p, self.start, self.training_s(), self.grid_flops)

    def training_s(self) -> float:
        return self.entry["training_s"] + (time.perf_counter() - self.trains_since if self.trains_since else 0.0)

    def save(self, commit: bool, recovered: bool = False) -> None:
        """Export what finished (a new part), update this piece's entry, and commit both with ``commit``."""
        with self.lock:
            part, n = export(self.ckpts, self.records)
            if part:
                self.entry["parts"].append(part.name)
                self.entry["recovered" if recovered else "computed"] += n
            self.entry["training_s"] = self.training_s()
            if self.trains_since is not None:
                self.trains_since = time.perf_counter()
            s = self.entry["training_s"]
            self.entry["trainings_per_s"] = round(self.entry["computed"] / s, 2) if s else None
            write_json(self.pieces + [self.entry], self.path)
            if commit:
                commit_records(self.records, f"full grid: {n} trials from {numerics.machine()}")
            if part:
                log(f"records: {n} trials in {part.name}")

    def watch(self, p: dict, done: threading.Event, every: float, commit: bool) -> None:
        """Until ``done``: the progress file every 15 s and in the log every 5 minutes, a part of the records
        every ``every`` s."""
        last = shown = time.perf_counter()
        while not done.wait(15):
            q = self.progress(p)
            write_json(q, OUT / "progress.json")
            if time.perf_counter() - last > every:
                self.save(commit)
                last = time.perf_counter()
            if time.perf_counter() - shown > PROGRESS_EVERY:
                log(progress_line(q))
                shown = time.perf_counter()


def utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def start_piece(args: argparse.Namespace) -> tuple[Path, dict, Piece]:
    """The run's commit's stages in --root with the run's params, what a piece killed here left exported,
    the records' trials restored as checkpoints."""
    global OUT
    os.nice(args.nice)  # the stages and their workers inherit it: other work on the machine goes first
    records, root = Path(args.records), Path(args.root)
    hold(records, "the records")
    hold(root, "the root")
    OUT = Path(args.out or root / "out")
    OUT.mkdir(parents=True, exist_ok=True)
    state = run_state(args)
    p = prepare(root, state["commit"], state["settings"])
    if not (records / "run.json").exists():
        write_json(state | {"trainings": totals(p)}, records / "run.json")
    os.environ["MNIST_MIRROR"] = str(Path(args.mnist).resolve())
    piece = Piece(records, root / "data/checkpoints", state["commit"], args.device)
    piece.save(args.commit, recovered=True)  # finished trials of a piece killed on this machine
    remap(piece.ckpts, takeovers_of(records))
    restored = restore(records, piece.ckpts)
    piece.start = piece.counts()
    log(f"the stages of {state['commit'][:12]} run in {root}; {restored} carried trials restored, "
        f"{piece.entry['carried_at_start']} in the records; CPU {piece.entry['cpu']['model']}")  # fmt: skip
    return root, p, piece


def checks(args: argparse.Namespace, root: Path, piece: Piece) -> dict:
    """Once the pair draws exist: the audit (a mismatch stops the run), and the engines' equivalence."""
    piece.entry["audit"] = result = audit(root, Path(args.records), piece.pieces, piece.entry["cpu"])
    if result["needed"] and result["mismatch"]:
        raise SystemExit(f"error: the audit's trial {result['mismatch'][0]} gave other weights on this CPU than "
                         "the records carry: the run stops here (docs/full-grid.md, 'The audit')")  # fmt: skip
    if args.skip_check or (args.device != "cuda" and not args.check):
        return {}
    child = in_root(root, "equivalence", "--result", str(OUT / "equivalence.json"))
    if child.returncode:
        raise SystemExit(f"error: the equivalence check failed: {child.stderr.strip()[-2000:]}")
    return {"equivalence": json.loads((OUT / "equivalence.json").read_text())}


def run(args: argparse.Namespace) -> None:
    root, p, piece = start_piece(args)
    prov, tuning = environment(args.device) | {"params": p, "wall_s": {}}, {}
    stages, finished, failed, name = list(run_stages.ordered(root)), [], None, ""
    stopped, done = threading.Event(), threading.Event()
    timer = threading.Timer(max(0, args.budget - RESERVE - time.perf_counter() + T0), stop_stage, [stopped])
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda *_: stop_stage(stopped))
    watcher = threading.Thread(target=piece.watch, args=(p, done, args.export_every, args.commit))
    timer.start()
    watcher.start()
    try:
        for name in (s for s in stages if not stopped.is_set()):
            t = time.perf_counter()
            try:
                run_stages.run([name], root)
            finally:
                log(f"{name}: {prov['wall_s'].setdefault(name, round(time.perf_counter() - t, 1))} s")
            if name == "pairs":
                tuning = checks(args, root, piece)
                piece.trains_since = time.perf_counter()
            finished.append(name)
    except (Exception, SystemExit) as err:  # a stage that failed, or the one the deadline stopped
        failed = None if stopped.is_set() else err
        log(f"stopped: {name}" if failed is None else f"error: {str(err).removeprefix('error: ')}")
    finally:
        timer.cancel()
        done.set()
        watcher.join()
        finish(root, p, piece, prov | {"complete": finished == stages}, tuning, failed, args.commit)
    if failed is not None:
        sys.exit(1)


def finish(root: Path, p: dict, piece: Piece, prov: dict, tuning: dict, failed: object, commit: bool) -> None:
    """The piece's last part and entry, its progress, and OUT/results.tar.gz: the stages' outputs (once every
    stage finished, with the run's params.yaml and its own dvc.lock: what `publish` needs)."""
    piece.entry["ended"] = utc()
    piece.entry["stopped_by"] = "complete" if prov["complete"] else "error" if failed else "budget or signal"
    piece.save(commit)
    q = piece.progress(p)
    write_json(q, OUT / "progress.json")
    log(progress_line(q))
    prov["grid_complete"] = all(q["done"].get(s, {}).get("trials", 0) >= n for s, n in totals(p).items())
    write_json(finite_or_null(prov), root / "provenance.json")
    write_json(finite_or_null(tuning), root / "tuning.json")
    kept = [o for s in run_stages.ordered(root).values() for o in run_stages.outputs(s) if o not in NOT_KEPT]
    (root / "dvc.lock").unlink(missing_ok=True)  # a lock describes the outputs of a complete piece only
    locked = lock(root) if prov["complete"] else True
    pack(root, [*kept, "provenance.json", "tuning.json", "params.yaml", "dvc.lock"], OUT / "results.tar.gz")
    resume = "; rerun the same command to resume (on this machine or another)" * (not prov["complete"] and not failed)
    log(f"done; {piece.entry['stopped_by']}; the records: {piece.records}{resume}")
    if not locked:
        raise SystemExit(1)


def lock(root: Path) -> bool:
    """The run's own dvc.lock in ``root``: DVC hashes every dependency, param and output of the finished
    stages (`dvc commit --force`: the lock `dvc repro` writes, tests/test_full_grid.py), so that anyone can
    recompute any part of the run and compare. False (and said) where DVC could not: publish needs it."""
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    init = [] if (root / ".dvc/config").exists() else [["init", "--no-scm", "--force"]]  # .dvc/tmp: stages'
    for cmd in [*init, ["commit", "--force"]]:
        done = subprocess.run([sys.executable, "-m", "dvc", *cmd], cwd=root, env=env, capture_output=True, text=True)
        if done.returncode:
            log(f"error: `dvc {' '.join(cmd)}` in {root} failed, so the run has no dvc.lock, which publish needs "
                f"({done.stderr.strip()[-500:]}); fix that and rerun the same command")  # fmt: skip
            return False
    return True


def status(args: argparse.Namespace) -> None:
    path = Path(args.out or Path(args.root) / "out") / "progress.json"
    if not path.exists():
        raise SystemExit(f"error: no {path}: no piece has run with --root {args.root} (or --out) yet")
    q = json.loads(path.read_text())
    print(f"{q['updated']}: {progress_line(q)}")


def agreement(records: Path, ckpts: Path) -> dict:
    """The trials both the records and another run's checkpoints ``ckpts`` hold (the default run's: its grid
    is a subset of the full one, keyed alike but for the code digest), compared by identity: how many have
    equal weights digests, equal scores, and which do not."""
    ours = {json.dumps(r["row"]["trial"], sort_keys=True): r["row"] for r in carried(records).values()}
    theirs = {json.dumps(r["row"]["trial"], sort_keys=True): r["row"] for r in checkpointed(ckpts).values()}
    both = sorted(ours.keys() & theirs.keys())
    weighed = [k for k in both if theirs[k].get("weights")]
    return {"trials_in_both": len(both), "weights_compared": len(weighed),
            "weights_equal": sum(ours[k]["weights"] == theirs[k]["weights"] for k in weighed),
            "scores_equal": sum(ours[k]["scores"] == theirs[k]["scores"] for k in both),
            "differ": [describe(json.loads(k)) for k in both if ours[k]["scores"] != theirs[k]["scores"] or
                       (theirs[k].get("weights") and ours[k]["weights"] != theirs[k]["weights"])]}  # fmt: skip


def compare(args: argparse.Namespace) -> None:
    result = agreement(Path(args.records), Path(args.checkpoints))
    print(json.dumps(result, indent=2))
    if result["differ"]:
        sys.exit(1)


def publish(args: argparse.Namespace) -> None:
    """A complete run -> --dest (full_grid_report.write): the outputs, params and own lock in the archive of
    the piece that completed it, beside the records; refused while the grid or any stage is unfinished."""
    records, archive = Path(args.records), Path(args.out or Path(args.root) / "out") / "results.tar.gz"
    run = json.loads((records / "run.json").read_text())
    held = Counter(rec["checkpoint"] for rec in carried(records).values())
    short = [f"{stem} {held[stem]:,} of {n:,}" for stem, n in run["trainings"].items() if held[stem] < n]
    if short:
        raise SystemExit(f"error: the records hold {', '.join(short)} trials: the grid is not complete; run pieces "
                         "until one ends `complete`, then publish its --root (or --out)")  # fmt: skip
    if not archive.exists():
        raise SystemExit(f"error: no {archive}: give the --root (or --out) of the piece that completed the run, "
                         "or run a piece here (every trial resumes; the stages after the grid run again)")  # fmt: skip
    if missing := report.missing_default(Path(args.default)):
        raise SystemExit(f"error: --default {args.default} lacks the default run's {', '.join(missing)}, which the "
                         "comparison reads: run `make repro` (or `dvc pull`) there first, or give a workspace that "
                         "has them")  # fmt: skip
    with tarfile.open(archive) as tar:
        if "dvc.lock" not in tar.getnames():
            raise SystemExit(f"error: {archive} is from a piece that did not finish every stage (it has no dvc.lock): "
                             "rerun `run` (every finished trial resumes) until it ends `complete`")  # fmt: skip
        earlier = Path(args.earlier) if args.earlier != "none" else None
        try:
            report.write(Path(args.dest), tar, Path(args.default), earlier)
        except (OSError, ValueError, KeyError) as err:
            raise SystemExit(f"error: publish failed ({type(err).__name__}: {err}); {args.dest} is as it was") from None
    print(f"published {args.dest}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    root = str(Path(tempfile.gettempdir()) / "digitpairs-full-grid")
    r = sub.add_parser("run", help="a piece: the pipeline's stages at the full grid, under a time budget")
    r.add_argument("--mnist", required=True, help="a folder with the four MNIST .gz files")
    r.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    r.add_argument("--root", default=root, help="where the stages run (kept: a piece on this machine resumes)")
    r.add_argument("--out", help="log, progress, results archive (default: ROOT/out)")
    r.add_argument("--records", default=str(RECORDS), help="the run's records: carried in, added to")
    r.add_argument("--budget", type=float, default=3600, help="seconds for the piece")
    r.add_argument("--export-every", type=float, default=900, help="seconds between parts written")
    r.add_argument("--nice", type=int, default=19, help="niceness added (low priority)")
    r.add_argument("--commit", action="store_true", help="git commit each part of the records")
    r.add_argument("--code", help="the commit to compute with (first piece only; default HEAD)")
    r.add_argument("-S", "--set", action="append", default=[], help="KEY=VALUE over FULL_GRID, as dvc exp run -S")
    r.add_argument("--check", action="store_true", help="the engines' equivalence check on a CPU too")
    r.add_argument("--skip-check", action="store_true", help="no equivalence check on a GPU either")
    st = sub.add_parser("status", help="the progress of the piece under way (or the last)")
    st.add_argument("--root", default=root)
    st.add_argument("--out")
    pb = sub.add_parser("publish", help="a complete run's outputs, params and dvc.lock, with the comparisons")
    pb.add_argument("--root", default=root, help="where the piece that completed the run ran")
    pb.add_argument("--out", help="that piece's OUT (default: ROOT/out)")
    pb.add_argument("--records", default=str(RECORDS))
    pb.add_argument("--default", default=str(REPO), help="a workspace with the default run's outputs (`dvc pull`)")
    pb.add_argument("--earlier", default=str(EARLIER), help="the earlier partial GPU run's folder, or none")
    pb.add_argument("--dest", default=str(REPO / "results/full-grid"))
    cm = sub.add_parser("compare", help="the records against another run's checkpoints, trial by trial")
    cm.add_argument("--checkpoints", default="data/checkpoints", help="e.g. the default run's")
    cm.add_argument("--records", default=str(RECORDS))
    tk = sub.add_parser("takeover", help="a later commit computes the rest, once a sample of the records agrees")
    tk.add_argument("--code", required=True, help="the commit to take over")
    tk.add_argument("--mnist", required=True)
    tk.add_argument("--records", default=str(RECORDS))
    tk.add_argument("--root", default=root + "-takeover")
    tk.add_argument("--out")
    tk.add_argument("--dry-run", action="store_true", help="recompute the sample and report, change nothing")
    for name in ("audit", "equivalence"):  # the children that compute in --root (in_root)
        c = sub.add_parser(name, help=argparse.SUPPRESS)
        c.add_argument("--sample")
        c.add_argument("--result", required=True)
    return ap


def main() -> None:
    args = parser().parse_args()
    commands = {"run": run, "status": status, "publish": publish, "takeover": takeover, "compare": compare,
                "audit": audit_here, "equivalence": equivalence_here}  # fmt: skip
    commands[args.cmd](args)


if __name__ == "__main__":
    main()
