"""The lockstep engine: train K same-shape models as one batched computation.

A per-model loop spends most of each tiny step in Python and dispatch overhead. Here every layer
of K independent models is one stacked tensor ``[K, ...]`` and every layer is one batched matmul
(:mod:`digitpairs.core.gemm`: on the CPU, OpenBLAS's Haswell kernels on every CPU with AVX2 and FMA), so
a step of K models costs little more than a step of one. The models stay
independent: the sum of the K losses has, for each model's parameters, exactly that model's
gradient, so one backward and one fused SGD update (per-model lr broadcast) train all of them.

It computes what :mod:`digitpairs.training.semantics` defines, as the per-model loop
(:mod:`digitpairs.training.train`) does. This file drives the training: jobs of same-shape trials, their
data (:class:`_Split`), the SGD step and its CUDA graph, the epochs and the evaluation. The K models
are :class:`~digitpairs.training.lockstep_models.Stack`, whose layers run on the kernels of
:mod:`digitpairs.training.lockstep_kernels`.

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
from digitpairs.data.pairs import Draw, split
from digitpairs.training.lockstep_kernels import conv1_cols, im2col
from digitpairs.training.lockstep_models import Stack
from digitpairs.training.semantics import (
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
    step_count,
)
from digitpairs.training.trials import Outcome, Trial

import torch
import torch.nn.functional as F

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


class _GraphedStep:
    """CUDA: one SGD step of all K models captured once as a CUDA graph, then replayed.

    Eagerly, a step is some 200 small kernel launches, which leave the GPU waiting on Python at small
    widths; a replay is one launch. The first :data:`GRAPH_WARMUP` calls run eagerly on a side stream
    (CUDA's rule before a capture; they are real training steps), the next captures the step reading
    its mini-batch rows from a fixed buffer, and every call replays it. The same kernels run in the
    same order: on an H200 a small job gave the eager engine's bytes exactly, and the largest grid
    job, which is GPU-bound, ran 6% faster (results/full-grid/earlier-gpu/tuning.json).
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


class _Split:
    """One split of every draw in a job, laid out for :meth:`Stack.forward`.

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


def _losses(stack: Stack, out, t: torch.Tensor, c: torch.Tensor, w2: torch.Tensor, w10: torch.Tensor, smoothing: float):
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
    stack = Stack(job, dev)
    epoch_loss, norms = _train(_SGDStep(stack, data, job, dev), data, job, dev, record_grad_norms)
    scores = [{} for _ in job]
    for name in ("val", "test"):
        for i, s in enumerate(_evaluate(stack, job, draws, name, dev)):
            scores[i][name] = s
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

    def __init__(self, stack: Stack, data: _Split, job: list[Trial], dev: torch.device) -> None:
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
    step: _SGDStep, data: _Split, job: list[Trial], dev: torch.device, record_grad_norms: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every epoch's mini-batches, each model in its own shuffled order with its own augmentation and
    dropout draws; returns the mean training loss per epoch and model ``[epochs, K]`` and, when
    recorded, the gradient norms ``[steps, K, weights]`` (both on the CPU)."""
    tc, n = job[0].train, data.n
    bs = int(tc.batch_size)
    steps = step_count(tc, n)
    norms = torch.zeros(steps, len(job), len(step.stack.weights), device=dev) if record_grad_norms else None
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
    return (epoch_loss / n).cpu(), norms.cpu() if norms is not None else None


def _dropout_masks(randoms: list, p: float, shape: tuple[int, int], dev: torch.device) -> torch.Tensor | None:
    """Each model's dropout multiplier for one mini-batch, stacked ``[K, *shape]``; ``None`` without dropout."""
    return torch.stack([dropout_mask(shape, p, r["dropout"]) for r in randoms]).to(dev) if p else None


@torch.no_grad()
def _evaluate(stack: Stack, job: list[Trial], draws: dict[int, Draw], name: str, dev) -> list[dict[str, float]]:
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
