"""A size bound for the on-disk subspace cache: least-recently-used bases are deleted first.

Bases (``<cache>/bases/**/*.safetensors``) are nearly all of the cache's size; a basis read from disk has its
modification time touched (``SubspaceCache._read``), so the oldest mtime is the least recently used entry.
Pair scores and digest memos are small and stay. Every entry is keyed by content: an evicted basis only costs
the time to compute it again. The bound is ``$LORAX_DISK_CACHE_GB`` (default 10; 0 keeps nothing).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import TransferOptionError

DISK_BUDGET_ENV = "LORAX_DISK_CACHE_GB"
DEFAULT_DISK_BUDGET_GB = 10.0
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``10GB``, ``500M``, ``1.5 GiB`` or ``0`` (binary units: 1 GB = 2**30 bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and _UNITS.get(m.group(2).lower())
    if not unit:
        raise TransferOptionError(f"not a size: {text!r} (use e.g. 10GB, 500MB or 0)")
    return int(float(m.group(1)) * unit)


def env_bytes(name: str, default: float, unit: int) -> int:
    """``$name`` read as a number of ``unit`` bytes (``default`` when unset); a bad value is one clear error."""
    text = os.environ.get(name, "").strip()
    if not text:
        return int(default * unit)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise TransferOptionError(f"{name} must be a number >= 0, got {text!r}")
    return int(value * unit)


def disk_budget_bytes() -> int:
    return env_bytes(DISK_BUDGET_ENV, DEFAULT_DISK_BUDGET_GB, 2**30)


def _entries(directory: Path) -> list[tuple[float, int, Path]]:
    """(mtime, bytes, path) of every basis entry, oldest first (temporary files of running writes excluded)."""
    out = []
    for path in (Path(directory) / "bases").rglob("*.safetensors"):
        if path.name.startswith("."):
            continue
        try:
            st = path.stat()
        except OSError:     # deleted meanwhile
            continue
        out.append((st.st_mtime, st.st_size, path))
    return sorted(out, key=lambda e: (e[0], str(e[2])))


def bases_bytes(directory) -> int:
    return sum(size for _, size, _ in _entries(Path(directory)))


def evict_to(directory, max_bytes: int) -> tuple[int, int]:
    """Delete the least recently used bases until they hold at most ``max_bytes``; returns (files, bytes) deleted."""
    if directory is None:
        return 0, 0
    entries = _entries(Path(directory))
    excess = sum(size for _, size, _ in entries) - max_bytes
    files = freed = 0
    for _, size, path in entries:
        if excess <= 0:
            break
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            continue        # a read-only cache is left as it is
        excess -= size
        files, freed = files + 1, freed + size
    return files, freed
