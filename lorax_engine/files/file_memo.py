"""What was computed from a file, remembered while the file is unchanged: its stamp, and small JSON memos keyed
by it (whole-file sha256 for provenance, per-weight digests of a checkpoint)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..atomic import write_text_atomic


def file_stamp(path) -> tuple:
    """What identifies a file's content without reading it: resolved path, device, inode, size, mtime, ctime.
    The kernel updates ctime on every write and no user call can set it, so a rewritten file changes stamp."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def memo_path(directory, name: str | bytes, prefix: str = "") -> Path:
    """The memo file in ``directory`` for a file named ``name`` (its path)."""
    raw = name if isinstance(name, bytes) else name.encode()
    return Path(directory).expanduser() / f"{prefix}{hashlib.sha256(raw).hexdigest()[:32]}.json"


def read_memo(path: Path, stamp: list) -> dict | None:
    """The memo at ``path`` if it was written for a file with this ``stamp``, else None (missing, unreadable,
    or the file has changed since)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("stat") == stamp else None


def write_memo(memo: Path, stamp: list, fields: dict) -> bool:
    """Write ``fields`` as the memo for a file with ``stamp``, atomically; False when it cannot be written (a
    memo only saves time, so that is not an error)."""
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(memo, json.dumps({**fields, "stat": stamp}))
        return True
    except OSError:
        return False
