"""The lockstep engine's products (``digitpairs.core.gemm``): torch's results to float tolerance in every
layout the engine passes, the same bytes whatever the BLAS thread count, and the pinned kernels loaded."""

from __future__ import annotations

from digitpairs.core import gemm, numerics

import pytest
import torch

from tests.cpu_fingerprint import _products


def operands(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g) for s in shapes]


def test_openblas_runs_the_pinned_kernels():
    if not numerics.avx2_fma():
        pytest.skip("no AVX2 and FMA here: OpenBLAS keeps its own choice of kernels")
    assert numerics.openblas()["architecture"] == numerics.OPENBLAS_CORE
    assert numerics.fingerprint()["gemm"] == "openblas"


@pytest.mark.parametrize(
    "layout",
    ["plain", "a transposed", "b transposed", "a strided (copied)", "out transposed"],
)
def test_bmm_matches_torch(layout):
    a, b = operands((3, 50, 40), (3, 40, 30))
    if layout == "a transposed":
        a = a.mT.contiguous().mT
    elif layout == "b transposed":
        b = b.mT.contiguous().mT
    elif layout == "a strided (copied)":
        a = operands((3, 50, 80))[0][:, :, ::2]
    out = torch.empty(3, 30, 50).transpose(1, 2) if layout == "out transposed" else None
    got = gemm.bmm(a, b, out=out)
    assert out is None or got is out
    torch.testing.assert_close(got, torch.bmm(a, b), rtol=1e-5, atol=1e-5)


def test_linear_matches_baddbmm_forward_and_backward():
    bias, h, w = operands((2, 1, 7), (2, 20, 11), (2, 11, 7))
    grads = []
    for fn in (gemm.linear, torch.baddbmm):
        leaves = [t.clone().requires_grad_() for t in (bias, h, w)]
        out = fn(*leaves)
        out.backward(torch.ones_like(out).cumsum(1))
        grads.append([out.detach(), *(t.grad for t in leaves)])
    for ours, torchs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, torchs, rtol=1e-5, atol=1e-5)


def test_same_bytes_on_repeat_for_each_thread_count():
    """The engine's largest products repeat bit for bit at a fixed BLAS thread count. The count itself
    is part of the arithmetic (two threads round some of these products differently from one), which
    is why every job runs with ``runner.THREADS_PER_JOB`` threads and checkpoint keys record it."""
    for threads in (1, 2):
        runs = []
        for _ in range(2):
            with numerics.blas_threads(threads):
                g = torch.Generator().manual_seed(0)
                runs.append([gemm.bmm(a, b).numpy().tobytes() for a, b in _products(g)])
        assert runs[0] == runs[1], threads


def test_mkl_switch(monkeypatch):
    a, b = operands((2, 30, 20), (2, 20, 10))
    monkeypatch.setenv(numerics.GEMM_ENV, "mkl")
    assert torch.equal(gemm.bmm(a, b), torch.bmm(a, b))
    monkeypatch.setenv(numerics.GEMM_ENV, "cublas")
    with pytest.raises(ValueError, match="DIGITPAIRS_GEMM='cublas' is not one of"):
        gemm.bmm(a, b)


def test_a_numerics_mode_is_chosen_before_the_libraries_load():
    numerics.use("portable")  # this process's own mode: nothing to do
    with pytest.raises(RuntimeError, match="train.numerics: native must be chosen before numpy and torch loads"):
        numerics.use("native")
    with pytest.raises(ValueError, match="train.numerics must be one of portable, native; got 'fast'"):
        numerics.use("fast")
    shell = {"PATH": "/bin", "MKL_CBWR": "AVX2", numerics.UNPINNED_ENV: "1"}
    assert numerics.child_env("native", shell) == {"PATH": "/bin", numerics.UNPINNED_ENV: "1"}
    assert numerics.child_env("portable", shell) == {"PATH": "/bin"}  # the child pins itself
