"""Seeded generators for the zoo: values depend only on the parts named, never on call order."""
from __future__ import annotations

import hashlib

import torch

ZOO_SEED = 20250127


def seed(*parts) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in (ZOO_SEED, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(seed(*parts))
