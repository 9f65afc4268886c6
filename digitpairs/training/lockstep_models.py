"""K same-shape models as one: their parameters and batch-norm statistics stacked ``[K, ...]``, and a
batched forward that runs every layer of all K as one product (the lockstep engine's models).

Internal layouts differ from ``nn.Module``'s where that saves copies (feature maps are kept
channels-last, ``(position, channel)``); :func:`_layout` maps each state-dict tensor to its
stacked form and back, so outcomes carry ordinary state dicts that ``build_model`` accepts.
"""

from __future__ import annotations

from digitpairs.core.gemm import linear
from digitpairs.training.lockstep_kernels import EPS, MOMENTUM, BatchNorm, ConvPoolReLU, conv_pool_relu
from digitpairs.training.models import build_model, weight_names
from digitpairs.training.trials import Trial

import torch
import torch.nn.functional as F


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


class Stack:
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
        out, mean, var = BatchNorm.apply(h, weight, bias)
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
        conv = ConvPoolReLU.apply if grad else conv_pool_relu
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
        """A mini-batch from the engine's ``_Split.take`` -> pair logits ``[K, n, 2]``, or siamese comparison and
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
