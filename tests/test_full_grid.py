"""`scripts/full_grid.py`, the study at full scale in pieces, run on the CPU with the tiny params of
tests/e2e.py: a piece its budget stops (its records committed), one SIGKILLed mid-stage (a second piece
beside it refused), one that recovers what the killed one left on its machine, passes the audit a CPU
unlike the records' demands and writes the bytes `dvc repro` writes; a fresh machine whose records were
tampered with stops at the audit, naming the trial; then `publish`. And the committed records, trained
again on this machine, give the bytes they carry."""

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from runpy import run_path

from digitpairs.core import numerics
from digitpairs.training.semantics import TrainConfig
from digitpairs.training.trials import make_trial

import pandas as pd
import pytest
import yaml

from tests.conftest import SHARED_MNIST
from tests.e2e import REPO, TINY, env, full_grid_module, pipeline_outputs, sh
from tests.test_readme import README_LINES

# the tiny params as `-S KEY=VALUE` over the script's full grid (JSON is YAML)
TINY_SETTINGS = [f"-S{section}.{key}={json.dumps(value)}" for section, values in TINY.items()
                 for key, value in values.items()]  # fmt: skip
NO_PINS = dict.fromkeys(numerics.PIN_VARS, "")  # as a fresh shell runs it: the script and each stage set them
OTHER_CPU = {"vendor": "AuthenticAMD", "model": "AMD EPYC (a record edited by the test)", "family_model": "25/1"}


def script(repo: Path, *args: str, check: bool = True):
    return sh(repo, sys.executable, str(repo / "scripts/full_grid.py"), *args, check=check, **NO_PINS)


def lines(folder: Path) -> int:
    return sum(len(f.read_text().splitlines()) for f in folder.glob("*.jsonl"))


def parts(records: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in records.glob("part-*.jsonl.gz")}


def keys(part: bytes) -> list[str]:
    return [json.loads(line)["row"]["key"] for line in gzip.decompress(part).decode().splitlines()]


def as_other_cpu(records: Path) -> None:
    """The earlier pieces' CPU recorded as another (the simulation of a second machine)."""
    pieces = json.loads((records / "pieces.json").read_text())
    (records / "pieces.json").write_text(json.dumps([q | {"cpu": q["cpu"] | OTHER_CPU} for q in pieces]))


def refused_beside(repo: Path, root: Path, common: list[str]) -> None:
    """While a piece is under way (stopped mid-training): a second one on its records, or on its root with
    other records, is refused within seconds, touching neither (its prepare() would replace the root's
    code, its restore the checkpoints the first is writing)."""
    for args, what in (([], "the records"), (["--records", str(root.parent / "other-records")], "the root")):
        t, code, held = time.monotonic(), (root / "digitpairs").stat().st_ino, lines(root / "data/checkpoints")
        second = script(repo, "run", "--root", str(root), *common, *args, check=False)
        assert second.returncode == 1 and f"error: {what} " in second.stderr, second.stderr[-2000:]
        assert "is in use by another piece" in second.stderr and time.monotonic() - t < 30
        assert (root / "digitpairs").stat().st_ino == code and lines(root / "data/checkpoints") >= held
    assert not any((root.parent / "other-records").iterdir())


def killed_mid_stage(repo: Path, root: Path, common: list[str]) -> int:
    """A piece SIGKILLed (with its stage and workers) once it checkpointed a trial of its own; the number
    of trials its root then holds."""
    cmd = [sys.executable, str(repo / "scripts/full_grid.py"), "run", "--root", str(root), *common]
    proc = subprocess.Popen(cmd, cwd=repo, env=env(**NO_PINS), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    ckpts, deadline, before = root / "data/checkpoints", time.monotonic() + 120, None
    while time.monotonic() < deadline and proc.poll() is None:
        if before is None and (root / "data/pairs").exists():  # restored by now: the piece's own trials come next
            before = lines(ckpts)
        if before is not None and lines(ckpts) > before:
            break
        time.sleep(0.2)
    if before is not None and lines(ckpts) > before:  # training: a second piece beside it is refused
        os.killpg(proc.pid, signal.SIGSTOP)  # held where it is (and its locks with it) for the SIGKILL after
        refused_beside(repo, root, common)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert before is not None and lines(ckpts) > before, "the piece checkpointed no trial of its own in 120 s"
    return lines(ckpts)


@pytest.mark.slow
@pytest.mark.system
def test_pieces_on_machines_that_stop_or_die_give_the_run_dvc_repro_gives(tiny_repo, tiny_built, tmp_path):
    repo, records, root = tiny_repo, tiny_repo / "results/tiny-records", tmp_path / "root"
    common = ["--mnist", str(SHARED_MNIST), "--records", str(records), "--nice", "0", *TINY_SETTINGS]
    # a deadline 25 s after the start (the budget less the reserve): past the first training stage on a
    # 2-core machine twice as slow as those measured, yet short of the whole run (about 45 s here)
    budget = str(full_grid_module().RESERVE + 25)
    first = script(repo, "run", "--root", str(root), "--budget", budget, "--commit", *common)
    assert "budget or signal" in first.stdout, first.stdout[-2000:]
    (piece,) = json.loads((records / "pieces.json").read_text())
    assert piece["computed"] > 0 and piece["stopped_by"] == "budget or signal" and not piece["audit"]["needed"]
    assert piece["cpu"] == numerics.cpu() and piece["trainings_per_s"] > 0
    committed = sh(repo, "git", "show", "--name-only", "--format=", "HEAD").stdout.split()
    assert committed and all(f.startswith("results/tiny-records/") for f in committed)
    assert "results/tiny-records" not in sh(repo, "git", "status", "--porcelain").stdout
    first_parts = parts(records)
    early = script(repo, "publish", "--root", str(root), "--records", str(records), check=False)
    assert early.returncode == 1 and re.search("not complete|did not finish every stage", early.stderr), early.stderr

    held = killed_mid_stage(repo, root, [*common, "--export-every", "600"])
    as_other_cpu(records)
    third = script(repo, "run", "--root", str(root), "--check", *common)
    killed, last = json.loads((records / "pieces.json").read_text())[1:]
    assert killed["ended"] is None and killed["computed"] == 0  # what it finished is recovered by the next
    assert last["recovered"] == held - sum(len(keys(p)) for p in first_parts.values()) > 0, third.stdout
    assert last["audit"]["needed"] and last["audit"]["equal"] == last["audit"]["trials"] > 0
    assert last["stopped_by"] == "complete" and pipeline_outputs(root) == pipeline_outputs(tiny_built)
    shown = script(repo, "status", "--root", str(root)).stdout  # the progress file another shell reads
    assert re.search(r"cv-pair 2 of 2; cv-siamese 4 of 4; .* GFLOP/s\); grid left (0\.0 h|unknown)", shown), shown
    assert all(parts(records)[name] == data for name, data in first_parts.items())  # parts are only added
    every = [k for p in parts(records).values() for k in keys(p)]
    assert len(every) == len(set(every)) == len(full_grid_module().checkpointed(root / "data/checkpoints"))
    rows = json.loads((root / "tuning.json").read_text())["equivalence"]["1"]
    assert len(rows) == 6 and all(r["cpu_test"] == pytest.approx(r["gpu_test"], abs=0.02) for r in rows)

    stops_at_the_audit_if_tampered(repo, records, tmp_path, common)
    taken_over_by_a_later_commit(repo, records, root, common, tmp_path, tiny_built)

    published_like_dvc_repro(repo, records, root, tmp_path / "published", tiny_built)


@pytest.mark.slow
@pytest.mark.system
def test_the_committed_records_train_to_the_same_bytes_on_this_machine(tmp_path):
    """The issue's "a trial recomputed from the published records on another machine gives the same digest
    and scores", on whatever machine runs the tests: 24 trials of results/full-grid/records (every shape the
    audit reaches first, both architectures) trained again with this checkout's code, as a takeover's dry
    run does it; each must give the weights digest and scores its record carries."""
    root = tmp_path / "root"
    done = script(REPO, "takeover", "--code", "HEAD", "--dry-run", "--mnist", str(SHARED_MNIST), "--root", str(root),
                  check=False)  # fmt: skip
    assert (root / "out/takeover.json").exists(), done.stderr[-2000:]  # written before the verdict
    rows = json.loads((root / "out/takeover.json").read_text())["rows"]
    differ = [full_grid_module().describe(r["trial"]) for r in rows if not r["equal"]]
    assert len(rows) == 24 and not differ, f"other bytes on {numerics.machine()}: {differ}"
    assert done.returncode == 0, done.stderr[-2000:]


PUBLISHED = REPO / "results/full-grid"


def test_the_published_run_holds_the_bytes_its_lock_names(tmp_path):
    """results/full-grid/ as published: every output its dvc.lock names is there (a file over 1 MiB as
    NAME.gz) with the hash the lock gives it, by DVC's own hashing (scripts/check_outputs.py), but the
    inputs and models a piece does not keep; the published files are the run's, not edited or stale."""
    recompute = run_path(str(REPO / "scripts/check_outputs.py"))["recompute"]
    from dvc.repo import Repo

    lock, missing = yaml.safe_load((PUBLISHED / "dvc.lock").read_text()), []
    with Repo(str(REPO)) as repo:
        for out in (o for s in lock["stages"].values() for o in s.get("outs", [])):
            path, packed = PUBLISHED / out["path"], PUBLISHED / f"{out['path']}.gz"
            if packed.exists():
                path = tmp_path / packed.stem
                path.write_bytes(gzip.decompress(packed.read_bytes()))
            if not path.exists():
                missing.append(out["path"])
                continue
            assert recompute(repo, str(path))[0] == out["md5"], f"{out['path']} is not the bytes dvc.lock names"
    assert sorted(missing) == sorted(full_grid_module().NOT_KEPT)


def test_the_published_cv_tables_are_the_records():
    """The published cross-validation tables are the table the cv stage builds (``study.cv_table``) from the
    records' trials: one row per recorded grid trial, with the scores its record carries. The records (what
    a machine recomputes and audits) and the tables (what the findings and figures read) are one result."""
    from digitpairs.training import study
    from digitpairs.training.trials import Outcome

    fg, score_on = full_grid_module(), yaml.safe_load((PUBLISHED / "params.yaml").read_text())["cv"]["score_on"]
    cv = fg.report.read_published_cv(PUBLISHED / "data/cv")
    recs = [r["row"] for r in fg.carried(PUBLISHED / "records").values() if r["checkpoint"].startswith("cv-")]
    outcomes = [Outcome(fg.trial_of(r["trial"]), r["scores"], weights=r["weights"]) for r in recs]
    table = study.cv_table(outcomes, score_on)
    both = cv.merge(table, on=["variant", "arch", *study.CONFIG_KEYS, "draw", "score_on"], how="outer",
                    indicator=True, validate="one_to_one", suffixes=("", "_records"))  # fmt: skip
    assert len(cv) == 38_400 and (both["_merge"] == "both").all()
    for column in fg.report.SCORES:
        assert (both[column] == both[f"{column}_records"]).all(), column


def test_the_audit_samples_both_architectures_and_every_shape_first():
    fg = full_grid_module()
    recs = [{"checkpoint": f"cv-{arch}", "row": {"trial": {"model": {"arch": arch, "nbch1": w}}, "key": f"{w}{d}"}}
            for arch in ("pair", "siamese") for w in (8, 16, 32) for d in range(10)]  # fmt: skip
    sample = fg.audit_sample(recs, 24, "audit-1")
    assert len(sample) == 24 and len({(r["trial"]["model"]["arch"], r["key"]) for r in sample}) == 24
    assert [r["trial"]["model"]["arch"] for r in sample[:6]] == ["pair", "siamese"] * 3
    assert {(r["trial"]["model"]["arch"], r["trial"]["model"]["nbch1"]) for r in sample[:6]} == {
        (a, w) for a in ("pair", "siamese") for w in (8, 16, 32)}  # fmt: skip
    assert fg.audit_sample(recs, 24, "audit-1") == sample != fg.audit_sample(recs, 24, "audit-2")


def test_records_are_only_added_to_and_restore_what_they_carry(tmp_path):
    fg, ckpts, records = full_grid_module(), tmp_path / "ckpts", tmp_path / "records"
    widths = dict(nbch1=8, nbch2=8, nbfch=16, batch_norm=True, skip_connections=False)
    trial = asdict(make_trial("pair", widths, TrainConfig(epochs=1), draw=0, seed=1))
    row = {"trial": trial, "scores": {"val": {"acc": 0.5}}, "weights": "ab" * 32}
    key = "0123456789abcdef-fedcba9876543210-lockstep-cpu-t1-{code}-0a1b2c3d4e5f"
    fg.Checkpoint(ckpts / "cv-pair.jsonl").extend([row | {"key": key.format(code="c0de00000001")}])
    first, n = fg.export(ckpts, records)
    assert n == 1 and first.name.startswith("part-") and fg.export(ckpts, records) == (None, 0)
    fg.Checkpoint(ckpts / "cv-siamese.jsonl").add(row | {"key": key.format(code="c0de00000002")})
    second, n = fg.export(ckpts, records)
    assert n == 1 and second != first and {p.name for p in records.iterdir()} == {first.name, second.name}
    assert fg.restore(records, tmp_path / "elsewhere") == 2 and fg.restore(records, tmp_path / "elsewhere") == 0
    assert fg.checkpointed(tmp_path / "elsewhere") == fg.checkpointed(ckpts) == fg.carried(records)
    # a takeover maps the code digest it vouched for: carried trials resume under the new key, none is new
    (records / "run.json").write_text(json.dumps({"takeovers": [{"code_digests": ["c0de00000001", "c0de0000000f"]}]}))
    assert sorted(fg.carried(records)) == [key.format(code="c0de00000002"), key.format(code="c0de0000000f")]
    assert fg.export(ckpts, records) == (None, 0) and fg.restore(records, ckpts) == 1
    other = tmp_path / "other"  # another run's checkpoint of the same trial, other bytes
    fg.Checkpoint(other / "cv-pair.jsonl").add(row | {"key": "k", "weights": "cd" * 32})
    assert fg.agreement(records, ckpts)["differ"] == [] and fg.agreement(records, other)["weights_equal"] == 0
    assert fg.agreement(records, other)["differ"] == ["pair 8/8/16 BN on skip off, lr 0.1, draw 0, seed 1"]


def stops_at_the_audit_if_tampered(repo: Path, records: Path, tmp_path: Path, common: list[str]) -> None:
    """A fresh machine whose records carry wrong digests stops at the audit, naming the trial."""
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for name, data in parts(records).items():
        text = gzip.decompress(data).decode().replace('"weights": "', '"weights": "0')
        (tampered / name).write_bytes(gzip.compress(text.encode()))
    for name in ("run.json", "pieces.json"):
        (tampered / name).write_bytes((records / name).read_bytes())
    as_other_cpu(tampered)
    t = time.monotonic()
    bad = script(repo, "run", "--root", str(tmp_path / "fresh"), *common[:2], "--records", str(tampered),
                 *common[4:], check=False)  # fmt: skip
    assert bad.returncode == 1 and time.monotonic() - t < 120
    assert re.search(r"error: the audit's trial (pair|siamese-2|siamese-10) 8/8/16 BN on skip off, lr [0-9.]+, "
                     r"draw \d, seed 1 \(key [0-9a-f]{16}-", bad.stdout), bad.stdout[-2000:]  # fmt: skip
    assert "cv@pair" not in bad.stdout.split("audit")[-1]  # stopped before any training stage


def taken_over_by_a_later_commit(
    repo: Path, records: Path, root: Path, common: list[str], tmp_path: Path, tiny_built: Path
) -> None:
    """A commit whose code trains the same bytes takes over, and the run resumes every trial under it; one
    that trains other bytes is refused and changes nothing."""
    trials_py = repo / "digitpairs/training/trials.py"
    original = trials_py.read_text()
    trials_py.write_text(original + "\nSAME_BYTES = True\n")  # another code digest, the same training
    sh(repo, "git", "commit", "-qam", "the same training, other code")
    takeover = ["takeover", "--code", "HEAD", "--mnist", str(SHARED_MNIST), "--records", str(records)]
    script(repo, *takeover, "--root", str(tmp_path / "takeover"))
    run = json.loads((records / "run.json").read_text())
    assert run["commit"] == sh(repo, "git", "rev-parse", "HEAD").stdout.strip() and len(run["takeovers"]) == 1
    old_code, new_code = run["takeovers"][0]["code_digests"]
    assert old_code != new_code and run["takeovers"][0]["audit"]["equal"] == 6
    resumed = script(repo, "run", "--root", str(root), *common)
    assert "cv@pair: resumed 2 of 2" in resumed.stderr and "cv@siamese: resumed 4 of 4" in resumed.stderr
    for f in (root / "data/checkpoints").glob("*.jsonl"):  # written under the old keys, now the new: each once
        assert len(f.read_text().splitlines()) == len(full_grid_module().Checkpoint(f).done), f.name
    assert pipeline_outputs(root) == pipeline_outputs(tiny_built)
    trials_py.write_text(original.replace('"init"', '"init-other"'))  # other initial weights: other bytes
    sh(repo, "git", "commit", "-qam", "other training")
    refused = script(repo, *takeover, "--root", str(tmp_path / "takeover2"), check=False)
    assert refused.returncode == 1 and "cannot take over the run" in refused.stdout + refused.stderr
    assert json.loads((records / "run.json").read_text()) == run


def refused_without_the_default_run(repo: Path, publish: list[str], dest: Path, tiny_built: Path) -> None:
    """`publish` with a --default that lacks the default run's outputs, or holds a damaged one, says so and
    leaves the published folder as it was, with nothing beside it."""
    before = {f: f.read_bytes() for f in dest.rglob("*") if f.is_file()}
    damaged = dest.parent / "damaged-default"
    for name in ("data/cv/pair.csv", "data/cv/siamese.csv", "models_out/findings.json"):
        (damaged / name).parent.mkdir(parents=True, exist_ok=True)
        (damaged / name).write_bytes((tiny_built / name).read_bytes())
    (damaged / "models_out/metrics.json").write_text('{"pair": ')  # cut short
    (dest.parent / "empty").mkdir()
    for default, why in ((dest.parent / "empty", "lacks the default run's data/cv/pair.csv, data/cv/siamese.csv"),
                         (damaged, "publish failed (JSONDecodeError")):  # fmt: skip
        bad = script(repo, *publish, "--default", str(default), check=False)
        assert bad.returncode == 1 and f"error: {why}" in bad.stderr.replace(f"--default {default} ", ""), bad.stderr
        assert {f: f.read_bytes() for f in dest.rglob("*") if f.is_file()} == before
        assert not list(dest.parent.glob(f".{dest.name}-*"))  # the unfinished publish's folder is gone


def published_like_dvc_repro(repo: Path, records: Path, root: Path, dest: Path, tiny_built: Path) -> None:
    """`publish` of the complete run: its own dvc.lock (`dvc commit`) holds the output hashes `dvc repro`
    wrote, the outputs are its bytes, and the comparisons with the default run (here: the same tiny
    run, so nothing moved) and with the earlier GPU run are written."""
    publish = ["publish", "--root", str(root), "--records", str(records), "--dest", str(dest),
               "--earlier", str(REPO / "results/full-grid/earlier-gpu")]  # fmt: skip
    script(repo, *publish, "--default", str(tiny_built))
    refused_without_the_default_run(repo, publish, dest, tiny_built)
    ours, theirs = (yaml.safe_load((d / "dvc.lock").read_text())["stages"] for d in (dest, tiny_built))
    assert {s: v["outs"] for s, v in ours.items()} == {s: v["outs"] for s, v in theirs.items()}
    assert yaml.safe_load((dest / "params.yaml").read_text())["cv"]["lr"] == TINY["cv"]["lr"]
    for name in ("data/cv/pair.csv", "models_out/metrics.json", "models_out/findings.json", "plots/findings.png"):
        assert (dest / name).read_bytes() == (tiny_built / name).read_bytes(), name
    comp = json.loads((dest / "comparison.json").read_text())
    acc, found = comp["default"]["accuracy"], comp["default"]["findings"]
    assert set(acc) == set(json.loads((tiny_built / "models_out/metrics.json").read_text()))
    assert all(a["same_config"] and a["difference"] == 0 for a in acc.values())
    assert found and not any(f["moved"] for f in found.values())
    shared = comp["default"]["shared_trials"]
    assert shared["trials"] == shared["in_full_grid"] == shared["scores_equal"] > 0 and not shared["differ"]
    assert set(comp["earlier_gpu"]["ranking"]) == {"earlier_gpu", "full"}
    summary = pd.read_csv(dest / "cv_summary.csv")
    assert len(summary) == 2 + 2 * 2 and set(summary["n_draws"]) == {TINY["cv"]["n_draws"]}
    readme = run_path(str(REPO / "scripts/readme.py"))
    table = readme["full_scale_block"](dest)  # the README's, which must keep it short
    assert table.count("(yes) |") == len(acc) and "Every finding keeps its verdict." in table, table
    text = readme["render"]((REPO / "README.md").read_text(), {"full-scale": lambda: table})
    assert table in text and len(text.splitlines()) <= README_LINES
    detail = readme["full_grid_results_block"](dest)  # docs/full-grid.md's
    assert detail.count("established |") == len(found) and "(moved)" not in detail, detail
    figures = re.findall(r"\]\(([^)]+\.png)\)", detail)
    assert len(figures) == 1 + len(list((dest / "plots").glob("*.png"))) > 1, detail
    assert all((REPO / "docs" / f).exists() for f in figures), figures


def test_progress_weighs_the_time_left_by_flops_and_reads_checkpoints_as_they_grow(tmp_path):
    """A piece's time left is the grid's FLOPs left at the piece's FLOP rate: one wide trial computed in
    an hour leaves four siamese trials, narrow and wide, whose time is their FLOPs' share, not their count's."""
    fg, ckpts = full_grid_module(), tmp_path / "checkpoints"
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["cv"] |= dict(TINY["cv"], nbch1=[8, 64], lr=[0.1])
    narrow, wide = fg.study.cv_trials("pair", p)
    rows = [{"key": f"k{t.model.nbch1}", "trial": asdict(t), "scores": {}, "weights": "ab" * 32}
            for t in (narrow, wide)]  # fmt: skip
    tally = fg.Tally(ckpts)
    fg.Checkpoint(ckpts / "cv-pair.jsonl").add(rows[0])
    start = tally()
    assert start == {"cv-pair": (1, fg.trial_flops(narrow))}
    with (ckpts / "cv-pair.jsonl").open("a") as f:
        f.write('{"row": {"key": "torn"')  # a line being written, or torn by a kill
    assert tally() == start
    with pytest.warns(UserWarning, match="1 corrupt or truncated"):
        fg.Checkpoint(ckpts / "cv-pair.jsonl")  # drops the torn line: the file is rewritten, and read again
    fg.Checkpoint(ckpts / "cv-pair.jsonl").add(rows[1])
    done = tally()
    assert done == {"cv-pair": (2, fg.trial_flops(narrow) + fg.trial_flops(wide))}
    q = fg.progress(done, p, start, 3600.0, fg.grid_flops(p))
    siamese = sum(fg.trial_flops(t) for t in fg.study.cv_trials("siamese", p))
    assert q["grid_left"] == 4 and q["gflop_per_s"] == round(fg.trial_flops(wide) / 3600 / 1e9, 1)
    assert q["grid_left_h"] == round(siamese / fg.trial_flops(wide), 1) != 4.0  # 4 trainings at 1 an hour
    line = f"cv-pair 2 of 2; 0.0 trainings/s (0.0 GFLOP/s); grid left {q['grid_left_h']} h"
    assert fg.progress_line(q).startswith(line)
