"""Base-model weights by canonical key, read on demand: the only thing the transfer needs from a model.

A provider satisfies the small :class:`BaseModelWeights` protocol: ``keys()``, ``shape(key)``,
``matrix(key)`` (float32 ``[m, n]``, conv weights flattened), ``fingerprint(key)`` (content hash for
caching), plus ``name`` and ``architecture`` (and, where it was detected, ``architecture_evidence``: why);
``first_row(key)`` is optional (read cheaply where it exists). Two providers live here:

* :class:`StateDictWeights`: any mapping of canonical keys to tensors (a state dict, or a lazy mapping
  such as a wrapper around a ComfyUI ModelPatcher).
* :class:`CheckpointWeights`: a single-file checkpoint read lazily, one tensor at a time: ``.safetensors``, or a
  ``.ckpt`` / ``.pt`` pickle through torch's weights-only unpickler, memory-mapped. It understands the SD1.5
  layout (``model.diffusion_model.*``, ``cond_stage_model.transformer.*``), SDXL's
  (``conditioner.embedders.0.transformer.*`` for CLIP-L, ``conditioner.embedders.1.model.*`` OpenCLIP-G whose
  fused ``attn.in_proj_weight`` rows become q/k/v), ComfyUI's own canonical names, and UNet-only files (ldm
  names with or without a prefix, or diffusers names). SSD-1B, Vega and fine-tunes use the same layouts.

Fingerprints are a digest of the stored dtype, shape and bytes: xxh3-128 where the optional ``xxhash`` package is
installed (~29 GB/s on one core of the 2-core AMD VM, where sha256 runs at 1.8 GB/s with SHA-NI and blake2b at
0.95), sha256 without it; the digest names its hash (``xxh3_128:...``, ``sha256:...``), so the two never meet under
one key. They are cache keys for what was computed from a weight, not a guard against forged files (the files users
check are named by their whole-file sha256: provenance.py). They are computed in parallel threads ahead of use
(:func:`prefetch_fingerprints`), and a checkpoint can memoise its digests in a small JSON file keyed by the file's
device, inode, size, mtime and ctime (``fingerprint_dir``). The kernel updates ctime on every write and no user call
can set it, so a rewritten file is always hashed again; pass ``rehash=True`` to ignore the memo altogether.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch

try:        # optional (module docstring): a ~16x faster content digest than sha256
    import xxhash
except ImportError:
    xxhash = None

from ..errors import LoraFileError
from .architectures import detect_checkpoint_architecture
from .file_memo import file_stamp, memo_path, read_memo, write_memo
from .safetensors_file import open_weights_file

UNET = "diffusion_model."
CLIP_L = "clip_l.transformer."
CLIP_G_LAYERS = "clip_g.transformer.text_model.encoder.layers."


class BaseModelWeights(Protocol):
    name: str
    architecture: str

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def matrix(self, key: str) -> torch.Tensor: ...

    def fingerprint(self, key: str) -> str: ...


def fingerprint_hash() -> str:
    """The hash fingerprints are made with here: ``"xxh3_128"`` where xxhash is installed, else ``"sha256"``."""
    return "sha256" if xxhash is None else "xxh3_128"


def tensor_fingerprint(t: torch.Tensor) -> str:
    """Digest of a tensor's dtype, shape and raw bytes (as stored: no conversion), prefixed by the name of its hash
    (:func:`fingerprint_hash`)."""
    t = t.detach().to("cpu").contiguous()
    name = fingerprint_hash()
    h = hashlib.sha256() if name == "sha256" else xxhash.xxh3_128()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return f"{name}:{h.hexdigest()}"


def prefetch_fingerprints(weights, keys, workers: int | None = None) -> None:
    """Hash the ``keys`` of ``weights`` not yet fingerprinted, in parallel threads (default: one per core, at
    most 16), so that ``fingerprint`` then answers from the provider's memo. The hashes and the file reads release
    the GIL, so the threads scale with the cores: with sha256, the ~7 GB of an SD1.5 + SDXL pair took one thread
    ~5-12 s, 16 threads 0.5 s on the lent H200 machine. A provider without ``missing_fingerprints`` is hashed on
    demand."""
    missing = getattr(weights, "missing_fingerprints", None)
    todo = missing(keys) if missing is not None else []
    # at most 16 threads: each holds one weight (up to ~26 MB for SDXL's largest) while hashing it
    workers = min(len(todo), workers or min(os.cpu_count() or 1, 16))
    if workers <= 1:
        for key in todo:
            weights.fingerprint(key)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="lorax-hash") as pool:
        for _ in pool.map(weights.fingerprint, todo):
            pass


def as_matrix(t: torch.Tensor, device="cpu") -> torch.Tensor:
    """float32 ``[m, prod(rest)]`` view of a weight (conv kernels flattened), on ``device``."""
    return t.detach().to(device, torch.float32).reshape(t.shape[0], -1)


class StateDictWeights:
    """Canonical-key tensors from any mapping (``architecture`` detected from keys and shapes if not given)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], architecture: str | None = None,
                 name: str = "state dict"):
        self._tensors = tensors
        self.name = name
        if architecture is None:
            detection = detect_checkpoint_architecture(list(tensors.keys()), lambda k: tuple(tensors[k].shape))
            architecture, self.architecture_evidence = detection.architecture, detection.reason
        self.architecture = architecture
        self._fingerprints: dict[str, tuple[int, int, str]] = {}

    def keys(self) -> list[str]:
        return list(self._tensors.keys())

    def __contains__(self, key) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def matrix(self, key: str) -> torch.Tensor:
        return as_matrix(self._tensors[key])

    def first_row(self, key: str) -> torch.Tensor:
        """Row 0 of ``matrix(key)`` without converting the rest (a cheap test before comparing whole weights)."""
        return as_matrix(self._tensors[key][:1])[0]

    def fingerprint(self, key: str) -> str:
        t = self._tensors[key]
        stamp = self._stamp(t)
        memo = self._fingerprints.get(key)
        if memo is None or memo[:2] != stamp:
            memo = (*stamp, tensor_fingerprint(t))
            self._fingerprints[key] = memo
        return memo[2]

    @staticmethod
    def _stamp(t: torch.Tensor) -> tuple[int, int]:
        # a memo is valid while the same storage is unmodified (torch bumps _version on in-place writes)
        return t.data_ptr(), t._version

    def missing_fingerprints(self, keys) -> list[str]:
        """Those of ``keys`` (once each) whose fingerprint is not memoised (see :func:`prefetch_fingerprints`)."""
        return [k for k in dict.fromkeys(keys)
                if self._fingerprints.get(k, (None,))[:2] != self._stamp(self._tensors[k])]


# --------------------------------------------------------------------------------------------- checkpoints

_OPENCLIP = re.compile(r"^conditioner\.embedders\.1\.model\.transformer\.resblocks\.(\d+)\.(.+)$")
_OPENCLIP_PARTS = {"attn.out_proj.weight": "self_attn.out_proj.weight", "mlp.c_fc.weight": "mlp.fc1.weight",
                   "mlp.c_proj.weight": "mlp.fc2.weight"}
_LDM_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
_DIFFUSERS_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.",
                    "add_embedding.", "conv_norm_out.")
_PREFIXES = (("model.diffusion_model.", UNET), ("diffusion_model.", UNET),
             ("cond_stage_model.transformer.text_model.", CLIP_L + "text_model."),
             ("conditioner.embedders.0.transformer.text_model.", CLIP_L + "text_model."),
             ("clip_l.transformer.", CLIP_L), ("clip_g.transformer.", "clip_g.transformer."))


def _canonical_entries(file_keys, shape_fn) -> dict[str, tuple[str, int | None, int | None]]:
    """{canonical key: (file key, first row, last row)} for every weight a checkpoint holds."""
    out: dict[str, tuple[str, int | None, int | None]] = {}
    diffusers = []
    for fk in file_keys:
        m = _OPENCLIP.match(fk)
        if m:
            layer, part = m.groups()
            if part == "attn.in_proj_weight":
                width = shape_fn(fk)[0] // 3
                for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    out[f"{CLIP_G_LAYERS}{layer}.self_attn.{name}.weight"] = (fk, i * width, (i + 1) * width)
            elif part in _OPENCLIP_PARTS:
                out[f"{CLIP_G_LAYERS}{layer}.{_OPENCLIP_PARTS[part]}"] = (fk, None, None)
            continue
        for prefix, canon in _PREFIXES:
            if fk.startswith(prefix):
                out[canon + fk[len(prefix):]] = (fk, None, None)
                break
        else:
            if fk.startswith(_LDM_ROOTS):
                out[UNET + fk] = (fk, None, None)
            elif fk.startswith(_DIFFUSERS_ROOTS):
                diffusers.append(fk)
    if diffusers and not any(k.startswith(UNET) for k in out):
        out.update(_diffusers_unet(diffusers, shape_fn))
    return out


def _diffusers_unet(file_keys, shape_fn):
    """A diffusers-layout UNet file (``diffusion_pytorch_model.safetensors``) in ldm names."""
    from .architectures import SD15, SDXL
    from .keys import unet_layout

    ctx = next((shape_fn(k)[1] for k in file_keys if re.search(r"attn2\.to_k\.weight$", k)), None)
    layout = unet_layout(SDXL if ctx == 2048 else SD15).from_diffusers
    out = {}
    for fk in file_keys:
        module, dot, param = fk.rpartition(".")
        ldm = layout.get(module)
        if ldm:
            out[f"{UNET}{ldm}.{param}"] = (fk, None, None)
    return out


class CheckpointWeights:
    """A single-file checkpoint read lazily: only the tensors asked for, one at a time.

    ``fingerprint_dir``: where to memoise per-key content digests between runs (see module docstring).
    """

    def __init__(self, path, fingerprint_dir=None, rehash: bool = False, name: str | None = None):
        self.path = Path(path)
        self.name = name or self.path.name
        self._file = open_weights_file(self.path)
        self._entries = _canonical_entries(self._file.keys(), self._file.shape)
        if not self._entries:
            self._file.close()
            raise LoraFileError(self.path, "holds no UNet or text-encoder weights of a known layout "
                                           "(expected SD1.5, SDXL or ComfyUI checkpoint names)")
        detection = detect_checkpoint_architecture(self._entries, self.shape)
        self.architecture, self.architecture_evidence = detection.architecture, detection.reason
        self._memo_path = None
        self._memo_stamp = None
        self._digests: dict[str, str] = {}
        self._dirty = False
        if fingerprint_dir is not None:
            self._memo_stamp = list(file_stamp(self.path)[1:])
            self._memo_path = memo_path(fingerprint_dir, str(self.path.resolve()))
            if not rehash:
                self._digests = self._load_memo()
        self._last: tuple[str, torch.Tensor] | None = None   # raw tensor just hashed, reused by matrix()
        self.read_seconds = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.flush()
        self._file.close()

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        fk, start, stop = self._entries[key]
        shape = self._file.shape(fk)
        return shape if start is None else (stop - start, *shape[1:])

    def _raw(self, key: str) -> torch.Tensor:
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        t0 = time.perf_counter()
        fk, start, stop = self._entries[key]
        t = self._file.get(fk) if start is None else self._file.get_rows(fk, start, stop)
        self.read_seconds += time.perf_counter() - t0
        self._last = (key, t)
        return t

    def matrix(self, key: str) -> torch.Tensor:
        t = self._raw(key)
        self._last = None
        return as_matrix(t)

    def first_row(self, key: str) -> torch.Tensor:
        """Row 0 of ``matrix(key)``, reading only its bytes (a cheap test before comparing whole weights)."""
        fk, start, _ = self._entries[key]
        return as_matrix(self._file.get_rows(fk, start or 0, (start or 0) + 1))[0]

    def missing_fingerprints(self, keys) -> list[str]:
        """Those of ``keys`` (once each) whose digest is neither memoised nor computed yet."""
        return [k for k in dict.fromkeys(keys) if k not in self._digests]

    def fingerprint(self, key: str) -> str:
        digest = self._digests.get(key)
        if digest is None:
            digest = tensor_fingerprint(self._raw(key))
            self._digests[key] = digest
            self._dirty = True
        return digest

    # -- digest memo ------------------------------------------------------------------------------
    def _load_memo(self) -> dict[str, str]:
        data = read_memo(self._memo_path, self._memo_stamp)
        digests = data.get("digests") if data is not None else None
        if not isinstance(digests, dict):
            return {}
        # digests of the other hash (written before xxhash was installed, or after it was removed) are computed
        # again, so that equal weights of two files always have equal digests
        scheme = fingerprint_hash() + ":"
        return {str(k): str(v) for k, v in digests.items() if str(v).startswith(scheme)}

    def flush(self):
        """Write newly computed digests to the memo (atomically); a no-op without ``fingerprint_dir``."""
        if self._memo_path is not None and self._dirty:
            self._dirty = not write_memo(self._memo_path, self._memo_stamp,
                                         {"path": str(self.path), "digests": self._digests})
