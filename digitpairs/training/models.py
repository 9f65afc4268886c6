"""The study's two architectures, written to read like SPEC.md's description."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from digitpairs.core.io import StageError

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file
from torch import nn

ARCHS = ("pair", "siamese")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and widths; everything needed to rebuild a saved model."""

    arch: str
    nbch1: int = 32
    nbch2: int = 64
    nbfch: int = 256
    batch_norm: bool = True
    skip_connections: bool = True
    relu_logits: bool = False  # the original's ReLU on every head's logits

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {ARCHS}.")
        for key in ("nbch1", "nbch2", "nbfch"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)!r}.")


class Branch(nn.Module):
    """conv3x3 -> pool -> ReLU -> [BN] -> [+skip] -> conv6x6 -> ReLU -> [BN] -> [+skip] -> FC -> FC.

    Modules are registered in depth order, so ``named_parameters`` lists weights input to output.
    """

    def __init__(self, in_ch: int, n_out: int, cfg: ModelConfig) -> None:
        super().__init__()
        n_in, bn, skip = in_ch * 14 * 14, cfg.batch_norm, cfg.skip_connections
        self.conv1 = nn.Conv2d(in_ch, cfg.nbch1, 3)
        self.skip1 = nn.Linear(n_in, cfg.nbch1 * 6 * 6) if skip else None
        self.bn1 = nn.BatchNorm2d(cfg.nbch1) if bn else None
        self.conv2 = nn.Conv2d(cfg.nbch1, cfg.nbch2, 6)
        self.skip2 = nn.Linear(n_in, cfg.nbch2) if skip else None
        self.bn2 = nn.BatchNorm1d(cfg.nbch2) if bn else None
        self.fc1 = nn.Linear(cfg.nbch2, cfg.nbfch)
        self.bn3 = nn.BatchNorm1d(cfg.nbfch) if bn else None
        self.fc2 = nn.Linear(cfg.nbfch, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        h = F.relu(F.max_pool2d(self.conv1(x), 2))
        if self.bn1 is not None:
            h = self.bn1(h)
        if self.skip1 is not None:
            h = h + F.relu(self.skip1(flat)).view_as(h)
        h = F.relu(self.conv2(h)).flatten(1)
        if self.bn2 is not None:
            h = self.bn2(h)
        if self.skip2 is not None:
            h = h + F.relu(self.skip2(flat))
        h = F.relu(self.fc1(h))
        if self.bn3 is not None:
            h = self.bn3(h)
        return self.fc2(h)


class PairNet(nn.Module):
    """No weight sharing: one branch reads both digits as two channels and outputs 2 logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.relu_logits = cfg.relu_logits
        self.branch = Branch(2, 2, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        return F.relu(out) if self.relu_logits else out


class SiameseNet(nn.Module):
    """Weight sharing: one branch classifies each digit; a linear layer compares the two.

    Both digits go through the branch as one batch of 2n images (same weights, one call), so
    batch norm normalises over all digits of the mini-batch. Returns comparison logits ``[n, 2]``
    and digit logits ``[n, 2, 10]``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.relu_logits = cfg.relu_logits
        self.branch = Branch(1, 10, cfg)
        self.compare = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        digits = self.branch(x.reshape(2 * n, 1, 14, 14)).view(n, 2, 10)
        if self.relu_logits:
            digits = F.relu(digits)
        out = self.compare(digits.reshape(n, 20))
        return (F.relu(out) if self.relu_logits else out), digits


def init_weights(model: nn.Module, g: torch.Generator) -> nn.Module:
    """PyTorch's default initialisation, drawn from ``g`` instead of the global RNG."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=g)
            bound = 1 / math.sqrt(m.weight[0].numel())
            nn.init.uniform_(m.bias, -bound, bound, generator=g)
    return model


def build_model(cfg: ModelConfig, g: torch.Generator) -> nn.Module:
    """A freshly initialised model of ``cfg`` whose weights depend only on ``g``."""
    net = PairNet(cfg) if cfg.arch == "pair" else SiameseNet(cfg)
    with torch.no_grad():
        return init_weights(net, g)


def weight_names(model: nn.Module) -> list[str]:
    """Names of the weight tensors (convolutions and linear layers, no biases), in depth order."""
    return [n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a trained state as :func:`save_model` writes it (safetensors bytes): equal digests mean
    bit-identical training, which rounded scores cannot show; ``sha256sum`` of a saved model file gives
    the same hex string."""
    return hashlib.sha256(save({k: v.detach().cpu().contiguous() for k, v in state.items()})).hexdigest()


def save_model(model: nn.Module, cfg: ModelConfig, stem: Path) -> None:
    """``stem.safetensors`` (weights and batch-norm statistics) plus ``stem.json`` (the config)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(asdict(cfg), sort_keys=True, indent=2, allow_nan=False) + "\n")


def load_model(stem: Path) -> tuple[nn.Module, ModelConfig]:
    """Rebuild a model saved by :func:`save_model`."""
    stem = Path(stem)
    folder = stem.parent.parent  # models_out/models: <variant>/draw_XX.*
    fix = f"`dvc checkout --force {folder}` restores it, `dvc repro train` retrains it."  # --force: over a changed file
    config, weights = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    for path in (config, weights):
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist; {fix.replace(' --force', '')}")
    try:
        cfg = ModelConfig(**json.loads(config.read_text()))
    except (ValueError, TypeError) as err:  # not JSON, or not a model's config
        raise StageError(f"model config {config} is corrupt or truncated ({err}); {fix}") from None
    model = PairNet(cfg) if cfg.arch == "pair" else SiameseNet(cfg)
    try:
        model.load_state_dict(load_file(str(weights)))
    except (SafetensorError, RuntimeError) as err:  # unreadable, or weights of another shape
        first = str(err).strip().splitlines()[0]
        raise StageError(f"model weights {weights} are corrupt or truncated ({first}); {fix}") from None
    return model.eval(), cfg
