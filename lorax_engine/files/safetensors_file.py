"""Validated, lazy reading of ``.safetensors`` files, and weights-only reading of pickle files (``.ckpt``...).

A safetensors file is ``<u64 little-endian header length N><N bytes of JSON header><tensor data>``.
The header is checked completely before any tensor is trusted, so a truncated download, a renamed
pickle or a corrupt header gives one clear :class:`LoraFileError` instead of a crash deep inside torch.
Tensors are read one at a time from the file on demand: memory never holds the whole file.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
import threading
import zipfile
from pathlib import Path

import torch

from ..errors import LoraFileError

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
TORCH_TO_SAFETENSORS = {dt: name for name, (dt, _) in DTYPES.items()}

MAX_HEADER_BYTES = 100_000_000
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

PICKLE_REFUSAL = ("refused: this pickle file needs code execution to load; convert it to .safetensors "
                  "with a tool you trust")


def check_regular_file(path: Path) -> int:
    """Size of ``path`` in bytes, or a LoraFileError saying why it is not a readable file."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise LoraFileError(path, "file not found") from None
    except OSError as err:
        raise LoraFileError(path, f"cannot be opened ({err.strerror or err})") from None
    if stat.S_ISDIR(st.st_mode):
        raise LoraFileError(path, "is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise LoraFileError(path, "is not a regular file")
    if st.st_size == 0:
        raise LoraFileError(path, "is empty (0 bytes)")
    return st.st_size


def _is_unicode(text: str) -> bool:
    """False for strings holding lone surrogates: JSON can escape them, UTF-8 (and the safetensors spec) cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _sniff_other_format(first_bytes: bytes) -> str | None:
    """Name of a known non-safetensors format the file starts like, to make the error actionable."""
    if first_bytes.startswith(b"PK\x03\x04"):
        return "a PyTorch zip checkpoint (pickle), not safetensors"
    if first_bytes[:1] == b"\x80" and first_bytes[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle, not safetensors"
    if first_bytes.lstrip()[:1] in (b"<",):
        return "an HTML/XML page (a failed download?), not safetensors"
    return None


class SafetensorsFile:
    """One ``.safetensors`` file, validated on open and read lazily, tensor by tensor.

    Use as a context manager (or call :meth:`close`)::

        with SafetensorsFile(path) as f:
            for key in f.keys():
                w = f.get(key)
    """

    def __init__(self, path):
        self.path = Path(path)
        self._file_size = check_regular_file(self.path)
        self._fh = open(self.path, "rb")
        self._seek_lock = threading.Lock()
        try:
            self._entries, self.metadata, self._data_start = self._read_header()
        except BaseException:
            self._fh.close()
            raise

    # -- validation -------------------------------------------------------------------------------
    def _fail(self, problem: str):
        raise LoraFileError(self.path, problem)

    def _read_header(self):
        size = self._file_size
        head = self._fh.read(min(size, 16))
        if size < 8:
            other = _sniff_other_format(head)
            self._fail(other and f"is {other}" or
                       f"too short to be a safetensors file ({size} bytes; at least 8 are needed)")
        n = int.from_bytes(head[:8], "little")
        if n > MAX_HEADER_BYTES or n < 2:
            other = _sniff_other_format(head)
            self._fail(f"is {other}" if other else
                       f"not a safetensors file: the header length field says {n} bytes, which is implausible")
        if n > size - 8:
            self._fail(f"truncated: the header alone should be {n} bytes but the file holds only {size - 8} "
                       "bytes after the length field — the download is probably incomplete")
        self._fh.seek(8)
        raw = self._fh.read(n)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._fail("not a safetensors file: its header is not UTF-8 text")
        try:
            header = json.loads(text)
        except json.JSONDecodeError as err:
            self._fail(f"corrupt safetensors header: not valid JSON ({err.msg} at character {err.pos})")
        except RecursionError:
            self._fail("corrupt safetensors header: its JSON is nested too deeply")
        if not isinstance(header, dict):
            self._fail("corrupt safetensors header: the JSON is not an object")

        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            self._fail("corrupt safetensors header: __metadata__ is not an object")
        for k, v in metadata.items():
            if not isinstance(v, str):
                self._fail(f"corrupt safetensors metadata: the value of {k!r} is not a string")
            for what, text in (("name", k), ("value", v)):
                if not _is_unicode(text):
                    self._fail(f"corrupt safetensors metadata: the {what} of {k[:60]!r} is not valid Unicode text "
                               "(a lone surrogate escape)")

        data_size = size - 8 - n
        entries = {}
        for key, info in header.items():
            if not _is_unicode(key):
                self._fail(f"corrupt safetensors header: the tensor name {key[:200]!r} is not valid Unicode text "
                           "(a lone surrogate escape)")
            entries[key] = self._check_entry(key, info)
        declared = max((e[3] for e in entries.values()), default=0)
        if declared > data_size:
            self._fail(f"truncated: header says {declared} bytes of tensor data but the file holds {data_size} "
                       "— the download is probably incomplete")
        spans = sorted((e[2], e[3], k) for k, e in entries.items() if e[3] > e[2])
        for (_, e0, k0), (b1, _, k1) in zip(spans, spans[1:], strict=False):
            if b1 < e0:
                self._fail(f"corrupt safetensors header: tensors {k0!r} and {k1!r} overlap in the data buffer")
        return entries, dict(metadata), 8 + n

    def _check_entry(self, key, info):
        """(torch dtype, shape, begin, end) of one header entry, after checking every field."""
        if not isinstance(info, dict):
            self._fail(f"corrupt safetensors header: entry {key!r} is not an object")
        dtype_name = info.get("dtype")
        if dtype_name not in DTYPES:
            self._fail(f"tensor {key!r} has an unknown dtype {dtype_name!r}")
        dtype, itemsize = DTYPES[dtype_name]
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            self._fail(f"corrupt safetensors header: tensor {key!r} has an invalid shape {shape!r}")
        if math.prod(max(s, 1) for s in shape) * itemsize >= 2**62:   # even an empty one: torch's strides overflow
            self._fail(f"corrupt safetensors header: tensor {key!r} has an absurd shape {shape}")
        offsets = info.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets) or offsets[1] < offsets[0]):
            self._fail(f"corrupt safetensors header: tensor {key!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * itemsize
        if end - begin != expected:
            self._fail(f"corrupt safetensors header: tensor {key!r} of shape {shape} {dtype_name} needs "
                       f"{expected} bytes but its data_offsets span {end - begin}")
        return dtype, tuple(shape), begin, end

    # -- access -----------------------------------------------------------------------------------
    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._fh.close()

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, key):
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {key!r}") from None

    def shape(self, key) -> tuple[int, ...]:
        return self._entry(key)[1]

    def dtype(self, key) -> torch.dtype:
        return self._entry(key)[0]

    def _read(self, begin: int, nbytes: int, dtype: torch.dtype, shape) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        buf = torch.empty(nbytes, dtype=torch.uint8)    # not zero-filled: the reads overwrite it all
        view, offset, got = memoryview(buf.numpy()), self._data_start + begin, 0
        while got < nbytes:
            n = self._read_at(view[got:], offset + got)
            if n <= 0:
                self._fail(f"truncated while reading tensor data (wanted {nbytes} bytes, got {got})")
            got += n
        return buf.view(dtype).reshape(shape)

    def _read_at(self, view: memoryview, offset: int) -> int:
        """Read into ``view`` from ``offset``; safe from several threads at once (fingerprints are hashed in
        parallel). Positional reads share no file offset; Windows has none, so there a lock guards the seek."""
        if hasattr(os, "preadv"):
            return os.preadv(self._fh.fileno(), [view], offset)     # one call may return less (Linux: <= 2 GiB)
        with self._seek_lock:
            self._fh.seek(offset)
            return self._fh.readinto(view)

    def get(self, key, device="cpu") -> torch.Tensor:
        """The tensor ``key``, read from disk now (only its own bytes)."""
        dtype, shape, begin, end = self._entry(key)
        return self._read(begin, end - begin, dtype, shape).to(device)

    def get_rows(self, key, start: int, stop: int, device="cpu") -> torch.Tensor:
        """Rows ``start:stop`` of the first dimension, reading only those bytes."""
        dtype, shape, begin, end = self._entry(key)
        if not shape:
            raise ValueError(f"{self.path}: tensor {key!r} is a scalar and has no rows")
        start, stop, _ = slice(start, stop).indices(shape[0])
        stop = max(stop, start)
        row_bytes = (end - begin) // shape[0] if shape[0] else 0
        return self._read(begin + start * row_bytes, (stop - start) * row_bytes, dtype,
                          (stop - start, *shape[1:])).to(device)

    def dtype_names(self) -> dict[str, str]:
        """safetensors dtype name per key (``"F16"``, ``"BF16"``...), for reports."""
        return {k: TORCH_TO_SAFETENSORS[e[0]] for k, e in self._entries.items()}


def _flatten_pickled(obj, prefix=""):
    """Tensors of a (possibly nested) weights-only checkpoint dict; other values are ignored."""
    out = {}
    if isinstance(obj, dict):
        # Lightning / original SD checkpoints keep the weights under "state_dict".
        if not prefix and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        for k, v in obj.items():
            if isinstance(v, torch.Tensor):
                out[prefix + str(k)] = v
            elif isinstance(v, dict):
                out.update(_flatten_pickled(v, f"{prefix}{k}."))
    return out


class _LightningCheckpointCallback:
    """Stands in for the training callback state old SD checkpoints carry (``callbacks``): plain data, never used.
    The same harmless names ComfyUI's own loader allows (comfy/utils.py), so what ComfyUI reads, the pack reads."""


_LightningCheckpointCallback.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
_LightningCheckpointCallback.__name__ = _LightningCheckpointCallback.__qualname__ = "ModelCheckpoint"


def _numpy_scalar(*args, **kwargs):
    """A numpy scalar (``global_step`` in some checkpoints) rebuilt from its dtype and bytes: data, not code."""
    import numpy._core.multiarray

    return numpy._core.multiarray.scalar(*args, **kwargs)


_numpy_scalar.__module__, _numpy_scalar.__name__ = "numpy.core.multiarray", "scalar"


def _data_globals() -> list:
    import _codecs

    import numpy
    import numpy._core.multiarray
    import numpy.dtypes

    # numpy 2 pickles scalars under numpy._core, older files under numpy.core; a scalar names its dtype's class
    dtypes = [getattr(numpy.dtypes, f"{kind}DType") for kind in (
        "Float64", "Float32", "Float16", "Int64", "Int32", "Int16", "Int8", "UInt64", "UInt32", "UInt16", "UInt8",
        "Bool")]
    return [_LightningCheckpointCallback, _numpy_scalar, numpy._core.multiarray.scalar, numpy.dtype, *dtypes,
            _codecs.encode]


# what torch's weights-only unpickler says when a file asks for more than plain data
_UNPICKLER_REFUSAL = re.compile(r"Unsupported global: GLOBAL (\S+)|but got <class '([^']+)'>")


def _refusal_reason(err: Exception) -> str:
    text = str(err).strip()
    found = _UNPICKLER_REFUSAL.search(text)
    if found:
        return f"it asks for {found.group(1) or found.group(2)}"
    return text.splitlines()[0][:200] if text else type(err).__name__


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickle weights file, through torch's weights-only unpickler (plain data only: a file that
    needs any other object is refused, never executed). Zip checkpoints (torch >= 1.6, the usual ``.ckpt``) are
    memory-mapped: tensors are read from disk only when used."""
    try:
        with torch.serialization.safe_globals(_data_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # any failure: never fall back to a full unpickler
        raise LoraFileError(path, f"{PICKLE_REFUSAL} ({_refusal_reason(err)})") from None
    tensors = _flatten_pickled(obj)
    if not tensors:
        raise LoraFileError(path, "holds no tensors")
    return tensors


class PickleWeightsFile:
    """A ``.ckpt`` / ``.pt`` checkpoint with :class:`SafetensorsFile`'s reading interface (keys, shape, get,
    get_rows, close), loaded by :func:`_load_pickle` (memory-mapped where torch allows)."""

    def __init__(self, path):
        self.path = Path(path)
        check_regular_file(self.path)
        self._tensors = _load_pickle(self.path)
        self.metadata: dict[str, str] = {}

    def __enter__(self) -> PickleWeightsFile:
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._tensors = {}      # the memory map goes with the last tensor of it

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key) -> bool:
        return key in self._tensors

    def shape(self, key) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def get(self, key, device="cpu") -> torch.Tensor:
        return self._tensors[key].to(device)

    def get_rows(self, key, start: int, stop: int, device="cpu") -> torch.Tensor:
        return self._tensors[key][start:stop].to(device)


def open_weights_file(path) -> SafetensorsFile | PickleWeightsFile:
    """A weights file opened for reading tensor by tensor: a pickle by its extension (weights-only), else
    safetensors (which also names a pickle given another extension)."""
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        return PickleWeightsFile(path)
    return SafetensorsFile(path)


def load_state_dict_file(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a ``.safetensors`` or pickle weights file (pickles: :func:`_load_pickle`)."""
    path = Path(path)
    check_regular_file(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        with SafetensorsFile(path) as f:
            return {k: f.get(k) for k in f.keys()}, dict(f.metadata)
    if suffix in PICKLE_SUFFIXES:
        return _load_pickle(path), {}
    raise LoraFileError(path, f"unknown file type {suffix or '(no extension)'!r}: expected .safetensors "
                              f"(or a pickle: {', '.join(PICKLE_SUFFIXES)})")
