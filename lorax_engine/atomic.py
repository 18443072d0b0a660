"""Whole-file writes: a reader sees the old file or the new one, never a torn one."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path`` to write the whole file to; renamed over ``path`` when the block
    ends without an error. Whatever happens (Ctrl-C included), no temporary file stays; errors propagate."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{time.monotonic_ns()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """``Path.write_text`` through :func:`atomic_path` (raises OSError like it)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
