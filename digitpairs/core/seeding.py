"""Seeds derived from what they serve, so no result depends on global RNG state or run order."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*key: object) -> int:
    """A 63-bit seed from a key such as ``(seed, "pairs", draw)``.

    Hashing the whole key means a trial's randomness depends only on its own identity: adding,
    removing or reordering other trials (or running them on other workers) never changes it.
    """
    digest = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(*key: object) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed` (CPU so draws are identical on any device)."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(*key))
