"""The lockstep engine's matrix products, on the same kernels on every x86-64 CPU with AVX2 and FMA.

Every product the lockstep engine's training and evaluation make on the CPU (conv1's four per
pooling member, each linear layer's forward and both backward products) goes through :func:`bmm`,
which hands the tensors' own memory (no copy) to ``numpy.matmul``, that is to the OpenBLAS that
numpy's wheel bundles (numpy and with it that OpenBLAS build are pinned in ``requirements.txt``).

Why these bytes are the same on every such CPU: OpenBLAS is built with ``DYNAMIC_ARCH`` and picks a
kernel set per CPU at load time; ``OPENBLAS_CORETYPE=Haswell`` (its documented override, set by
:func:`digitpairs.core.numerics.pin` before numpy loads) makes it take the Haswell set (AVX2 + FMA)
on every CPU, Intel or AMD, AVX2 or AVX-512. A Haswell kernel's blocking comes from that core type's
compile-time parameters, and ``OPENBLAS_L2_SIZE`` is fixed as well, so nothing else about the CPU
enters the arithmetic. That promise is the library's for the kernel choice; that the blocking then
gives equal bytes everywhere is measured (``tests/test_cpus.py``: natively and on emulated Intel and
AMD CPUs), not documented. The thread count is part of the arithmetic (two threads round some of the
engine's products differently from one: ``tests/test_gemm.py``), so the products always run on one
BLAS thread (:func:`digitpairs.core.numerics.blas_threads`), whatever torch's count: a job's results
then do not depend on OpenBLAS's threading at all, and jobs run side by side for parallelism. (With
two torch threads, two OpenBLAS threads also made a job two to three times slower than one: the two
thread pools' waiting threads compete for the same cores.)

On the machine these results were built on, these kernels run the study's products about three
times as fast as MKL's SSE2 branch, which ``MKL_CBWR=COMPATIBLE`` imposes on every MKL GEMM for the
same portability (``benchmarks/numerics.py``). ``DIGITPAIRS_GEMM=mkl`` sends the products back to
``torch.bmm`` under that pin, for measuring the difference; it changes the checkpoint keys
(:func:`digitpairs.core.numerics.fingerprint`). Unpinned (``train.numerics: native``) the products are
``torch.bmm``'s, MKL's own fastest path for the CPU (:func:`digitpairs.core.numerics.backend` decides).
CUDA tensors always use torch.
"""

from __future__ import annotations

from digitpairs.core.numerics import backend

import numpy as np
import torch


def _blasable(t: torch.Tensor) -> bool:
    """Whether BLAS reads the last two dimensions as they are stored (row- or column-major, no gaps
    inside a row), as numpy checks before calling it; otherwise numpy would use its own slower loop."""
    (r, c), (sr, sc) = t.shape[-2:], t.stride()[-2:]
    return (sc == 1 and sr >= max(c, 1)) or (sr == 1 and sc >= max(r, 1))


def _array(t: torch.Tensor) -> np.ndarray:
    return (t if _blasable(t) else t.contiguous()).detach().numpy()


def bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` for ``[K, m, k] @ [K, k, n]`` (any strides), into ``out`` if given (row-major, or the
    transpose of a row-major tensor, as ``lockstep_kernels._maps`` makes)."""
    if a.device.type != "cpu" or backend() == "mkl":
        return torch.bmm(a, b, out=out)
    if out is None:
        out = a.new_empty(a.shape[0], a.shape[1], b.shape[2])
    with np.errstate(all="ignore"):  # a diverging trial's inf and nan, which torch passes on silently
        if out.stride(-1) != 1:  # a transposed row-major buffer: compute its transpose, b^T a^T
            np.matmul(_array(b.mT), _array(a.mT), out=out.mT.detach().numpy())
        else:
            np.matmul(_array(a), _array(b), out=out.detach().numpy())
    return out


class Linear(torch.autograd.Function):
    """``bias + h @ weight`` for ``h [K, B, fan_in]``, ``weight [K, fan_in, fan_out]``, ``bias [K, 1,
    fan_out]``: ``torch.baddbmm``'s result, with both backward products through :func:`bmm` too."""

    @staticmethod
    def forward(ctx, bias: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        return bmm(h, weight).add_(bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        h, weight = ctx.saved_tensors
        grad_bias = grad.sum(1, keepdim=True)
        grad_h = bmm(grad, weight.mT) if ctx.needs_input_grad[1] else None
        return grad_bias, grad_h, bmm(h.mT, grad)


def linear(bias: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``bias + h @ weight`` per model (see :class:`Linear`); evaluation without autograd's records."""
    if h.device.type != "cpu" or backend() == "mkl":
        return torch.baddbmm(bias, h, weight)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return Linear.apply(bias, h, weight)
    return bmm(h, weight).add_(bias)
