"""Deterministic, atomic file output and the stage scripts' error handling."""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from digitpairs.core import params as params_module
from digitpairs.core.variants import GRID_ARCHS

if TYPE_CHECKING:  # pandas loads where a table is written or read, so the failure path works without it
    import pandas as pd


class StageError(RuntimeError):
    """An expected failure of a stage (MNIST unavailable, ...) whose message names the problem and
    the fix: :func:`run_stage` prints it as one line. Defined here so this module, which every stage
    runs, imports nothing from the data, training or report code."""


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` for the block to write; renamed to ``path`` if the block ends
    without an error, removed if not: a reader (DVC, the next stage) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write(path: Path, data: str | bytes) -> None:
    with replacing(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)


def write_json(obj: object, path: Path) -> None:
    """Sorted keys and fixed indentation, so unchanged results give unchanged bytes (and hashes).

    Strict JSON: a NaN or an infinity (which JSON has no spelling for, and strict parsers reject) is
    refused with the file's name; an undefined statistic belongs in the file as ``null``."""
    try:
        text = json.dumps(obj, sort_keys=True, indent=2, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"{path}: refusing to write a NaN or an infinity (not JSON): {err}") from None
    _atomic_write(path, text + "\n")


def finite_or_null(obj: object) -> object:
    """``obj`` with every NaN or infinite float replaced by None, for JSON files of measurements (the GPU
    script's tuning and provenance) where an undefined number must not stop the run: it is ``null``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_null(v) for v in obj]
    return obj


def write_csv(df: pd.DataFrame, path: Path) -> None:
    """A CSV written all at once, floats as their shortest exact repr, no index."""
    _atomic_write(path, df.to_csv(index=False, lineterminator="\n"))


def read_cv_tables(cv_dir: Path, read: Callable[[Path], pd.DataFrame] | None = None) -> pd.DataFrame:
    """The cross-validation tables of every grid architecture (``cv_dir/<arch>.csv``) as one table,
    each read by ``read`` (a reader that checks the columns, for example; pandas' by default)."""
    import pandas as pd

    read = read or pd.read_csv
    return pd.concat([read(Path(cv_dir) / f"{arch}.csv") for arch in GRID_ARCHS], ignore_index=True)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _put(src: Path, dest: Path, md5: str) -> None:
    """Copy a cached object into place, checked against its recorded hash, via a temporary name."""
    if _md5(src) != md5:
        raise FileNotFoundError(f"{src} does not hold {md5}")
    with replacing(dest) as tmp:
        shutil.copyfile(src, tmp)


def _lock_stages() -> dict:
    """``stages`` of ./dvc.lock, or {} when there is none (or it does not parse)."""
    lock_path = Path("dvc.lock")
    if not lock_path.is_file():
        return {}
    try:
        return (params_module.parse(lock_path.read_text(), lock_path) or {}).get("stages") or {}
    except params_module.ParamError:
        return {}


def _cache():
    from dvc.repo import Repo

    return Repo(".").cache.local


def _manifest(cache, md5: str) -> dict[str, str]:
    """``{relpath: md5}`` of a directory output, from its ``.dir`` object in the DVC cache."""
    return {e["relpath"]: e["md5"] for e in json.loads(Path(cache.oid_to_path(md5)).read_text())}


def _first_mismatch(path: Path, md5: str, cache) -> Path | None:
    """The first file of output ``path`` that is not as dvc.lock's ``md5`` records it (missing, changed,
    or, in a folder, extra), or None when it all matches (or cannot be checked: no ``.dir`` object)."""
    if not md5.endswith(".dir"):
        return None if path.is_file() and _md5(path) == md5 else path
    try:
        manifest = _manifest(cache, md5)
    except (OSError, ValueError, KeyError, TypeError):
        return None if path.is_dir() else path
    files = {f.relative_to(path).as_posix(): f for f in path.rglob("*") if f.is_file()} if path.is_dir() else {}
    for rel in sorted(manifest.keys() | files.keys()):
        if rel not in manifest or rel not in files or _md5(files[rel]) != manifest[rel]:
            return path / rel
    return None


# Bytes of the stage's file outputs as dvc.lock records them, read when run_stage starts (keep_outputs): the
# uncached outputs (``cache: false`` + ``persist: true`` in dvc.yaml, which DVC leaves in place), for a stage
# that fails after replacing one of them, in a workspace whose run is not committed (git HEAD holds another's).
_kept: dict[str, tuple[str, bytes]] = {}


def keep_outputs(stage: str) -> None:
    """Keep in memory every file output of ``stage`` that is present and as dvc.lock records it: what DVC left
    in place (the persisted, uncached outputs, small JSON and PNG files), which neither its cache nor git may
    hold; :func:`restore_outputs` puts them back from here."""
    entry = _lock_stages().get(stage) or {}
    for out in entry.get("outs", []):
        path, md5 = Path(out["path"]), out.get("md5", "")
        if md5 and not md5.endswith(".dir") and path.is_file():
            data = path.read_bytes()
            if hashlib.md5(data).hexdigest() == md5:
                _kept[path.as_posix()] = (md5, data)


def _restore_one(path: Path, md5: str, cache) -> None:
    """Put output ``path`` back as ``md5`` records it: from the DVC cache (every file hash-checked,
    a folder assembled beside it and swapped in whole), or, for an uncached output (``cache: false``,
    committed to git), from the copy kept when the stage started (:func:`keep_outputs`) or from
    ``git HEAD``. Raises FileNotFoundError when none holds it."""
    if md5.endswith(".dir"):
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        for rel, file_md5 in _manifest(cache, md5).items():
            _put(Path(cache.oid_to_path(file_md5)), tmp / rel, file_md5)
        tmp.mkdir(parents=True, exist_ok=True)
        old = path.with_name(path.name + ".failed")
        shutil.rmtree(old, ignore_errors=True)
        if path.is_dir() and not path.is_symlink():
            path.replace(old)
        else:
            path.unlink(missing_ok=True)
        tmp.replace(path)
        shutil.rmtree(old, ignore_errors=True)
    elif Path(cache.oid_to_path(md5)).is_file():
        _put(Path(cache.oid_to_path(md5)), path, md5)
    elif _kept.get(path.as_posix(), ("", b""))[0] == md5:
        _atomic_write(path, _kept[path.as_posix()][1])
    else:
        blob = subprocess.run(["git", "show", f"HEAD:{path.as_posix()}"], capture_output=True, check=False)
        if blob.returncode or hashlib.md5(blob.stdout).hexdigest() != md5:
            raise FileNotFoundError(path)
        _atomic_write(path, blob.stdout)  # bytes: the README's PNG is one


def restore_outputs(stage: str) -> tuple[list[str], list[str]]:
    """Put the outputs of ``stage`` back as dvc.lock records them, after its command failed.

    DVC removes a stage's outputs before it starts the command, and offers no hook before that or
    after a failure; so a stage that fails (a bad value in params.yaml, a corrupt input, an
    interrupt, under ``dvc repro -s`` or not) puts back every output that is missing or not as
    dvc.lock records it (a file the failed run wrote, a folder it half filled): from the DVC cache,
    or, for an uncached output such as the git-tracked metrics (which DVC does not delete: dvc.yaml
    persists them), from the copy kept when the stage started or from ``git HEAD``; every file is
    hash-checked and lands under a temporary name first, so nothing half-written is left, and an
    output is only ever replaced by the exact bytes dvc.lock records. Outputs that match are left
    alone, as are files that are not outputs (the checkpoints). Returns ``(restored, lost)``: the
    paths put back, and those nothing here holds (``dvc checkout`` cannot help there either;
    rerunning the stage can)."""
    entry = _lock_stages().get(stage) or {}
    outs = [(Path(o["path"]), o["md5"]) for o in entry.get("outs", []) if "md5" in o]
    if not outs:
        return [], []
    cache = _cache()
    restored, lost = [], []
    for path, md5 in outs:
        _remove(path.with_name(path.name + ".partial"))  # what an interrupted write left
        if _first_mismatch(path, md5, cache) is None:
            continue
        try:
            _restore_one(path, md5, cache)
            restored.append(path.as_posix())
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            lost.append(path.as_posix())
    return restored, lost


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def stale_input(stage: str) -> str:
    """Where an input of ``stage`` is not what its producing stage wrote, by dvc.lock: a clause naming
    the first such file and the commands that fix it, or "" when every input is as recorded (or
    dvc.lock cannot tell). Used to explain an unexpected failure, such as a truncated CSV or model."""
    stages = _lock_stages()
    entry = stages.get(stage) or {}
    produced = {o["path"]: (s, o["md5"]) for s, e in stages.items() for o in (e or {}).get("outs", []) if "md5" in o}
    cache = None
    for dep in entry.get("deps", []):
        if dep.get("path") not in produced:
            continue
        producer, md5 = produced[dep["path"]]
        cache = cache or _cache()
        bad = _first_mismatch(Path(dep["path"]), md5, cache)
        if bad is None:
            continue
        state = "is missing" if not bad.exists() else "is not as dvc.lock records it"
        cached = md5.endswith(".dir") or Path(cache.oid_to_path(md5)).is_file()
        force = "--force " if bad.exists() else ""  # dvc checkout will not replace a changed file without it
        fix = f"dvc checkout {force}{dep['path']}" if cached else f"git checkout -- {dep['path']}"
        return (
            f"; input {bad.as_posix()} {state} (written by stage {producer}): "
            f"`{fix}` restores it, `dvc repro {producer}` recomputes it"
        )
    return ""


DEBUG_ENV = "DIGITPAIRS_DEBUG"
_caught: list[int] = []  # the signal that interrupted the stage, if any


def _on_signal(signum: int, frame) -> None:
    _caught.append(signum)
    raise KeyboardInterrupt


def _handle_signals() -> None:
    """SIGTERM and SIGHUP (a job killed politely, a closed terminal) take Ctrl-C's path: the stage stops
    with one line, keeps its checkpoints, and restores its outputs; the exit status is 128 + signal.
    A signal the parent set to be ignored (a background job's SIGINT) stays ignored. A signal that
    arrived while the stage was importing (``stages/__init__.py`` notes it) stops the stage now."""
    pending: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        handler = signal.getsignal(sig)
        if handler in (signal.SIG_DFL, signal.default_int_handler) or hasattr(handler, "pending"):
            pending += getattr(handler, "pending", [])
            signal.signal(sig, _on_signal)
    if pending:
        _caught.append(pending[0])
        raise KeyboardInterrupt


def _stage_name() -> str:
    """The DVC stage running (``DVC_STAGE``), or the one this command would be under dvc.yaml
    (``python -m stages.cv pair`` is cv@pair), or "" if neither is known."""
    if os.environ.get("DVC_STAGE"):
        return os.environ["DVC_STAGE"]
    stem = Path(sys.argv[0]).stem
    stages = _lock_stages()
    matrix = f"{stem}@{sys.argv[1]}" if len(sys.argv) > 1 else ""
    return matrix if matrix in stages else stem if stem in stages else ""


def _fail(line: str, status: int, explain: bool, hint: str = "") -> NoReturn:
    """Finish a failed stage: under DVC put its outputs back (signals held off meanwhile), print
    ``line`` plus what was restored or what to run, and exit with ``status``."""
    held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    dvc_stage = os.environ.get("DVC_STAGE", "")
    note = ""
    try:
        if explain and "`" not in line:
            note += stale_input(_stage_name())
        if dvc_stage:
            restored, lost = restore_outputs(dvc_stage)
            if lost:
                note += (
                    f" (could not restore {', '.join(lost)}: neither the DVC cache nor git holds the bytes dvc.lock "
                    f"records; `dvc repro {dvc_stage}` recomputes them)"
                )
            elif restored:
                note += f" (outputs put back as dvc.lock records them: {', '.join(restored)})"
    except Exception as err:  # the report must not hide the failure it reports
        note += f" (could not check the outputs: {type(err).__name__}: {err}; run `dvc checkout {dvc_stage}`)"
    print(line + note + hint, file=sys.stderr)
    sys.stderr.flush()
    for sig, handler in held.items():
        signal.signal(sig, handler)
    sys.exit(status)


def run_stage(main: Callable[[dict], None]) -> None:
    """Validate params.yaml, then run a stage's ``main(params)``: one failure path for everything.

    Validation comes first, before the stage writes anything. Whatever then goes wrong, the stage
    ends with one line on stderr (``error: ...`` or ``interrupted: ...``) naming what failed, the file
    where one is at fault and the command that fixes it, and a non-zero exit status: 1 for an error,
    130 for Ctrl-C, 143 for SIGTERM (129 for SIGHUP). Under DVC (``DVC_STAGE`` set) the outputs DVC
    deleted before the command are put back first (:func:`restore_outputs`), so ``dvc repro -s``
    loses nothing; checkpoints are kept, so ``dvc repro`` resumes. Expected failures (a bad param,
    a :class:`StageError`, a ``ValueError`` or ``FileNotFoundError`` raised by the project's own code,
    whose messages are written for the user) print their message; any other exception (a library's,
    a worker's) prints the stage, its type and its first line. Where a message names no command, the
    line adds the first input that dvc.lock says is not what its stage wrote (:func:`stale_input`),
    with the ``dvc checkout`` that restores it. ``DIGITPAIRS_DEBUG=1`` prints the traceback too.
    What fails before this takes over (while the stage imports its libraries) takes the same path:
    ``stages/__init__.py`` hands it to :func:`fail_unhandled`.
    """
    try:
        _handle_signals()
        if os.environ.get("DVC_STAGE"):
            keep_outputs(os.environ["DVC_STAGE"])
        try:
            p = params_module.load()
        except params_module.ParamError as err:
            _fail(f"error: {err}", 1, explain=False)
        main(p)
    except KeyboardInterrupt as err:
        signum = _caught[-1] if _caught else signal.SIGINT
        what = {signal.SIGINT: "", signal.SIGTERM: " (SIGTERM)", signal.SIGHUP: " (SIGHUP)"}.get(signum, "")
        name = _stage_name() or Path(sys.argv[0]).stem
        default = f"{name}: stopped before finishing; `dvc repro` reruns it."
        _fail(f"interrupted{what}: {str(err) or default}", 128 + signum, explain=False)
    except (ValueError, FileNotFoundError, StageError) as err:
        if isinstance(err, StageError) or _raised_here(err):
            _debug(err)
            _fail(f"error: {err}", 1, explain=True)
        _unexpected(err)
    except Exception as err:
        _unexpected(err)


def _raised_here(err: BaseException) -> bool:
    """Whether the project's own code raised ``err`` (a message written for the user), rather than a
    library (whose message lacks the context: which stage, which file)."""
    tb = err.__traceback__
    while tb and tb.tb_next:
        tb = tb.tb_next
    if tb is None:
        return False
    source = Path(tb.tb_frame.f_code.co_filename).resolve()
    package = Path(__file__).resolve().parents[1]  # digitpairs/
    return source.is_relative_to(package) or source.is_relative_to(package.parent / "stages")


def _unexpected(err: BaseException, explain: bool = True) -> NoReturn:
    _debug(err)
    first = (str(err).strip().splitlines() or [""])[0][:300]
    name = _stage_name() or Path(sys.argv[0]).stem
    hint = "" if os.environ.get(DEBUG_ENV) else f" ({DEBUG_ENV}=1 shows the traceback)"
    _fail(f"error: {name} failed: {type(err).__name__}: {first}{_memory_limit(err)}", 1, explain, hint=hint)


# What the C library and the allocators say when a mapping or an allocation is refused
_OUT_OF_MEMORY = ("failed to map segment", "cannot allocate memory", "can't allocate memory", "out of memory")


def _memory_limit(err: BaseException) -> str:
    """A clause naming the process's address-space limit (``ulimit -v``, as a shared machine or a batch
    scheduler sets it) when ``err`` is a refused allocation or mapping under one, else "": the library's own
    message (``libtorch_cpu.so: failed to map segment from shared object``) does not say why."""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    refused = isinstance(err, MemoryError) or any(s in str(err).lower() for s in _OUT_OF_MEMORY)
    if limit == resource.RLIM_INFINITY or not refused:
        return ""
    return (
        f"; this process may use only {limit // 1024} KiB of address space (`ulimit -v {limit // 1024}`), too "
        "little for it: raise the limit (`ulimit -v unlimited`, or more memory from the batch scheduler)"
    )


def fail_unhandled(err: BaseException) -> NoReturn:
    """The failure path for what escaped before :func:`run_stage` took over: an import that failed (a broken
    or partial install, a missing shared library, a memory limit), or Ctrl-C in the first instant. The same
    one line, outputs put back under DVC, and exit status as any other failure (raises SystemExit)."""
    if isinstance(err, KeyboardInterrupt):
        name = _stage_name() or Path(sys.argv[0]).stem
        _fail(f"interrupted: {name}: stopped before finishing; `dvc repro` reruns it.", 128 + signal.SIGINT, False)
    _unexpected(err, explain=False)  # not an input's fault: the stage had read none


def _debug(err: BaseException) -> None:
    if os.environ.get(DEBUG_ENV):
        traceback.print_exception(err)
