"""What the nodes need from ComfyUI, in one place: base weights of MODEL/CLIP patchers, the compute
device, progress and Cancel hooks, the shared subspace cache, and clean node errors."""
from __future__ import annotations

import functools
import os
import weakref

import comfy.model_base
import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ..lorax_engine.analysis.subspaces import SubspaceCache
from ..lorax_engine.errors import LoraXError
from ..lorax_engine.files.base_weights import as_matrix, tensor_fingerprint

# ComfyUI's model config class -> the engine's architecture names (anything else is detected from shapes)
_ARCHITECTURES = {"SD15": "sd1", "SDXL": "sdxl", "SSD1B": "ssd1b", "Segmind_Vega": "vega"}


class NodeError(Exception):
    """Raised by nodes with the engine's one-line message; ComfyUI shows it as the node's error."""


def user_errors(func):
    """Turn the engine's errors into short node errors (no engine traceback in the UI)."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except LoraXError as err:
            raise NodeError(str(err)) from None
    return wrapper


def compute_device() -> torch.device:
    return comfy.model_management.get_torch_device()


def engine_device() -> str:
    return "cuda" if compute_device().type == "cuda" else "cpu"


class ComfyProgress:
    """Engine ``progress(done, total)`` hook drawing ComfyUI's progress bar on the running node."""

    def __init__(self, node_id=None):
        self.node_id = node_id
        self.bar = None

    def __call__(self, done: int, total: int):
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(max(total, 1), node_id=self.node_id)
        self.bar.update_absolute(done, max(total, 1))


def stop_if_cancelled() -> bool:
    """Engine ``should_stop`` hook: raises ComfyUI's interruption when the user pressed Cancel."""
    comfy.model_management.throw_exception_if_processing_interrupted()
    return False


_cache = None


def subspace_cache() -> SubspaceCache:
    """One cache per ComfyUI process (bases reused across prompts), persisted under the user folder."""
    global _cache
    if _cache is None:
        _cache = SubspaceCache(directory=os.path.join(folder_paths.get_user_directory(), "lorax_cache", "subspaces"))
    return _cache


def is_sdxl(model) -> bool:
    """SDXL and its distilled derivatives (SSD-1B, Vega, KOALA) share ComfyUI's SDXL model class."""
    return isinstance(model.model, comfy.model_base.SDXL)


def _version(t: torch.Tensor):
    # Weights loaded under inference mode (as ComfyUI's executor loads them) track no version counter.
    # ComfyUI never writes such a weight in place: patching first moves the original to the patcher's
    # backup, which is the tensor read here. So the live object identifies the content.
    return None if t.is_inference() else t._version


class _Fingerprints:
    """Content fingerprints of tensors, remembered per live tensor object (and in-place version)."""

    def __init__(self):
        self._memo: dict[int, tuple[weakref.ref, object, str]] = {}

    def __call__(self, t: torch.Tensor) -> str:
        memo = self._memo.get(id(t))
        if memo is not None and memo[0]() is t and memo[1] == _version(t):
            return memo[2]
        fp = tensor_fingerprint(t)
        self._memo = {k: v for k, v in self._memo.items() if v[0]() is not None}
        self._memo[id(t)] = (weakref.ref(t), _version(t), fp)
        return fp


_fingerprints = _Fingerprints()


class PatcherWeights:
    """The engine's BaseModelWeights over a MODEL (and optionally a CLIP) as ComfyUI holds them.

    Reads the unpatched base weights (``get_key_patches`` returns the backup when the model is currently
    patched), so LoRAs already applied to the inputs do not leak into the subspaces. Nothing is modified.
    """

    def __init__(self, model, clip=None, name: str = "model"):
        self.name = name
        config = type(model.model.model_config).__name__
        self.architecture = _ARCHITECTURES.get(config, "unknown")
        self._weights = {}
        patchers = [model] + ([clip.patcher] if clip is not None else [])
        for patcher in patchers:
            for key, entry in patcher.get_key_patches().items():
                if key.endswith(".weight"):
                    self._weights[key] = entry[0]

    def keys(self) -> list[str]:
        return list(self._weights)

    def __contains__(self, key) -> bool:
        return key in self._weights

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._weights[key][0].shape)

    def _tensor(self, key: str) -> torch.Tensor:
        weight, convert = self._weights[key]
        return convert(weight, inplace=False)

    def matrix(self, key: str) -> torch.Tensor:
        return as_matrix(self._tensor(key))

    def fingerprint(self, key: str) -> str:
        return _fingerprints(self._weights[key][0])
