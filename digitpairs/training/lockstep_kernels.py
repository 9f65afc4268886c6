"""The lockstep engine's kernels: conv1 + max-pool + ReLU, and batch norm, over K stacked models, with
hand-written backwards.

conv1 reads an im2col (:func:`im2col`) whose rows keep the four members of every 2x2 pooling
window in four blocks, so max-pool is a running elementwise maximum of four matmul outputs and the
pooled maps come out in the layout the next layers read; conv1 + pool + ReLU and batch norm have
hand-written backwards (:class:`ConvPoolReLU`, :class:`BatchNorm`) that touch each map a few
times instead of through autograd's chain of intermediates. ``tests/test_lockstep.py`` holds each,
forward and backward, to what ``conv2d`` -> ``max_pool2d`` -> ReLU and ``batch_norm`` compute per
model (ties of the pooling included); the stacked models that call them are in :mod:`.lockstep_models`.
"""

from __future__ import annotations

from functools import cache

from digitpairs.core.gemm import bmm

import torch

EPS, MOMENTUM = 1e-5, 0.1  # nn.BatchNorm's defaults


@cache
def _im2col_index(channels: int, device: torch.device) -> torch.Tensor:
    """For each column of :func:`im2col`'s rows, the pixel it reads (an index into ``[14 * 14 * C]``)."""
    c = channels
    pixel = torch.arange(196 * c).view(14, 14, c)
    s0, s1, s2 = pixel.stride()
    windows = pixel.as_strided((2, 2, 6, 6, 3, 3, c), (s0, s1, 2 * s0, 2 * s1, s0, s1, s2))
    return windows.reshape(-1).to(device)


def im2col(img: torch.Tensor) -> torch.Tensor:
    """conv1's 3x3 windows of channels-last images ``[N, 14, 14, C]`` -> ``[N, 4 * 36 * 9 * C]``.

    Per image the rows are ordered ``(q, p)`` and each row's columns ``(kh, kw, c)``: row ``(q, p)``
    is the window of conv1's output position ``(2 * pi + di, 2 * pj + dj)``, where ``p = 6 * pi + pj``
    is the position on the pooled 6x6 map and ``q = 2 * di + dj`` the member of its 2x2 max-pool
    window. So the four members of every pooling window sit in four separate blocks of 36 rows, and
    pooling is an elementwise maximum of blocks (:class:`ConvPoolReLU`); :func:`conv1_cols` gathers
    a mini-batch's rows from this table. One ``index_select`` of a precomputed pixel index: five
    times faster than copying a strided window view, whose innermost run is a few floats.
    """
    n, c = img.shape[0], img.shape[3]
    return img.reshape(n, 196 * c).index_select(1, _im2col_index(c, img.device))


def conv1_cols(table: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Rows of :func:`im2col`'s ``table`` ``[N, 4 * 36 * 9 * C]`` for images ``[K, b]`` (indices into
    ``table``) -> conv1's input ``[K, 4 * b * 36, 9 * C]``, rows ordered ``(q, image, p)``: the pooling
    window member outermost, so conv1's output ``[K, 4, b * 36, nbch1]`` pools into ``[K, b * 36, nbch1]``
    with rows ``(image, p)``, the layout the next layers read."""
    k, b = images.shape
    tap = table.shape[1] // 4
    q = torch.arange(4, device=images.device).view(1, 4, 1)
    rows = (images.unsqueeze(1) * 4 + q).reshape(-1)  # [K, 4, b]
    return table.view(-1, tap).index_select(0, rows).view(k, 4 * b * 36, tap // 36)


def _maps(k: int, rows: int, channels: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised ``[K, rows, channels]`` tensor for conv1's per-member output. Below 16
    channels it is stored channels-first (a transposed view): MKL's matmul into 8 output columns is
    four times slower than into the transposed 8-row result, with the same arithmetic per element."""
    if channels < 16:
        return like.new_empty(k, channels, rows).transpose(1, 2)
    return like.new_empty(k, rows, channels)


class ConvPoolReLU(torch.autograd.Function):
    """``relu(maxpool2x2(conv1(x)) + bias)`` for im2col rows ``cols`` ``[K, 4 * R, 9C]`` in
    :func:`conv1_cols`' order and weights ``[K, 9C, n]`` -> ``[K, R, n]``.

    conv1 runs as four matmuls, one per pooling-window member ``q``, each into the same buffer of a
    quarter of the full output, which stays in cache while it is folded into the running maximum
    (twice as fast as one matmul into a tensor four times larger, which also leaves the cache). The
    bias is added after pooling: rounding is monotonic, so ``max(a_i + b) == max(a_i) + b`` exactly.
    ``d_q = z_q - max(z_0..z_q-1)`` is positive exactly when member q beats the earlier ones (a
    float difference is zero only for equal floats), so the last such q is the first maximum, the
    member ``max_pool2d`` picks; the backward routes each gradient to it with
    ``threshold_backward`` (vectorised, unlike ``where`` on a boolean mask here).
    """

    @staticmethod
    def forward(ctx, cols: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        k, n = cols.shape[0], weight.shape[2]
        cq = cols.view(k, 4, -1, cols.shape[2])
        m, z = _maps(k, cq.shape[2], n, cols), _maps(k, cq.shape[2], n, cols)
        bmm(cq[:, 0], weight, out=m)
        diffs = []
        for q in (1, 2, 3):
            bmm(cq[:, q], weight, out=z)
            diffs.append(z - m)
            torch.maximum(m, z, out=m)
        h = m.add_(bias).clamp_min_(0)
        ctx.save_for_backward(cols, weight, h, *diffs)
        return h.contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        cols, weight, h, *diffs = ctx.saved_tensors
        k = cols.shape[0]
        cq = cols.view(k, 4, -1, cols.shape[2])
        if not h.is_contiguous():  # channels-first maps: compute in their layout
            grad = grad.transpose(1, 2).contiguous().transpose(1, 2)
        g = torch.ops.aten.threshold_backward(grad, h, 0)  # ReLU
        grad_bias = g.sum(1, keepdim=True)
        # the last q with d_q > 0 won; what remains of g after q = 3, 2, 1 took theirs is member 0's
        grad_w = None
        for q in (3, 2, 1, 0):
            if q:
                d = diffs[q - 1]
                mine = torch.ops.aten.threshold_backward.grad_input(g, d, 0, grad_input=d)  # the graph runs once
            else:
                mine = g
            if h.is_contiguous():
                part = (cq[:, q].transpose(1, 2), mine)  # [K, 9C, n]
            else:
                part = (mine.transpose(1, 2), cq[:, q])  # [K, n, 9C]: the fast product for few channels
            grad_w = bmm(*part) if grad_w is None else grad_w.add_(bmm(*part))
            if q:
                g.sub_(mine)  # exact: mine is g or 0 in each element
        if not h.is_contiguous():
            grad_w = grad_w.transpose(1, 2)
        return None, grad_w.contiguous(), grad_bias


def conv_pool_relu(cols: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:class:`ConvPoolReLU`'s forward without what the backward needs (evaluation)."""
    k, n = cols.shape[0], weight.shape[2]
    cq = cols.view(k, 4, -1, cols.shape[2])
    m, z = _maps(k, cq.shape[2], n, cols), _maps(k, cq.shape[2], n, cols)
    bmm(cq[:, 0], weight, out=m)
    for q in (1, 2, 3):
        torch.maximum(m, bmm(cq[:, q], weight, out=z), out=m)
    return m.add_(bias).clamp_min_(0).contiguous()


class BatchNorm(torch.autograd.Function):
    """Training-mode batch norm over dim 1 of ``[K, R, n]`` with affine ``weight``, ``bias`` ``[K, 1, n]``;
    returns the output and the batch's mean and biased variance (for the running statistics).

    Statistics in two passes of plain sums (``var_mean`` over a middle dimension is several times
    slower here), and the textbook backward in five passes over the input.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        r = h.shape[1]
        mean = h.sum(1, keepdim=True).div_(r)
        xc = h - mean
        var = (xc * xc).sum(1, keepdim=True).div_(r)
        rstd = (var + EPS).rsqrt_()
        scale = rstd * weight
        ctx.save_for_backward(xc, rstd, scale)
        ctx.mark_non_differentiable(mean, var)
        return torch.addcmul(bias, xc, scale), mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor, _mean, _var):
        xc, rstd, scale = ctx.saved_tensors
        r = xc.shape[1]
        grad_bias = grad.sum(1, keepdim=True)
        grad_weight = (grad * xc).sum(1, keepdim=True).mul_(rstd)  # sum of grad * xhat
        # d/dh = scale * (grad - mean(grad) - xhat * mean(grad * xhat))
        grad_h = torch.addcmul(-scale * grad_bias / r, xc, -scale * rstd * grad_weight / r).addcmul_(grad, scale)
        return grad_h, grad_weight, grad_bias
