"""Lockstep engine: train K same-shape models as one batched computation.

A per-model loop spends most of each tiny step in Python and dispatch overhead. Here every layer
of K independent models is one stacked tensor ``[K, ...]`` and every layer is one batched matmul
(:mod:`digitpairs.core.gemm`: on the CPU, OpenBLAS's Haswell kernels on every CPU with AVX2 and FMA), so
a step of K models costs little more than a step of one. The models stay
independent: the sum of the K losses has, for each model's parameters, exactly that model's
gradient, so one backward and one fused SGD update (per-model lr broadcast) train all of them.

Internal layouts differ from ``nn.Module``'s where that saves copies (feature maps are kept
channels-last, ``(position, channel)``); :func:`_layout` maps each state-dict tensor to its
stacked form and back, so outcomes carry ordinary state dicts that ``build_model`` accepts.

conv1 reads an im2col (:func:`im2col`) whose rows keep the four members of every 2x2 pooling
window in four blocks, so max-pool is a running elementwise maximum of four matmul outputs and the
pooled maps come out in the layout the next layers read; conv1 + pool + ReLU and batch norm have
hand-written backwards (:class:`_ConvPoolReLU`, :class:`_BatchNorm`) that touch each map a few
times instead of through autograd's chain of intermediates.

On CPU a job is further cut into chunks whose activations stay cache- and allocator-friendly
(:data:`CPU_ACTIVATION_BYTES`); on CUDA the whole job is one computation, so pass a large batch.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import replace
from functools import cache
from itertools import groupby

from digitpairs.core import numerics
from digitpairs.core.gemm import bmm, linear
from digitpairs.data.pairs import Draw, split
from digitpairs.training.models import build_model, weight_names
from digitpairs.training.train import (
    TrainResult,
    augment,
    augmentation,
    average_posteriors,
    check_hparams,
    dropout_mask,
    epoch_order,
    fraction,
    lr_factor,
    shifted_views,
    siamese_scores,
)
from digitpairs.training.trials import Outcome, Trial

import torch
import torch.nn.functional as F

EPS, MOMENTUM = 1e-5, 0.1  # nn.BatchNorm's defaults
# pairs per evaluation forward: bounds memory, results do not depend on it; on CPU, 100 keeps a
# forward's maps in cache (250 was 3-10% slower at the largest widths)
EVAL_CHUNK = 100
# CPU: bound on K * (conv1's four unpooled maps of one step), which sets K per chunk (13 pair or 6
# siamese models at widths 64). Measured on a 2-core machine, 12 trainings at widths 64: with one
# thread, time per model-step flat from K = 1 to 12 (within 10%); with two, pair K = 12 was 12-15%
# faster than K = 9 (fewer chunks, larger batched matmuls), siamese K = 4 and 6 equal.
CPU_ACTIVATION_BYTES = 48 << 20
# CUDA: every job whose step is graphable (run_lockstep) captures it as a CUDA graph after this many
# eager steps (see _GraphedStep); DIGITPAIRS_CUDA_GRAPHS=0 turns that off (in worker processes too).
CUDA_GRAPHS = os.environ.get("DIGITPAIRS_CUDA_GRAPHS", "1") != "0"
GRAPH_WARMUP = 3
# CUDA: the splits of the last few (draws, split, architecture) a process used, kept on the device so
# the next jobs of the same draws copy nothing from the host (see _Split); none are kept for the CPU
DEVICE_SPLITS: dict[tuple, tuple] = {}
DEVICE_SPLITS_KEPT = 6


@cache
def _tune_cpu_allocator() -> None:
    """Let glibc keep freed blocks for reuse instead of returning them to the OS: a step allocates the
    same large tensors every time, and fresh pages cost a page fault each (a third of the run time was
    system time without this). Blocks over 32 MiB (glibc's largest mmap threshold), such as the im2col
    tables of four draws, come from the heap too instead of a fresh mmap each time (an im2col of 8000
    digits: 29 ms with 10,000 page faults, 8 ms without). Process-wide and harmless; a no-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (glibc's maximum)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap for large blocks (glibc still falls back to it if needed)
    except (OSError, AttributeError):
        pass


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
    pooling is an elementwise maximum of blocks (:class:`_ConvPoolReLU`); :func:`conv1_cols` gathers
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


class _ConvPoolReLU(torch.autograd.Function):
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


def _conv_pool_relu(cols: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:class:`_ConvPoolReLU`'s forward without what the backward needs (evaluation)."""
    k, n = cols.shape[0], weight.shape[2]
    cq = cols.view(k, 4, -1, cols.shape[2])
    m, z = _maps(k, cq.shape[2], n, cols), _maps(k, cq.shape[2], n, cols)
    bmm(cq[:, 0], weight, out=m)
    for q in (1, 2, 3):
        torch.maximum(m, bmm(cq[:, q], weight, out=z), out=m)
    return m.add_(bias).clamp_min_(0).contiguous()


class _BatchNorm(torch.autograd.Function):
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


class _GraphedStep:
    """CUDA: one SGD step of all K models captured once as a CUDA graph, then replayed.

    Eagerly, a step is some 200 small kernel launches, which leave the GPU waiting on Python at small
    widths; a replay is one launch. The first :data:`GRAPH_WARMUP` calls run eagerly on a side stream
    (CUDA's rule before a capture; they are real training steps), the next captures the step reading
    its mini-batch rows from a fixed buffer, and every call replays it. The same kernels run in the
    same order: on an H200 a small job gave the eager engine's bytes exactly, and the largest grid
    job, which is GPU-bound, ran 6% faster (results/full-grid/tuning.json).
    """

    def __init__(self, step, k: int, bs: int, dev: torch.device) -> None:
        self.step, self.calls, self.graph = step, 0, None
        self.rows = torch.zeros(k, bs, dtype=torch.long, device=dev)
        self.loss = torch.zeros(k, device=dev)

    def __call__(self, rows: torch.Tensor, loss_acc: torch.Tensor) -> None:
        self.rows.copy_(rows)
        if self.graph is None and self.calls < GRAPH_WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(self.rows, loss_acc)
            torch.cuda.current_stream().wait_stream(side)
            self.calls += 1
            return
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records the kernels; runs nothing
                self.step(self.rows, self.loss)
        self.loss.zero_()
        self.graph.replay()
        loss_acc += self.loss  # 0 + x is exact: the same sums as the eager step's


def _shape_key(t: Trial) -> tuple:
    """Trials with equal keys can share one lockstep job: the same layers and the same training
    except for lr and loss weights, which are per-model tensors."""
    return (t.model, replace(t.train, lr=0.0, w2=0.0, w10=0.0))


def group_trials(trials: list[Trial], batch: int) -> list[list[Trial]]:
    """Group trials that differ only in lr, loss weights, draw and seed into chunks of <= ``batch``.

    Groups appear in order of their first trial and keep the trials' order inside, so the jobs
    depend only on the input list (deterministic across runs and machines).
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch!r}.")
    first: dict[tuple, int] = {}
    for i, t in enumerate(trials):
        first.setdefault(_shape_key(t), i)
    ordered = sorted(trials, key=lambda t: first[_shape_key(t)])  # stable: keeps order within a group
    jobs = []
    for _, members in groupby(ordered, key=_shape_key):
        members = list(members)
        jobs += [members[i : i + batch] for i in range(0, len(members), batch)]
    return jobs


def _layout(name: str, shape: torch.Size, in_ch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(view, perm)``: a module tensor ``t`` is stored as ``t.reshape(view).permute(perm)``, flattened
    to 2-D ``[fan_in, fan_out]`` for weights and ``[1, n]`` for vectors.

    Inputs are kept ``(pixel, channel)``, the 6x6 map ``(position, channel)``: conv1, skip1, conv2
    and skip2 are permuted to match, so no feature map is ever transposed during training.
    """
    layer = name.rsplit(".", 2)[-2]
    if len(shape) == 1:
        if layer == "skip1":
            return (shape[0] // 36, 36), (1, 0)
        return (shape[0],), (0,)
    if layer == "conv1":
        return (shape[0], in_ch, 9), (2, 1, 0)
    if layer == "skip1":
        return (shape[0] // 36, 36, in_ch, 196), (3, 2, 1, 0)
    if layer == "conv2":
        return (shape[0], shape[1], 36), (2, 1, 0)
    if layer == "skip2":
        return (shape[0], in_ch, 196), (2, 1, 0)
    return tuple(shape), (1, 0)  # nn.Linear [out, in] -> [in, out]


def _to_stacked(tensors: list[torch.Tensor], name: str, in_ch: int) -> torch.Tensor:
    """K module tensors -> one stacked internal tensor ``[K, fan_in or 1, fan_out]``."""
    view, perm = _layout(name, tensors[0].shape, in_ch)
    shape = tensors[0].shape
    rows = 1 if len(shape) == 1 else shape.numel() // shape[0]  # fan-in, whatever the permutation
    return torch.stack([t.reshape(view).permute(perm).reshape(rows, -1) for t in tensors])


def _from_stacked(stacked: torch.Tensor, k: int, name: str, shape: torch.Size, in_ch: int) -> torch.Tensor:
    """Model ``k``'s module tensor of ``name`` back from its stacked internal form."""
    view, perm = _layout(name, shape, in_ch)
    inverse = [perm.index(i) for i in range(len(perm))]
    return stacked[k].reshape([view[p] for p in perm]).permute(inverse).reshape(shape)


class _Stack:
    """K models' parameters and batch-norm statistics as stacked tensors, with a batched forward."""

    def __init__(self, job: list[Trial], device: torch.device) -> None:
        cfg = job[0].model
        self.cfg, self.arch = cfg, cfg.arch
        self.in_ch = 2 if cfg.arch == "pair" else 1
        self.models = [build_model(t.model, t.init_generator()) for t in job]
        states = [m.state_dict() for m in self.models]
        self.names = list(states[0])
        self.weight_names = weight_names(self.models[0])
        self.t: dict[str, torch.Tensor] = {}
        for name in self.names:
            if name.endswith("num_batches_tracked"):
                self.t[name] = states[0][name].clone().to(device)  # all models step together
                continue
            stacked = _to_stacked([s[name] for s in states], name, self.in_ch).to(device)
            is_param = not name.endswith(("running_mean", "running_var"))
            self.t[name] = stacked.requires_grad_(is_param)
        self.params = [self.t[n] for n, _ in self.models[0].named_parameters()]
        self.counters = [self.t[n] for n in self.names if n.endswith("num_batches_tracked")]
        self.weights = [self.t[n] for n in self.weight_names]

    def state(self, k: int) -> dict[str, torch.Tensor]:
        """Model ``k``'s state dict on the CPU, keys and shapes exactly those of ``build_model``'s."""
        ref = self.models[k].state_dict()
        out = {}
        for name in self.names:
            t = self.t[name].detach()
            if not name.endswith("num_batches_tracked"):
                t = _from_stacked(t, k, name, ref[name].shape, self.in_ch)
            out[name] = t.cpu().clone()
        return out

    def _linear(self, h: torch.Tensor, layer: str) -> torch.Tensor:
        return linear(self.t[f"{layer}.bias"], h, self.t[f"{layer}.weight"])

    def _bn(self, h: torch.Tensor, layer: str, training: bool) -> torch.Tensor:
        """Batch norm over dim 1 of ``[K, rows, channels]``, per model, like nn.BatchNorm in train/eval."""
        rm, rv = self.t[f"{layer}.running_mean"], self.t[f"{layer}.running_var"]
        weight, bias = self.t[f"{layer}.weight"], self.t[f"{layer}.bias"]
        if not training:
            scale = torch.rsqrt(rv + EPS) * weight
            out = None if torch.is_grad_enabled() else h  # evaluation: in place
            return torch.addcmul(bias - rm * scale, h, scale, out=out)
        out, mean, var = _BatchNorm.apply(h, weight, bias)
        with torch.no_grad():
            n = h.shape[1]
            rm.lerp_(mean, MOMENTUM)
            rv.lerp_(var * (n / max(n - 1, 1)), MOMENTUM)
        return out

    def branch(
        self, cols: torch.Tensor, flat: torch.Tensor, training: bool, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``cols``: conv1's im2col ``[K, 4 * B * 36, 9 * C]`` (:func:`conv1_cols`), ``flat``:
        ``[K, B, 196 * C]`` images -> ``[K, B, n_out]``; ``mask`` ``[K, B, nbfch]``: dropout's multiplier."""
        k, b = flat.shape[:2]
        nb1, p = self.cfg.nbch1, "branch."
        grad = torch.is_grad_enabled()
        conv = _ConvPoolReLU.apply if grad else _conv_pool_relu
        h = conv(cols, self.t[p + "conv1.weight"], self.t[p + "conv1.bias"])  # [K, B * 36, nb1]
        if self.cfg.batch_norm:
            h = self._bn(h, p + "bn1", training)
        h = h.view(k, b, 36 * nb1)

        def relu(x: torch.Tensor) -> torch.Tensor:  # x: a fresh matmul output, whose backward keeps no copy of it
            return F.relu(x, inplace=True)

        def add_skip(h: torch.Tensor, layer: str) -> torch.Tensor:  # h + relu(skip(flat)), in place when evaluating
            skip = relu(self._linear(flat, p + layer))
            return h + skip if grad else skip.add_(h)

        if self.cfg.skip_connections:
            h = add_skip(h, "skip1")
        h = relu(self._linear(h, p + "conv2"))
        if self.cfg.batch_norm:
            h = self._bn(h, p + "bn2", training)
        if self.cfg.skip_connections:
            h = add_skip(h, "skip2")
        h = relu(self._linear(h, p + "fc1"))
        if self.cfg.batch_norm:
            h = self._bn(h, p + "bn3", training)
        if mask is not None:  # dropout on the classifier's input
            h = h * mask
        return self._linear(h, p + "fc2")

    def forward(self, cols: torch.Tensor, flat: torch.Tensor, training: bool, mask: torch.Tensor | None = None):
        """A mini-batch from :meth:`_Split.take` -> pair logits ``[K, n, 2]``, or siamese comparison and
        digit logits ``([K, n, 2], [K, n, 2, 10])``.

        Siamese: the branch sees the 2n digits of the mini-batch as one batch (digit 1 of pair i at
        row 2i, digit 2 at row 2i+1), exactly as ``SiameseNet.forward``, so BN statistics match.
        """
        relu_logits = self.cfg.relu_logits
        if self.arch == "pair":
            out = self.branch(cols, flat, training, mask)
            return F.relu(out) if relu_logits else out
        k, n = flat.shape[0], flat.shape[1] // 2
        digits = self.branch(cols, flat, training, mask).view(k, n, 2, 10)
        if relu_logits:
            digits = F.relu(digits)
        out = self._linear(digits.reshape(k, n, 20), "compare")
        return (F.relu(out) if relu_logits else out), digits


class _Split:
    """One split of every draw in a job, laid out for :meth:`_Stack.forward`.

    Each draw is stored once (models that share a draw share it), channels-last: pair images
    ``(row, col, digit)``, siamese the pair's two digits one after the other. A step gathers its
    mini-batch rows of images and of conv1's im2col, precomputed.
    """

    def __init__(self, job: list[Trial], draws: dict[int, Draw], name: str, device: torch.device) -> None:
        ids = sorted({t.draw for t in job})
        self.digits = 1 if job[0].model.arch == "pair" else 2
        self.channels = 3 - self.digits
        # the same draw objects (the runner loads each draw once per process), split and layout: on CUDA,
        # the tensors an earlier job left on the device (the entry holds the draws, so no id is reused)
        key = (tuple(id(draws[d]) for d in ids), name, self.digits, str(device))
        if device.type == "cuda" and key in DEVICE_SPLITS:
            self.n, self.cols, self.images, self.target, self.classes, _ = DEVICE_SPLITS[key]
        else:
            parts = [split(draws[d], name) for d in ids]
            sizes = {len(p[0]) for p in parts}
            if len(sizes) != 1:
                raise ValueError(f"lockstep needs draws of equal size; {name} splits have sizes {sorted(sizes)}.")
            self.n = sizes.pop()
            x = torch.cat([p[0] for p in parts])  # [D * n, 2, 14, 14]
            x = x.permute(0, 2, 3, 1) if self.digits == 1 else x.unsqueeze(-1)
            # im2col once per draw (the data never change): a step then copies whole rows, which is
            # several times faster than building the strided windows of every mini-batch again
            self.cols = im2col(x.reshape(-1, 14, 14, self.channels)).to(device)  # one row per digit image
            self.images = x.reshape(len(x), -1).contiguous().to(device)
            self.target = torch.cat([p[1] for p in parts]).to(device)
            self.classes = torch.cat([p[2] for p in parts]).to(device)
            if device.type == "cuda":
                while len(DEVICE_SPLITS) >= DEVICE_SPLITS_KEPT:
                    DEVICE_SPLITS.pop(next(iter(DEVICE_SPLITS)))  # the oldest
                kept = (self.n, self.cols, self.images, self.target, self.classes, [draws[d] for d in ids])
                DEVICE_SPLITS[key] = kept
        self.offset = torch.tensor([ids.index(t.draw) * self.n for t in job], device=device).view(-1, 1)

    def take(
        self,
        rows: torch.Tensor,
        offsets: torch.Tensor | None = None,
        fields: torch.Tensor | None = None,
        corners: torch.Tensor | None = None,
        cutout: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``[K, b]`` (already offset per model) -> ``cols, flat, target, classes`` of the mini-batch:
        conv1's im2col ``[K, 4 * b' * 36, 9 * C]`` (:func:`conv1_cols`) and images ``[K, b', 196 * C]``,
        where b' = b digit images (siamese: 2b, digit 1 of pair i at image 2i, digit 2 at 2i+1).
        ``offsets [K, b, 2, 2]``, ``fields [K, b, 2, 2, 14, 14]`` and ``corners [K, b, 2, 2]`` shift,
        distort and cut out every digit image (``augment``, the loop engine's augmentation), and
        im2col is then computed afresh."""
        k, b = rows.shape
        c, d = self.channels, self.digits
        if offsets is None and fields is None and corners is None:
            images = rows.unsqueeze(2) * d + torch.arange(d, device=rows.device) if d > 1 else rows.unsqueeze(2)
            cols = conv1_cols(self.cols, images.view(k, b * d))
            flat = self.images.index_select(0, rows.reshape(-1)).view(k, b * d, 196 * c)
            return cols, flat, self.target[rows], self.classes[rows]
        img = self.images.index_select(0, rows.reshape(-1))  # [K * b, 392], channels-last
        planes = img.view(-1, 14, 14, 2).permute(0, 3, 1, 2) if d == 1 else img.view(-1, 2, 14, 14)
        draws = [a.reshape(-1, *a.shape[3:]) if a is not None else None for a in (offsets, fields, corners)]
        planes = augment(planes.reshape(-1, 14, 14), *draws, cutout).view(-1, 2, 14, 14)
        img = planes.permute(0, 2, 3, 1) if d == 1 else planes.unsqueeze(-1)
        img = img.reshape(-1, 14, 14, c)  # digit images in (model, pair, digit) order
        cols = conv1_cols(im2col(img), torch.arange(k * b * d, device=img.device).view(k, b * d))
        return cols, img.reshape(k, b * d, 196 * c), self.target[rows], self.classes[rows]


def _losses(
    stack: _Stack, out, t: torch.Tensor, c: torch.Tensor, w2: torch.Tensor, w10: torch.Tensor, smoothing: float
):
    """Per-model losses ``[K]``, each exactly ``loss_fn`` of that model's mini-batch."""
    if stack.arch == "pair":
        k, b = out.shape[:2]
        ce = F.cross_entropy(out.reshape(k * b, 2), t.reshape(-1), reduction="none", label_smoothing=smoothing)
        return ce.view(k, b).mean(1)
    cmp, digits = out
    k, b = cmp.shape[:2]
    ce2 = F.cross_entropy(cmp.reshape(k * b, 2), t.reshape(-1), reduction="none", label_smoothing=smoothing)
    ce10 = F.cross_entropy(digits.reshape(-1, 10), c.reshape(-1), reduction="none", label_smoothing=smoothing)
    return w2 * ce2.view(k, b).mean(1) + w10 * (ce10.view(k, -1).sum(1) / b)


def run_lockstep(
    job: list[Trial], draws: dict[int, Draw], device: str = "cpu", record_grad_norms: bool = False
) -> list[Outcome]:
    """Train the trials of ``job`` together; one :class:`Outcome` per trial, as ``run_trial`` gives.

    Each model keeps its own initial weights, data draw, shuffle order, lr, loss weights and
    batch-norm statistics; only the arithmetic is shared. On the CPU the job runs in chunks of
    :data:`CPU_ACTIVATION_BYTES` (results do not depend on the split: the models are independent),
    its products on one BLAS thread whatever torch's count (:mod:`digitpairs.core.gemm`).
    """
    if not job:
        return []
    ref = job[0]
    if any(_shape_key(t) != _shape_key(ref) for t in job):
        raise ValueError(
            "a lockstep job needs trials of one model config and training settings but lr and loss weights."
        )
    dev = torch.device(device)
    if dev.type != "cpu":
        return _run(job, draws, dev, record_grad_norms)
    _tune_cpu_allocator()
    images = ref.train.batch_size * (1 if ref.model.arch == "pair" else 2)
    k_cpu = max(1, CPU_ACTIVATION_BYTES // (images * 144 * ref.model.nbch1 * 4))
    with numerics.blas_threads(1):
        return [o for i in range(0, len(job), k_cpu) for o in _run(job[i : i + k_cpu], draws, dev, record_grad_norms)]


def _run(job: list[Trial], draws: dict[int, Draw], dev: torch.device, record_grad_norms: bool) -> list[Outcome]:
    """:func:`run_lockstep` for one chunk: train, then score the validation and test pairs."""
    data = _Split(job, draws, "train", dev)
    for t in job:
        check_hparams(t.model.arch, t.train, data.n)
    stack = _Stack(job, dev)
    tc = job[0].train
    steps = tc.epochs * -(-data.n // int(tc.batch_size))
    norms = torch.zeros(steps, len(job), len(stack.weights), device=dev) if record_grad_norms else None
    epoch_loss = _train(_SGDStep(stack, data, job, dev), data, job, dev, norms)
    scores = [{} for _ in job]
    for name in ("val", "test"):
        for i, s in enumerate(_evaluate(stack, job, draws, name, dev)):
            scores[i][name] = s
    norms = norms.cpu() if norms is not None else None
    return [
        Outcome(
            trial,
            scores[i],
            TrainResult(
                epoch_loss[:, i].tolist(),
                list(stack.weight_names) if norms is not None else [],
                norms[:, i].contiguous() if norms is not None else None,
            ),
            stack.state(i),
        )
        for i, trial in enumerate(job)
    ]


class _SGDStep:
    """One mini-batch for all K models: forward, backward, SGD update; adds the losses to ``loss_acc``.

    The update is ``torch.optim.SGD``'s (weight decay, then momentum, Nesterov or not), each model
    with its own lr times the schedule's ``factor``; the study's plain SGD skips the extra terms."""

    def __init__(self, stack: _Stack, data: _Split, job: list[Trial], dev: torch.device) -> None:
        self.stack, self.data, self.tc = stack, data, job[0].train
        lr = torch.tensor([t.train.lr for t in job], device=dev)
        self.w2 = torch.tensor([t.train.w2 for t in job], device=dev)
        self.w10 = torch.tensor([t.train.w10 for t in job], device=dev)
        self.neg_lr = [-lr.view(-1, *([1] * (p.dim() - 1))) for p in stack.params]
        self.momentum: list[torch.Tensor] = []  # torch.optim.SGD's buffers, created at the first step
        # ema: the moving average of every float tensor of the state (train.EMA's), from the initial one
        self.averaged = [t for name, t in stack.t.items() if not name.endswith("num_batches_tracked")]
        self.average = [t.detach().clone() for t in self.averaged] if self.tc.ema else None

    def keep_average(self) -> None:
        """With ``ema``: the models take their averaged state, the one they are scored and kept with."""
        if self.average is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.averaged, self.average)

    def __call__(
        self,
        rows: torch.Tensor,
        loss_acc: torch.Tensor,
        norms_row: torch.Tensor | None = None,
        factor: float = 1.0,
        draws: tuple = (None, None, None),
        mask: torch.Tensor | None = None,
    ) -> None:
        """``draws``: the mini-batch's ``(offsets, fields, corners)`` (:func:`augmentation`, stacked per
        model), ``mask``: dropout's multiplier ``[K, b', nbfch]``."""
        stack, tc = self.stack, self.tc
        cols, flat, tgt, cls = self.data.take(rows, *draws, tc.cutout)
        out = stack.forward(cols, flat, True, mask)
        losses = _losses(stack, out, tgt, cls, self.w2, self.w10, tc.label_smoothing)
        grads = list(torch.autograd.grad(losses.sum(), stack.params))
        with torch.no_grad():
            if norms_row is not None:
                gw = dict(zip(map(id, stack.params), grads, strict=True))
                norms_row.copy_(torch.stack([gw[id(w)].flatten(1).norm(dim=1) for w in stack.weights], 1))
            self._update(grads, factor)
            loss_acc += losses.detach() * rows.shape[1]
            for t in stack.counters:
                t += 1
            if self.average is not None:
                torch._foreach_lerp_(self.average, self.averaged, 1 - tc.ema)

    def _update(self, grads: list[torch.Tensor], factor: float) -> None:
        tc, momentum = self.tc, self.momentum
        if tc.weight_decay:
            grads = torch._foreach_add(grads, self.stack.params, alpha=tc.weight_decay)
        if tc.momentum:
            if momentum:
                torch._foreach_mul_(momentum, tc.momentum)
                torch._foreach_add_(momentum, grads)
            else:
                momentum.extend(g.clone() for g in grads)
            grads = torch._foreach_add(grads, momentum, alpha=tc.momentum) if tc.nesterov else momentum
        for p, g, lv in zip(self.stack.params, grads, self.neg_lr, strict=True):
            p.addcmul_(g, lv if factor == 1.0 else lv * factor)  # each model its own lr


def _train(
    step: _SGDStep, data: _Split, job: list[Trial], dev: torch.device, norms: torch.Tensor | None
) -> torch.Tensor:
    """Every epoch's mini-batches, each model in its own shuffled order with its own augmentation and
    dropout draws; returns the mean training loss per epoch and model ``[epochs, K]``."""
    tc, n = job[0].train, data.n
    bs = int(tc.batch_size)
    steps = tc.epochs * -(-n // bs)
    gens = [t.shuffle_generator() for t in job]
    randoms = [t.generators() for t in job]
    epoch_loss = torch.zeros(tc.epochs, len(job), device=dev)
    # A graph freezes the step's shapes (every mini-batch full), its lr and its inputs' pixels, and
    # records no per-step output.
    plain = tc.schedule == "constant" and not (tc.shift or tc.elastic or tc.cutout or tc.dropout)
    graphable = dev.type == "cuda" and CUDA_GRAPHS and n % bs == 0 and norms is None and plain
    step_fn = _GraphedStep(step, len(job), bs, dev) if graphable else step
    i = 0
    for epoch in range(tc.epochs):
        order = torch.stack([epoch_order(n, tc.shuffle, g) for g in gens]).to(dev) + data.offset
        for start in range(0, n, bs):
            rows = order[:, start : start + bs]
            if graphable:
                step_fn(rows, epoch_loss[epoch])
            else:
                b = rows.shape[1]
                per_model = zip(*(augmentation(tc, b, r) for r in randoms), strict=True)
                draws = tuple(torch.stack(d).to(dev) if d[0] is not None else None for d in per_model)
                mask = _dropout_masks(randoms, tc.dropout, (b * data.digits, step.stack.cfg.nbfch), dev)
                norms_row = norms[i] if norms is not None else None
                step_fn(rows, epoch_loss[epoch], norms_row, lr_factor(tc, i, steps), draws, mask)
            i += 1
    step.keep_average()
    return (epoch_loss / n).cpu()


def _dropout_masks(randoms: list, p: float, shape: tuple[int, int], dev: torch.device) -> torch.Tensor | None:
    """Each model's dropout multiplier for one mini-batch, stacked ``[K, *shape]``; ``None`` without dropout."""
    return torch.stack([dropout_mask(shape, p, r["dropout"]) for r in randoms]).to(dev) if p else None


@torch.no_grad()
def _evaluate(stack: _Stack, job: list[Trial], draws: dict[int, Draw], name: str, dev) -> list[dict[str, float]]:
    """``evaluate``'s accuracies for each model, in eval mode, forwarding the split in chunks; with
    ``tta``, of the posteriors averaged over the shifted views of every digit, as ``evaluate`` does."""
    data = _Split(job, draws, name, dev)
    tta = job[0].train.tta
    outs: list[list[torch.Tensor]] = []
    for start in range(0, data.n, EVAL_CHUNK):
        rows = data.offset + torch.arange(start, min(data.n, start + EVAL_CHUNK), device=dev)
        if tta:
            views = []
            for view in shifted_views(tta):
                offsets = torch.tensor(view, device=dev).expand(*rows.shape, 2, 2)
                views.append(stack.forward(*data.take(rows, offsets)[:2], False))
            out = average_posteriors(views)
        else:
            out = stack.forward(*data.take(rows)[:2], False)
        outs.append(list(out) if isinstance(out, tuple) else [out])
    out = [torch.cat(parts, 1) for parts in zip(*outs, strict=True)]
    rows = data.offset + torch.arange(data.n, device=dev)
    t, c = data.target[rows], data.classes[rows]
    if stack.arch == "pair":
        return [{"accuracy": fraction(out[0][i].argmax(1) == t[i])} for i in range(len(job))]
    return [siamese_scores(out[0][i], out[1][i], t[i], c[i]) for i in range(len(job))]
