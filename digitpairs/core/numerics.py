"""Numeric pins: the same params give the same bits on any x86-64 CPU with AVX2 and FMA.

Without them the numeric libraries pick a code path per CPU (AVX2, AVX-512, AMX, another vendor),
round differently, and 25 epochs of SGD turn the last bit into another model. Each pin below is a
control the library itself documents; nothing is re-implemented here.

- ``MKL_CBWR=COMPATIBLE`` (every GEMM outside the lockstep engine: the loop engine's linear layers
  and im2col convolutions; ``DIGITPAIRS_GEMM=mkl`` puts the lockstep engine's products here too).
  oneMKL's Conditional Numerical Reproducibility: the COMPATIBLE branch (SSE2 instructions) is the
  one the guide names for Intel and Intel-compatible processors alike (oneMKL Developer Guide,
  "Getting Started with Conditional Numerical Reproducibility"); single-threaded, as every job runs,
  it needs no strict mode. The AVX2 branch (``AVX2,STRICT``) is promised for Intel CPUs only, and on
  AMD CPUs MKL runs its own path: under it a [100 x 9] @ [9 x 8] product already rounds differently
  on an emulated AMD EPYC than on an Intel CPU, and a default ``dvc repro`` computed on an AMD EPYC
  differed from one on an Intel Xeon with AMX in 15 of its 18 outputs. COMPATIBLE gives the same
  bytes on both (``tests/test_cpus.py``: its GEMM battery and trainings, natively and on emulated
  Intel and AMD CPUs), at about a third of the speed of the CPU's FMA units, hence the lockstep
  engine's own road below.
- ``OPENBLAS_CORETYPE=Haswell`` and ``OPENBLAS_L2_SIZE`` (the lockstep engine's products, on numpy's
  OpenBLAS: :mod:`digitpairs.core.gemm`, which says why). Set only on an x86-64 CPU with AVX2 and FMA,
  where the Haswell kernels run; a value the user's environment sets is overridden. OpenBLAS reads
  them when numpy loads, so :func:`check` refuses a process whose numpy was imported before.
- ``OPENBLAS_NUM_THREADS=1``: one BLAS thread, which each lockstep job sets again
  (:func:`blas_threads`) in case something changed it.
- ``ATEN_CPU_CAPABILITY=avx2`` (reductions, softmax, exp/log, batch-norm statistics, max-pool):
  PyTorch compiles these kernels once per ISA and its DispatchStub uses at most the capability named
  by this variable (read once, at the first dispatched operation).
- oneDNN off (``torch.backends.mkldnn.enabled = False``): oneDNN promises bitwise-equal results only
  on an identical hardware platform and software environment (oneDNN guide, "Primitive Attributes:
  deterministic"); its convolution kernels are generated per CPU. NNPACK off
  (``torch.backends.nnpack.set_flags(False)``): with oneDNN off PyTorch would route the loop engine's
  convolutions to NNPACK, whose Winograd kernels have CPU-specific code and were 36x less accurate
  here (relative error 5e-6 against float64, 1.5e-7 for GEMM). With both off, convolutions take
  PyTorch's im2col + GEMM path, which the MKL pin covers. The lockstep engine never used either.
- ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (CUDA only; harmless elsewhere): required by
  ``torch.use_deterministic_algorithms`` for deterministic cuBLAS (PyTorch "Reproducibility" notes).
  GPU results are not equal to the CPU's, and on an H200 two runs of the largest grid job were not
  bit-identical even with these settings (results/full-grid/earlier-gpu/tuning.json): ``train.device: cuda`` is
  its own setting.

Torch threads are pinned separately (``runner.THREADS_PER_JOB``). The environment variables must be
set before numpy loads and torch runs its first operation, so importing :mod:`digitpairs` sets them
(:func:`pin`; the project's imports put it first) and :func:`check` refuses a process where either
came too early.
``train.numerics: native`` in params.yaml turns the pins off for the stages (:func:`use`): each CPU's
own fastest paths, reproducible on the same machine and libraries only. Outside the stages (benchmarks,
tests) ``DIGITPAIRS_UNPINNED=1`` does the same. Either changes :func:`fingerprint`, so checkpoints never
mix pinned and unpinned trials.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import platform
import sys
import warnings
from functools import cache
from hashlib import sha256
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

ENV_PINS = {
    "MKL_CBWR": "COMPATIBLE",
    "ATEN_CPU_CAPABILITY": "avx2",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}
# numpy's OpenBLAS (core/gemm.py): the Haswell kernels, a fixed L2 size (Haswell's), one thread to start
OPENBLAS_PINS = {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "262144", "OPENBLAS_NUM_THREADS": "1"}
OPENBLAS_CORE = OPENBLAS_PINS["OPENBLAS_CORETYPE"]
PIN_VARS = (*ENV_PINS, *OPENBLAS_PINS)  # every variable the pins set (a fresh shell has none of them)
UNPINNED_ENV = "DIGITPAIRS_UNPINNED"
EXPECTED_CAPABILITY = "AVX2"
# train.numerics: the pins (the same bytes on every x86-64 CPU with AVX2 and FMA), or none of them
MODES = ("portable", "native")
# the lockstep engine's products (digitpairs.core.gemm): numpy's OpenBLAS, or torch.bmm (MKL)
GEMM_ENV = "DIGITPAIRS_GEMM"
BACKENDS = ("openblas", "mkl")


def pinned() -> bool:
    """Whether the pins are on (the default; off only with ``DIGITPAIRS_UNPINNED=1``)."""
    return os.environ.get(UNPINNED_ENV, "") in ("", "0")


@cache
def avx2_fma() -> bool:
    """Whether this is an x86-64 CPU with AVX2 and FMA (Linux's ``/proc/cpuinfo``), where OpenBLAS's
    Haswell kernels run; elsewhere they would stop at their first instruction, so they are not forced."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return False
    return {"avx2", "fma"} <= set(flags)


def backend() -> str:
    """The lockstep engine's products: ``openblas`` (the default when pinned) or ``mkl``, ``torch.bmm``:
    under MKL's pin with ``DIGITPAIRS_GEMM=mkl``, and the default unpinned (MKL's own kernels for this CPU)."""
    default = "openblas" if pinned() else "mkl"
    name = os.environ.get(GEMM_ENV, default) or default
    if name not in BACKENDS:
        raise ValueError(f"{GEMM_ENV}={name!r} is not one of {BACKENDS}; unset it for the default ({default}).")
    return name


def env() -> dict[str, str]:
    """The environment variables a computing process needs (for Ray's runtime_env, subprocesses)."""
    if not pinned():
        return {UNPINNED_ENV: "1"}
    return dict(ENV_PINS) | (OPENBLAS_PINS if avx2_fma() else {})


def pin() -> None:
    """Set the pins in this process's environment (children inherit them), and configure torch as soon
    as it is imported (now, if it already is): a stage that never computes, such as check_params,
    findings or figures, does not pay the two seconds of importing torch.

    Overrides values set from outside: a user's ``ATEN_CPU_CAPABILITY=avx512`` or
    ``OPENBLAS_CORETYPE=SkylakeX`` would otherwise silently give other results than the committed ones.
    """
    os.environ.update(env())
    if "torch" in sys.modules:
        _configure(sys.modules["torch"])
    elif not any(isinstance(f, _TorchImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchImport())


def use(mode: str) -> None:
    """Compute this process and its children in ``mode`` (``train.numerics``): ``portable``, the pins, or
    ``native``, none of them (PyTorch's and MKL's own choices for this CPU). The stages call it before
    numpy loads and torch computes, whatever ``DIGITPAIRS_UNPINNED`` the shell holds: dvc.lock records
    the param, so the param decides. A process that already loaded either library in the other mode is
    refused, since neither can switch its kernels afterwards."""
    if mode not in MODES:
        raise ValueError(f"train.numerics must be one of {', '.join(MODES)}; got {mode!r}.")
    if (mode == MODES[0]) == pinned():
        return
    loaded = [m for m in ("numpy", "torch") if m in sys.modules]
    if loaded:
        raise RuntimeError(
            f"train.numerics: {mode} must be chosen before {' and '.join(loaded)} loads; call "
            "digitpairs.core.numerics.use first thing (as stages/__init__.py does)."
        )
    for var in PIN_VARS:  # pin() set them; native leaves each library its own default
        os.environ.pop(var, None)
    os.environ[UNPINNED_ENV] = "1" if mode == "native" else "0"
    pin()


def child_env(mode: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process that computes in ``mode``: ``base`` (this process's) without
    the pins' variables, which the child sets again on importing digitpairs unless ``native``."""
    drop = {UNPINNED_ENV, *PIN_VARS}
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in drop}
    return env | ({UNPINNED_ENV: "1"} if mode == "native" else {})


def _configure(torch: ModuleType) -> None:
    torch.backends.mkldnn.enabled = not pinned()
    torch.backends.nnpack.set_flags(not pinned())
    check()


class _TorchImport(importlib.abc.MetaPathFinder):
    """Runs :func:`_configure` right after torch's import, whichever module imports it."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> ModuleSpec | None:
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:  # no torch here: the import fails as it would without us
            return None
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            _configure(module)

        spec.loader.exec_module = exec_module
        return spec


def check() -> None:
    """Refuse a process whose torch dispatched, or whose numpy loaded OpenBLAS, before the pins were set
    (it would compute with the CPU's own kernels); warn on a CPU without AVX2 and FMA, where the
    committed results cannot be promised."""
    if not pinned():
        return
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    if platform.machine() in ("x86_64", "AMD64") and cap.startswith("AVX512"):
        raise RuntimeError(
            f"torch already runs with CPU capability {cap}: it computed something before digitpairs set its "
            "numeric pins. Import digitpairs before running any torch operation (or set "
            f"ATEN_CPU_CAPABILITY=avx2 in the environment)."
        )
    core = openblas()["architecture"]
    if avx2_fma() and core != OPENBLAS_CORE:
        raise RuntimeError(
            f"numpy's OpenBLAS runs its {core} kernels, not {OPENBLAS_CORE}'s: numpy was imported before digitpairs "
            f"set OPENBLAS_CORETYPE. Import digitpairs before numpy, pandas or torch (or set "
            f"OPENBLAS_CORETYPE={OPENBLAS_CORE} in the environment)."
        )
    if cap != EXPECTED_CAPABILITY or not avx2_fma():
        warnings.warn(
            f"this CPU offers torch capability {cap}{'' if avx2_fma() else ' and lacks AVX2 or FMA'}: results are "
            "reproducible on this machine but may differ from those computed on x86-64 CPUs with AVX2 and FMA "
            "(the committed dvc.lock).",
            stacklevel=2,
        )


@cache
def openblas() -> dict[str, str]:
    """Version and kernel set (``architecture``) of the OpenBLAS that numpy loaded, as threadpoolctl reads
    them from the library itself; refuses a numpy without its bundled OpenBLAS (another build of numpy)."""
    import numpy
    from threadpoolctl import threadpool_info

    for lib in threadpool_info():
        if lib["internal_api"] == "openblas" and Path(lib["filepath"]).parent.name in ("numpy.libs", ".dylibs"):
            return {"version": lib["version"], "architecture": lib["architecture"]}
    raise RuntimeError(
        f"numpy {numpy.__version__} ({numpy.__file__}) does not use the OpenBLAS of its PyPI wheel, which the "
        "lockstep engine's products rely on: `pip install -r requirements.txt` installs the pinned numpy."
    )


def blas_threads(n: int):
    """A context in which numpy's OpenBLAS uses ``n`` threads (threadpoolctl's documented control)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n, user_api="blas")


@cache
def fingerprint(device: str = "cpu") -> dict[str, str]:
    """What decides the arithmetic besides the code: pins, library versions, the ISA torch dispatches to.

    Part of every checkpoint key, so a resumed run never mixes trials computed under other settings.
    """
    import torch

    libs = [
        line.strip(" -")
        for line in torch.__config__.show().splitlines()
        if "Math Kernel Library" in line or "MKL-DNN" in line
    ]
    import numpy

    out = {
        "pins": json.dumps(env(), sort_keys=True),
        "torch": torch.__version__,
        "gemm": backend(),
        "numpy": numpy.__version__,
        "openblas": json.dumps(openblas(), sort_keys=True),
        "libraries": "; ".join(libs),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": str(torch.backends.mkldnn.enabled),
        "nnpack": str(torch._C._get_nnpack_enabled()),
    }
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cuda"] = str(torch.version.cuda)
        out["cudnn"] = str(torch.backends.cudnn.version())
    return out


def products() -> str:
    """The lockstep engine's product library and kernel set, as provenance files name it."""
    if backend() == "mkl":
        return f"torch.bmm (MKL, {'MKL_CBWR=' + ENV_PINS['MKL_CBWR'] if pinned() else 'unpinned'})"
    return f"OpenBLAS {openblas()['version']} ({openblas()['architecture']} kernels)"


def cpu() -> dict[str, object]:
    """This CPU as a results file records it (Linux's ``/proc/cpuinfo``): vendor, model, family and model
    numbers, AVX-512 or not. Two machines with equal records run the same kernels under the pins."""
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(ln.split(":", 1) for ln in f.read().split("\n\n")[0].splitlines() if ":" in ln)
    except OSError:
        info = {}
    info = {k.strip(): v.strip() for k, v in info.items()}
    return {
        "vendor": info.get("vendor_id", platform.processor() or "unknown"),
        "model": info.get("model name", "unknown"),
        "family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
        "avx512": "avx512f" in info.get("flags", "").split(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


def machine() -> str:
    """The machine a measurement ran on, for provenance files: architecture, usable CPUs, CPU model."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        lines = []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), None)
    return f"{platform.machine()}, {cpus} CPUs, {model or platform.processor() or 'unknown CPU'}"


def digest(device: str = "cpu") -> str:
    """A short hash of :func:`fingerprint`."""
    return sha256(json.dumps(fingerprint(device), sort_keys=True).encode()).hexdigest()[:12]


def deterministic_cuda() -> None:
    """CUDA's documented determinism controls: deterministic algorithms, no TF32, no autotuning.

    Measured on an H200 (results/full-grid/earlier-gpu/tuning.json): a small job repeated bit for bit, the
    largest grid job (100 models of widths 64/64/512) did not, with no warning from PyTorch; the
    cause is not found yet, so GPU runs are reproducible in distribution, not to the bit.

    TF32 is off because it changes the arithmetic, not only the speed; cuDNN autotuning is off
    because it picks kernels by timing. ``warn_only``: an operation without a deterministic CUDA
    kernel warns instead of stopping a long run; whether two runs agree to the bit is a measurement
    (the one above), not something this call can promise.
    """
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
