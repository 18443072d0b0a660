"""Command ``cache`` of ``python -m lorax_engine``: where the subspace cache is, how big, its size bound, and
trimming or clearing it.

    cache [--cache-dir DIR] [--clear | --evict-to SIZE]

The cache holds base-model subspaces (``bases/``), pair similarities (``pairs/``) and checkpoint digest
memos (``fingerprints/``); every entry is keyed by content, so clearing it only costs the time to recompute.
``--clear`` deletes those three folders and nothing else, so a mistyped ``--cache-dir`` cannot delete a
folder of the user's own files. ``--evict-to SIZE`` deletes the least recently used bases until they fit
in SIZE; transfers do the same with ``$LORAX_DISK_CACHE_GB`` (analysis/disk_budget.py).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..analysis.disk_budget import DISK_BUDGET_ENV, disk_budget_bytes, evict_to, parse_size
from ..analysis.subspaces import default_cache_dir
from ..errors import OutputPathError, TransferOptionError

PARTS = ("bases", "pairs", "fingerprints")


def add_arguments(subparsers) -> None:
    p = subparsers.add_parser("cache", help="show the subspace cache's location and size, or clear it")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache folder (default $LORAX_CACHE_DIR or ~/.cache/lorax/subspaces)")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--clear", action="store_true", help="delete every cached entry")
    action.add_argument("--evict-to", metavar="SIZE", type=_size,
                        help="delete the least recently used bases until they fit in SIZE (e.g. 5GB, 500MB, 0)")
    p.set_defaults(run=run_cache)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except TransferOptionError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def usage(directory: Path) -> dict[str, tuple[int, int]]:
    """{part: (files, bytes)} of a cache folder."""
    out = {}
    for part in PARTS:
        files = [f for f in (directory / part).rglob("*") if f.is_file()] if (directory / part).is_dir() else []
        out[part] = (len(files), sum(f.stat().st_size for f in files))
    return out


def run_cache(args) -> int:
    directory = (args.cache_dir or default_cache_dir()).expanduser()
    before = usage(directory)
    if args.clear:
        for part in PARTS:
            try:
                shutil.rmtree(directory / part)
            except FileNotFoundError:
                pass
            except OSError as err:
                raise OutputPathError(f"{directory / part}: cannot be deleted ({err.strerror or err})") from None
        files = sum(n for n, _ in before.values())
        print(f"cleared {directory}: {files} files, {sum(b for _, b in before.values()) / 2**20:.1f} MiB")
        return 0
    if args.evict_to is not None:
        files, freed = evict_to(directory, args.evict_to)
        print(f"evicted {files} least recently used bases ({freed / 2**20:.1f} MiB) from {directory}; bases now "
              f"{(before['bases'][1] - freed) / 2**20:.1f} MiB")
        return 0
    print(f"cache folder: {directory}")
    for part, (n, size) in before.items():
        print(f"  {part:13} {n:6d} files {size / 2**20:9.1f} MiB")
    print(f"  {'total':13} {sum(n for n, _ in before.values()):6d} files "
          f"{sum(b for _, b in before.values()) / 2**20:9.1f} MiB")
    print(f"  bound on bases: {disk_budget_bytes() / 2**30:g} GiB (${DISK_BUDGET_ENV}); least recently used go first")
    return 0
