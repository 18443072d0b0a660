"""Safe output file names: nothing a user or a LoRA's metadata types may escape the output folder.

Used by the Save node and by the command line's ``batch`` (which derives output names from input names).
"""
from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path

from ..errors import OutputPathError

# Windows refuses these as file stems whatever the extension; files shared across OSes must avoid them.
_RESERVED_STEMS = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
# control characters, characters Windows forbids, and lone surrogates (bytes of a file name that were not UTF-8)
_UNSAFE_CHARS = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*\ud800-\udfff]')
# in UTF-8 bytes: with a counter, the extension and a temporary file's decoration the name stays far below the
# 255 bytes most file systems allow (120 characters could be 480 bytes)
MAX_STEM_BYTES = 120


def sanitize_stem(name: str) -> str:
    """A file stem made only of safe characters, with no directory part and no reserved name.

    Path separators and ``..`` are not interpreted: ``../../x`` becomes ``x``-like text inside the folder.
    """
    if not isinstance(name, str):
        raise OutputPathError(f"output name must be text, got {type(name).__name__}")
    text = unicodedata.normalize("NFC", name)
    if text.lower().endswith(".safetensors"):
        text = text[: -len(".safetensors")]
    text = _UNSAFE_CHARS.sub("_", text)
    text = re.sub(r"\.{2,}", "_", text).strip(" ._")
    text = re.sub(r"_{2,}", "_", text).encode("utf-8")[:MAX_STEM_BYTES].decode("utf-8", "ignore").strip(" ._")
    if not text:
        raise OutputPathError(f"output name {name!r} has no usable characters; use letters, digits, '-' or '_'")
    # Windows reserves the name before the first dot ("CON.0.safetensors" too) and ignores trailing spaces in it
    head, dot, rest = text.partition(".")
    if head.rstrip(" ").lower() in _RESERVED_STEMS:
        text = f"{head}_{dot}{rest}"
    return text


def unique_output_path(folder, name: str, extension: str = ".safetensors") -> Path:
    """``folder/<sanitised name><extension>``, with ``_00001``-style counters instead of overwriting."""
    folder = Path(folder)
    stem = sanitize_stem(name)
    candidate = folder / f"{stem}{extension}"
    counter = 1
    while os.path.lexists(candidate):
        candidate = folder / f"{stem}_{counter:05d}{extension}"
        counter += 1
    resolved_folder = folder.resolve()
    if candidate.resolve().parent != resolved_folder:
        raise OutputPathError(f"output name {name!r} would leave the folder {folder}")
    return candidate
