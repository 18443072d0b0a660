"""Provenance users can check: which files a transfer read (names and sha256), and the hashes the LoRA
ecosystem computes for the file it wrote.

* :func:`file_sha256`: sha256 of a whole file, the hash model sites list (Civitai "SHA256", A1111's "new"
  hash). Memoised per file state (device, inode, size, mtime, ctime), in memory and optionally on disk.
* :func:`kohya_hashes`: kohya sd-scripts' ``sshs_model_hash`` and ``sshs_legacy_hash``, which sd-scripts
  precalculates from the tensors and the ``ss_*`` metadata only, serialised as safetensors: the model hash is
  the sha256 of everything after the header (the tensor data; A1111's "addnet" hash, Civitai's AutoV3 source),
  the legacy hash the first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB. The SAI ModelSpec's
  ``modelspec.hash_sha256`` is the same tensor-data hash, written ``0x``-prefixed.
* :func:`write_lora_with_provenance`: :func:`~.lora_formats.write_lora` plus those hashes and the given
  provenance keys.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import Future
from pathlib import Path

from .file_memo import file_stamp, memo_path, read_memo, write_memo
from .lora_formats import prepare_lora_file, save_lora_file

# what a saved file names as its model when the transfer read a ComfyUI MODEL, whose file cannot be known
UNKNOWN_MODEL = "unknown (ComfyUI MODEL input)"
LEGACY_OFFSET, LEGACY_LENGTH = 0x100000, 0x10000
_CHUNK = 1 << 20

_memo: dict[tuple, str] = {}
_pending: dict[tuple, Future] = {}      # hashes started by hash_ahead, by file stamp
_pending_lock = threading.Lock()


def hash_ahead(*paths, memo_dir=None) -> None:
    """Start :func:`file_sha256` of ``paths`` (None skipped) in a background thread: provenance needs them only
    when the result is written, and one core hashes the ~9 GB of an SD1.5 + SDXL checkpoint pair in ~6 s,
    which the transfer's own work now hides. A later :func:`file_sha256` of the same file waits for it. The
    thread is a daemon: a process that stops early (a bad input) does not wait for a hash nobody needs."""
    jobs = []
    for path in paths:
        if path is None:
            continue
        try:
            stamp = file_stamp(path)
        except OSError:
            continue                # the caller's own checks report a missing file
        with _pending_lock:
            if stamp not in _memo and stamp not in _pending:
                _pending[stamp] = Future()
                jobs.append((stamp, _pending[stamp]))
    if jobs:
        threading.Thread(target=_hash_pending, args=(jobs, memo_dir), name="lorax-file-sha256", daemon=True).start()


def _hash_pending(jobs: list[tuple[tuple, Future]], memo_dir) -> None:
    for stamp, future in jobs:
        try:
            future.set_result(_memo.get(stamp) or _hash_file_now(stamp, memo_dir))
        except BaseException as err:    # handed to whoever waits for this file
            future.set_exception(err)
        finally:
            with _pending_lock:
                _pending.pop(stamp, None)


def file_sha256(path, memo_dir=None) -> str:
    """Hex sha256 of the whole file; remembered per :func:`file_stamp` (and in ``memo_dir`` when given)."""
    stamp = file_stamp(path)
    digest = _memo.get(stamp)
    if digest is not None:
        return digest
    with _pending_lock:
        pending = _pending.get(stamp)
    if pending is not None:
        return pending.result()
    return _hash_file_now(stamp, memo_dir)


def _hash_file_now(stamp: tuple, memo_dir) -> str:
    memo = memo_path(memo_dir, os.fsencode(stamp[0]), prefix="sha256-") if memo_dir is not None else None
    data = read_memo(memo, list(stamp)) if memo is not None else None
    digest = str(data["sha256"]) if data is not None and "sha256" in data else None
    if digest is None:
        h = hashlib.sha256()
        with open(stamp[0], "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
        digest = h.hexdigest()
        if memo is not None:
            write_memo(memo, list(stamp), {"sha256": digest})
    _memo[stamp] = digest
    return digest


def kohya_hashes(tensors: dict, metadata: dict[str, str]) -> tuple[str, str]:
    """(``sshs_model_hash``, ``sshs_legacy_hash``) as sd-scripts precalculates them for a LoRA it saves."""
    import safetensors.torch

    data = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(memoryview(data)[8 + header:]).hexdigest()
    legacy_hash = hashlib.sha256(memoryview(data)[LEGACY_OFFSET:LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()[:8]
    return model_hash, legacy_hash


def source_provenance(*, lora_path=None, source_model=None, target_model=None, memo_dir=None) -> dict[str, str]:
    """``lorax.*`` keys naming the source LoRA and both checkpoints with their sha256; a model given as None was
    a ComfyUI MODEL input and is named :data:`UNKNOWN_MODEL` (no hash)."""
    out = {}
    for role, path in (("source_lora", lora_path), ("source_model", source_model), ("target_model", target_model)):
        if path is None:
            out[f"lorax.{role}"] = UNKNOWN_MODEL if role != "source_lora" else "unknown"
            continue
        # metadata is UTF-8: a file name whose bytes are not (lone surrogates on Linux) is kept escaped
        name = os.path.basename(os.fspath(path))
        out[f"lorax.{role}"] = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        out[f"lorax.{role}_sha256"] = file_sha256(path, memo_dir)
    return out


def attach(result, report, provenance: dict[str, str]) -> None:
    """Record ``provenance``, the transfer options and the summary in the report and in the result's metadata."""
    report.provenance.update(provenance)
    report.provenance["lorax.options"] = json.dumps(report.options, sort_keys=True)
    report.provenance["lorax.summary"] = json.dumps(report.summary(), sort_keys=True)
    result.metadata.update(report.metadata())


def format_provenance(provenance: dict[str, str]) -> str:
    """Readable lines for a report: each source file with its sha256."""
    lines = []
    for role, label in (("source_lora", "source LoRA"), ("source_model", "source model"),
                        ("target_model", "target model")):
        name = provenance.get(f"lorax.{role}")
        if name is not None:
            digest = provenance.get(f"lorax.{role}_sha256")
            lines.append(f"{label}: {name}" + (f" (sha256 {digest})" if digest else ""))
    return "\n".join(lines)


def write_lora_with_provenance(lora, path, *, architecture: str, provenance: dict[str, str] | None = None) -> Path:
    """:func:`write_lora` with ``provenance`` and the kohya / ModelSpec hashes of the written tensors (prepared
    once: the hashes are of exactly what is saved)."""
    path = Path(path)
    sd, md = prepare_lora_file(lora, path, architecture=architecture, extra_metadata=provenance)
    model_hash, legacy_hash = kohya_hashes(sd, md)
    md.update({"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash,
               "modelspec.hash_sha256": f"0x{model_hash}"})
    return save_lora_file(sd, md, path)
