"""What the nodes need from ComfyUI, in one place: base weights of MODEL/CLIP patchers, the compute
device, progress and Cancel hooks, the shared subspace cache (emptied when ComfyUI frees memory), which
files a path input may read, and clean node errors.

Devices: the nodes compute on ComfyUI's compute device when it is a CUDA GPU, else on the CPU (the engine's
float64 eigensolvers and products are not available on mps/xpu/DirectML, so those fall back to CPU math, with
every tensor on the CPU). LoRAs passed between the nodes stay on that device within a run; VRAM is handed back
after each transfer and, when ComfyUI frees memory, LoRAs the nodes passed on in VRAM move to the CPU."""
from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
import weakref

import comfy.model_base
import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ..lorax_engine.analysis.disk_budget import env_bytes
from ..lorax_engine.analysis.subspaces import CACHE_ENV, DEFAULT_MEMORY_BYTES, SubspaceCache, default_cache_dir
from ..lorax_engine.cache_bound import DiskBound
from ..lorax_engine.errors import LoraFileError, LoraXError
from ..lorax_engine.files.base_weights import as_matrix, tensor_fingerprint
from ..lorax_engine.files.lora import LoraModel
from ..lorax_engine.files.provenance import UNKNOWN_MODEL

# ComfyUI's model config class -> the engine's architecture names (anything else is detected from shapes)
_ARCHITECTURES = {"SD15": "sd1", "SDXL": "sdxl", "SSD1B": "ssd1b", "Segmind_Vega": "vega"}


class NodeError(Exception):
    """Raised by nodes with the engine's one-line message; ComfyUI shows it as the node's error."""


# torch's words for tensors that met on the wrong device ("Expected all tensors to be on the same device, ...")
_DEVICE_ERROR = re.compile(r"\bdevices?\b", re.IGNORECASE)


def _node_title(node) -> str:
    from . import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # at call time: the package imports this module
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        if type(node) is cls:
            return NODE_DISPLAY_NAME_MAPPINGS[node_id]
    return type(node).__name__


def device_error_line(node, err: RuntimeError) -> str | None:
    """One line for a torch device error raised inside ``node``, or None for any other error. Out-of-memory
    errors are not ours to reword: ComfyUI recognises them and frees memory itself."""
    message = str(err).strip()
    if isinstance(err, comfy.model_management.OOM_EXCEPTION) or not _DEVICE_ERROR.search(message):
        return None
    return (f"{_node_title(node)}: device error ({message.splitlines()[0]}). This is a bug in the LoRA-X pack: "
            "please report it with this line; meanwhile start ComfyUI with --cpu to transfer on the CPU")


def display_name(path) -> str:
    """How a node names a file: as ComfyUI lists it (relative to the model folder holding it), else by its own
    name; never by the server's path. A relative name is one already (e.g. a checkpoint's listed name)."""
    path = os.fspath(path)
    if not os.path.isabs(path):
        return path
    real = os.path.realpath(path)
    for paths, _ in list(folder_paths.folder_names_and_paths.values()):
        for folder in paths:
            for candidate, root in ((path, os.path.abspath(folder)), (real, os.path.realpath(folder))):
                if candidate.startswith(os.path.join(root, "")):
                    return os.path.relpath(candidate, root)
    return os.path.basename(path)


def user_errors(method):
    """Turn the engine's errors, and torch device errors, into one-line node errors (no traceback in the UI);
    files are named as ComfyUI lists them (:func:`display_name`)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except LoraFileError as err:
            raise NodeError(f"{display_name(err.path)}: {err.problem}") from None
        except LoraXError as err:
            raise NodeError(str(err)) from None
        except RuntimeError as err:
            line = device_error_line(self, err)
            if line is None:
                raise
            raise NodeError(line) from None
    return wrapper


def engine_device() -> str:
    """Where the nodes compute and keep their tensors: ComfyUI's compute device if it is a CUDA GPU (with its
    index), else ``"cpu"``."""
    device = comfy.model_management.get_torch_device()
    return str(device) if device.type == "cuda" else "cpu"


_on_device: list[weakref.ref] = []     # LoRAs the nodes passed on in VRAM


def on_engine_device(lora: LoraModel) -> LoraModel:
    """``lora`` on :func:`engine_device`, to pass to the next node; remembered while it lives, so freeing memory
    can move it to the CPU (ComfyUI keeps node outputs between runs; a LoRA moved there still works)."""
    lora = lora.to(engine_device())
    if any(layer.up.device.type != "cpu" for layer in lora.layers.values()):
        _on_device[:] = [ref for ref in _on_device if ref() is not None]
        _on_device.append(weakref.ref(lora))
    return lora


def _offload_outputs():
    for ref in _on_device:
        lora = ref()
        if lora is not None:
            lora.layers = {k: layer.to("cpu") for k, layer in lora.layers.items()}
    _on_device.clear()


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


MEMORY_BUDGET_ENV = "LORAX_MEMORY_CACHE_MB"
ALLOW_ANY_PATH_ENV = "LORAX_ALLOW_ANY_PATH"
CACHE_FOLDER = "lorax_cache"    # a folder name extra_model_paths.yaml may set, as for any model folder

_cache = None
_free_hooks: list = []      # functions emptying in-memory caches, called when ComfyUI frees memory


def memory_budget_bytes() -> int:
    """``$LORAX_MEMORY_CACHE_MB`` in bytes (default the engine's 1 GiB): the bound of each in-memory cache."""
    return env_bytes(MEMORY_BUDGET_ENV, DEFAULT_MEMORY_BYTES / 2**20, 2**20)


def cache_directory() -> str:
    """Where the nodes keep their disk cache: ``$LORAX_CACHE_DIR`` (as the command line), else the
    ``lorax_cache`` folder of ComfyUI's extra_model_paths.yaml (+ ``/subspaces``), else the user folder's."""
    if os.environ.get(CACHE_ENV):
        return str(default_cache_dir())
    configured = folder_paths.folder_names_and_paths.get(CACHE_FOLDER, ((), ()))[0]
    root = configured[0] if configured else os.path.join(folder_paths.get_user_directory(), CACHE_FOLDER)
    return os.path.join(root, "subspaces")


def subspace_cache() -> SubspaceCache:
    """One cache per ComfyUI process (bases reused across prompts), persisted in :func:`cache_directory`."""
    global _cache
    if _cache is None:
        _cache = SubspaceCache(directory=cache_directory(), memory_bytes=memory_budget_bytes())
    return _cache


@contextlib.contextmanager
def engine_run():
    """The engine's ``should_stop`` hook for one node's work: Cancel stops it, and the disk cache keeps its bound
    (``$LORAX_DISK_CACHE_GB``) while it runs. Afterwards, however the work ended, the VRAM the transfer's
    temporaries held goes back and the cache is trimmed once more."""
    bound = DiskBound(subspace_cache(), stop_if_cancelled)
    try:
        yield bound
    finally:
        comfy.model_management.soft_empty_cache()
        bound.trim()


def on_free_memory(hook):
    """Register ``hook()`` to empty an in-memory cache whenever ComfyUI frees memory; returns ``hook``."""
    _free_hooks.append(hook)
    return hook


@on_free_memory
def _free_subspace_cache():
    if _cache is not None:
        _cache.clear_memory()
        _cache.pairs = None       # the pair scores stay on disk; the transfer reopens the store on next use


on_free_memory(_offload_outputs)


def free_memory_caches():
    """Empty every in-memory cache of the pack and give the VRAM back (what ComfyUI's "free memory" triggers)."""
    for hook in _free_hooks:
        hook()
    comfy.model_management.soft_empty_cache()


def install_free_memory_hook():
    """Empty the pack's caches whenever ComfyUI unloads all models: the "Unload models" / "Free memory" buttons
    (POST /free, handled by main.prompt_worker), an out-of-memory error, and --disable-smart-memory after
    each prompt. ComfyUI offers no hook for this, so ``comfy.model_management.unload_all_models`` (which
    all of those call) is wrapped; core's behaviour is unchanged, the caches are emptied after it."""
    original = comfy.model_management.unload_all_models
    if getattr(original, "lorax_wrapped", False):
        return

    @functools.wraps(original)
    def unload_all_models(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        finally:
            free_memory_caches()

    unload_all_models.lorax_wrapped = True
    comfy.model_management.unload_all_models = unload_all_models


def _inside(path: str, folders) -> bool:
    for folder in folders:
        root = os.path.realpath(folder)
        try:
            if os.path.commonpath([root, path]) == root:
                return True
        except ValueError:      # another drive (Windows)
            continue
    return False


def checked_path(text: str, kind: str, input_name: str) -> str:
    """The real path of a file typed into ``input_name``, if it lies in one of ComfyUI's ``kind`` folders
    (links resolved first), or anywhere with ``LORAX_ALLOW_ANY_PATH=1``. Otherwise one refusal that says
    nothing about the server's files: not whether the path exists, nor where it leads."""
    path = os.path.realpath(os.path.expanduser(text.strip()))
    if os.environ.get(ALLOW_ANY_PATH_ENV) == "1" or _inside(path, folder_paths.get_folder_paths(kind)):
        return path
    raise NodeError(f"{input_name}: only files inside ComfyUI's models/{kind} folders can be read; choose the "
                    f"file from the list, or start ComfyUI with {ALLOW_ANY_PATH_ENV}=1 to allow any path")


def listed_file(kind: str, name: str, input_name: str) -> str:
    """The full path of a file chosen from ComfyUI's list of ``kind`` files (as core's loaders resolve it)."""
    path = folder_paths.get_full_path(kind, name)
    if path is None:
        raise NodeError(f"{input_name}: {name!r} was not found in the {kind} folders")
    return path


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
        self._lock = threading.Lock()      # the engine hashes in parallel threads
        self._pruned_size = 0

    def _memoised(self, t: torch.Tensor) -> str | None:
        memo = self._memo.get(id(t))
        return memo[2] if memo is not None and memo[0]() is t and memo[1] == _version(t) else None

    def known(self, t: torch.Tensor) -> bool:
        return self._memoised(t) is not None

    def __call__(self, t: torch.Tensor) -> str:
        fp = self._memoised(t)
        if fp is not None:
            return fp
        fp = tensor_fingerprint(t)
        with self._lock:
            if len(self._memo) > 2 * self._pruned_size:     # drop dead tensors now and then, not on every call
                self._memo = {k: v for k, v in self._memo.items() if v[0]() is not None}
                self._pruned_size = len(self._memo)
            self._memo[id(t)] = (weakref.ref(t), _version(t), fp)
        return fp


_fingerprints = _Fingerprints()


class PatcherWeights:
    """The engine's BaseModelWeights over a MODEL (and optionally a CLIP) as ComfyUI holds them.

    Reads the unpatched base weights (``get_key_patches`` returns the backup when the model is currently
    patched), so LoRAs already applied to the inputs do not leak into the subspaces. Nothing is modified.
    """

    def __init__(self, model, clip=None):
        self.name = UNKNOWN_MODEL       # a MODEL input does not know its file
        config = type(model.model.model_config).__name__
        self.architecture = _ARCHITECTURES.get(config, "unknown")
        self.architecture_evidence = f"ComfyUI detects it as {config}"
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
        """float32 ``[m, prod(rest)]`` on the device the weight sits on (no round trip through the host when
        the model is on the GPU: the bases are computed there)."""
        t = self._tensor(key)
        return as_matrix(t, t.device)

    def first_row(self, key: str) -> torch.Tensor:
        """Row 0 of :meth:`matrix` with only that row cast to float32: the comparison by value tries first rows of
        every same-shape pair that no stored score settles (~1000 per SDXL transfer, warm ones too), and casting
        whole weights for them took the main thread ~1 s of the first transfer after a ComfyUI restart (2-core VM,
        py-spy). The weight's converter (dequantising ops) still sees the whole weight: a slice of a packed weight
        is not its first row."""
        t = self._tensor(key)
        return as_matrix(t[:1], t.device)[0]

    def fingerprint(self, key: str) -> str:
        return _fingerprints(self._weights[key][0])

    def missing_fingerprints(self, keys) -> list[str]:
        """Those of ``keys`` whose tensor has not been hashed (the engine hashes them in parallel threads)."""
        return [k for k in dict.fromkeys(keys) if not _fingerprints.known(self._weights[k][0])]
