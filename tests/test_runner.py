"""run_trials: executors agree, checkpoints resume and survive damage, progress goes to stderr."""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import replace
from pathlib import Path

from digitpairs.data.pairs import write_draws
from digitpairs.training.runner import Checkpoint, run_trials
from digitpairs.training.study import cv_trials

import pytest

PARAMS = {
    "train": {"epochs": 1, "batch_size": 100, "shuffle": True, "relu_logits": False},
    "cv": {
        "seed": 1,
        "n_draws": 2,
        "nbch1": [4],
        "nbch2": [4],
        "nbfch": [8],
        "batch_norm": [True],
        "skip_connections": [False],
        "lr": [0.1, 0.5],
    },
}


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory, mnist_splits):
    """Two small draws (200 pairs per split) on disk, as the pairs stage writes them."""
    folder = tmp_path_factory.mktemp("pairs")
    write_draws(mnist_splits, folder, n_draws=2, seed=1, n_pairs=200)
    return folder


def trials(lr=(0.1, 0.5)):
    return cv_trials("pair", {**PARAMS, "cv": {**PARAMS["cv"], "lr": list(lr)}})


def resumed(err: str) -> tuple[int, int]:
    n, m = re.search(r"resumed (\d+) of (\d+) trials from ", err).groups()
    return int(n), int(m)


def test_workers_do_not_change_results(pairs_dir):
    ts = trials()
    one = run_trials(ts, pairs_dir, workers=1)
    two = run_trials(ts, pairs_dir, workers=2)
    assert [o.trial for o in one] == ts == [o.trial for o in two]
    assert [o.scores for o in one] == [o.scores for o in two]


def test_checkpoint_resumes_and_a_new_value_trains_only_its_trials(pairs_dir, tmp_path, capsys):
    ck = tmp_path / "ck.jsonl"
    first = run_trials(trials(), pairs_dir, checkpoint=ck, workers=1)
    assert resumed(capsys.readouterr().err) == (0, 4)
    again = run_trials(trials(), pairs_dir, checkpoint=ck, workers=1)
    assert resumed(capsys.readouterr().err) == (4, 4)
    assert [o.scores for o in again] == [o.scores for o in first]
    more = run_trials(trials((0.1, 0.5, 0.2)), pairs_dir, checkpoint=ck, workers=1)
    assert resumed(capsys.readouterr().err) == (4, 6)  # only lr=0.2's two trials train
    assert [o.scores for o in more[:4]] == [o.scores for o in first]
    assert len(ck.read_text().splitlines()) == 6


def test_torn_and_corrupt_lines_are_dropped_and_appends_start_on_a_new_line(pairs_dir, tmp_path, capsys):
    ck = tmp_path / "ck.jsonl"
    ref = run_trials(trials(), pairs_dir, checkpoint=ck, workers=1)
    capsys.readouterr()
    lines = ck.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["row"]["scores"]["val"]["accuracy"] = 1.0  # an edit breaks the checksum
    ck.write_text("\n".join([lines[0], json.dumps(edited), lines[2]]) + "\n" + lines[3][:40])  # torn, no newline
    with pytest.warns(UserWarning, match="2 corrupt or truncated"):
        out = run_trials(trials(), pairs_dir, checkpoint=ck, workers=1)
    assert resumed(capsys.readouterr().err) == (2, 4)
    assert [o.scores for o in out] == [o.scores for o in ref]
    assert len(Checkpoint(ck).done) == 4 and ck.read_text().endswith("\n")


def test_torn_last_line_does_not_swallow_the_next_record(tmp_path):
    ck = tmp_path / "ck.jsonl"
    c = Checkpoint(ck)
    c.add({"key": "a", "scores": {}})
    ck.write_text(ck.read_text().rstrip("\n"))  # complete record, newline lost
    Checkpoint(ck).add({"key": "b", "scores": {}})
    assert set(Checkpoint(ck).done) == {"a", "b"}


def test_key_covers_data_and_engine(pairs_dir, tmp_path):
    ck = tmp_path / "ck.jsonl"
    ts = trials()[:1]
    run_trials(ts, pairs_dir, checkpoint=ck, workers=1)
    keys = set(Checkpoint(ck).done)
    run_trials([replace(ts[0], seed=2)], pairs_dir, checkpoint=ck, workers=1)
    assert len(Checkpoint(ck).done) == 2 and keys < set(Checkpoint(ck).done)
    (key,) = keys
    assert key.startswith(ts[0].key()) and "-loop-cpu-t1-" in key


def test_checkpoint_refuses_runs_that_keep_more_than_scores(pairs_dir, tmp_path):
    with pytest.raises(ValueError, match="scores only"):
        run_trials(trials(), pairs_dir, checkpoint=tmp_path / "c.jsonl", keep_state=True)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_only_and_on_stderr(pairs_dir, capsys):
    ts = trials()[:2]
    run_trials(ts, pairs_dir, workers=1, desc="quiet")
    captured = capsys.readouterr()
    assert "quiet" not in captured.err + captured.out  # not a terminal: no bar
    tty = _Tty()
    with contextlib.redirect_stderr(tty):
        run_trials(ts, pairs_dir, workers=1, desc="cv@pair")
    assert re.search(r"cv@pair: 100%.*2/2 \[.*<.*trial/s\]", tty.getvalue())
    assert "cv@pair" not in capsys.readouterr().out


def test_checkpoint_code_digest_ignores_docstrings_and_comments():
    """A doc edit in the training code keeps every checkpoint (DVC reruns the stage, which resumes all
    its trials); a change to the code itself does not."""
    from digitpairs.training import lockstep_kernels
    from digitpairs.training.runner import parsed_code

    source = Path(lockstep_kernels.__file__).read_text()
    edited = source.replace('"""The lockstep engine\'s kernels:', '"""The lockstep engine\'s kernels, reworded:', 1)
    edited = edited.replace("EPS, MOMENTUM = 1e-5, 0.1", "EPS, MOMENTUM = 1e-5, 0.1  # a new comment", 1)
    assert edited != source and parsed_code(edited) == parsed_code(source)
    changed = source.replace("EPS, MOMENTUM = 1e-5, 0.1", "EPS, MOMENTUM = 1e-5, 0.2", 1)
    assert parsed_code(changed) != parsed_code(source)


def test_checkpoints_are_keyed_by_every_training_module_an_engine_runs():
    """RESULT_CODE names existing files, among them every module of digitpairs/training that either engine
    imports: a new file of the training's semantics or of an engine cannot be left out of the key."""
    from digitpairs.training.runner import RESULT_CODE

    from tests.test_layout import graph

    package = Path(__file__).parents[1] / "digitpairs"
    assert all((package / name).is_file() for name in RESULT_CODE)
    g, todo, seen = graph(), {"digitpairs.training.train", "digitpairs.training.lockstep"}, set()
    while todo:
        m = todo.pop()
        seen.add(m)
        todo |= g[m] - seen
    training = {m.split(".", 1)[1].replace(".", "/") + ".py" for m in seen if m.startswith("digitpairs.training.")}
    assert training <= set(RESULT_CODE)
