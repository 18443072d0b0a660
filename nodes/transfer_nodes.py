"""The LoRA-X nodes. Each one only translates between ComfyUI values and the engine (lorax_engine)."""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import replace

import comfy.sd
import folder_paths
import torch

from ..lorax_engine.analysis.matching import DEFAULT_POLICY, DEFAULT_THRESHOLD, POLICIES
from ..lorax_engine.analysis.subspaces import DEFAULT_RANK
from ..lorax_engine.errors import OutputPathError
from ..lorax_engine.files.base_weights import CheckpointWeights
from ..lorax_engine.files.compatibility import check_model_pair, check_transfer_inputs
from ..lorax_engine.files.file_memo import file_stamp
from ..lorax_engine.files.keys import UNET_PREFIX
from ..lorax_engine.files.lora import LoraLayer, LoraModel
from ..lorax_engine.files.lora_formats import read_lora, to_kohya_state_dict
from ..lorax_engine.files.output_names import sanitize_stem
from ..lorax_engine.files.provenance import (
    attach,
    format_provenance,
    hash_ahead,
    source_provenance,
    write_lora_with_provenance,
)
from ..lorax_engine.projection.operators import DEFAULT_MODE, MODES
from ..lorax_engine.projection.transfer import (
    TRANSFER_METHODS,
    TransferOptions,
    compute_similarity_map,
    project,
    transfer,
)
from ..lorax_engine.reports.grid import labelled_grid
from ..lorax_engine.reports.plot import plot_similarity
from .comfy_bridge import (
    ComfyProgress,
    NodeError,
    PatcherWeights,
    checked_path,
    display_name,
    engine_device,
    engine_run,
    is_sdxl,
    listed_file,
    memory_budget_bytes,
    on_engine_device,
    on_free_memory,
    subspace_cache,
    user_errors,
)
from .ui_summary import map_summary, transfer_summary

CATEGORY = "LoRA-X"
LORA_TYPE = "LORAX_LORA"               # a canonical LoRA as read from a file (source architecture)
MAP_TYPE = "LORAX_SUBSPACE_MAP"        # per-layer similarities of two base models
PROJECTED_TYPE = "LORAX_PROJECTED_LORA"  # a LoRA projected into the target's subspaces
SAVE_LOCATIONS = ("output", "models/loras/lorax")   # the folder filename_prefix is relative to

OPTIONS_TYPE = "LORAX_OPTIONS"           # the transfer's settings, from LoRA-X Options
DOCS = "docs/method.md"                 # the pack's own page on the method, in its folder

_DEFAULTS = TransferOptions()
MODE_TOOLTIP = ("How each layer's change is adapted to SDXL. auto (default): kept whole where SDXL has the very "
                "same layer (its CLIP-L text encoder), adapted the more the less the layers match. subspace: the "
                "LoRA-X paper's projection as published: strongly filtered, and text-encoder changes lose most of "
                "their strength. subspace+null: keeps more of each change than subspace. direct: copies changes "
                "unadapted wherever shapes agree, as a stock LoRA loader does: for comparison only. More in "
                f"{DOCS}.")


def option_inputs() -> dict:
    """The transfer options' widgets, with the engine's choices and defaults (rank, threshold, policy, method)."""
    return {
        "rank": ("INT", {"default": DEFAULT_RANK, "min": 8, "max": 4096, "step": 8,
                         "tooltip": "How many of each layer's main directions are compared and carried (default "
                                    f"{DEFAULT_RANK}, as in the LoRA-X paper). Higher carries more of the LoRA's "
                                    "change, also where SDXL works differently; lower filters more and is "
                                    "faster."}),
        "threshold": ("FLOAT", {"default": DEFAULT_THRESHOLD, "min": -1.0, "max": 1.0, "step": 0.01,
                                "tooltip": "How alike an SD1.5 layer and its SDXL partner must be for the LoRA's "
                                           "change to be carried (0 = no more alike than chance, 1 = the same). "
                                           "Higher carries fewer layers: a weaker, safer effect; lower carries "
                                           f"more: a stronger effect that may add artefacts. Default "
                                           f"{DEFAULT_THRESHOLD:g}."}),
        "policy": (list(POLICIES), {"default": DEFAULT_POLICY,
                                    "tooltip": "Where each SD1.5 block's change goes in SDXL (SDXL has several "
                                               "blocks for each of SD1.5's). best (default): whole, to the one "
                                               "block most like it. all-above-threshold: to every block alike "
                                               "enough: a stronger, broader effect. spread: shared out over every "
                                               "block of its size: a softer, broader effect."}),
        "method": (list(TRANSFER_METHODS), {"default": _DEFAULTS.method,
                                            "tooltip": "fast (default) or exact: exact skips every shortcut and "
                                                       "takes several times longer for the same picture "
                                                       "(similarities agree within 0.01)."}),
    }


def mode_input():
    return (list(MODES), {"default": DEFAULT_MODE, "tooltip": MODE_TOOLTIP})


def _lora_label(lora: LoraModel) -> str:
    return display_name(lora.source_path) if lora.source_path else "the LoRA"


def _scaled(lora: LoraModel, strength: float) -> LoraModel:
    if strength == 1.0:
        return lora
    layers = {k: LoraLayer(v.up * strength, v.down, v.alpha, v.weight_shape) for k, v in lora.layers.items()}
    return replace(lora, layers=layers, notes=[*lora.notes, f"strength {strength:g} applied when loaded"])


class LoadSourceLoRA:
    DESCRIPTION = ("Reads an SD1.5 LoRA in any common format (kohya LoRA/LoCon, LyCORIS LoHa/LoKr, diffusers, "
                   "PEFT; fp16/bf16/fp32) into LoRA-X's canonical form, on the compute device. The architecture "
                   "is detected from key names and shapes, not from metadata.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (LORA_TYPE, "STRING")
    RETURN_NAMES = ("lora", "summary")
    OUTPUT_TOOLTIPS = ("The LoRA in canonical form, for Subspace Similarity and Project LoRA-X.",
                       "Format, detected architecture, layer count and trigger words.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_name": (folder_paths.get_filename_list("loras"),
                              {"tooltip": "A LoRA file from the models/loras folder (trained on SD1.5)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "Scales the LoRA before transfer (1.0 = as trained)."}),
            },
            "optional": {
                "lora_path": ("STRING", {"default": "", "tooltip": "Optional path to a LoRA file inside the "
                                         "models/loras folders (links resolved); when set it replaces lora_name. "
                                         "Paths elsewhere need LORAX_ALLOW_ANY_PATH=1 when ComfyUI starts."}),
            },
        }

    @staticmethod
    def _path(lora_name, lora_path=""):
        if lora_path and lora_path.strip():
            return checked_path(lora_path, "loras", "lora_path")
        return listed_file("loras", lora_name, "lora_name")

    @classmethod
    def IS_CHANGED(cls, lora_name, strength, lora_path=""):
        # a file replaced under the same name must be read again
        try:
            st = os.stat(cls._path(lora_name, lora_path))
            return f"{st.st_size}:{st.st_mtime_ns}:{strength}"
        except (OSError, NodeError):
            return float("nan")

    @user_errors
    def load(self, lora_name, strength, lora_path=""):
        lora = read_lora(self._path(lora_name, lora_path))
        lora = on_engine_device(_scaled(lora, strength))
        tags = lora.metadata.get("ss_tag_frequency", "")
        # short lines for the node (the canvas does not wrap); the summary output is one line
        name, kind = _lora_label(lora), f"{lora.source_format}, architecture {lora.architecture}"
        layers = f"{len(lora.unet_keys())} UNet + {len(lora.text_keys())} text-encoder layers" + (
            ", trigger words kept" if tags else "")
        return {"ui": {"lorax": [{"verdict": "good" if lora.architecture == "sd1" else "weak",
                                  "lines": [name, kind, layers]}]},
                "result": (lora, f"{name}: {kind}, {layers}")}


class SubspaceSimilarity:
    DESCRIPTION = ("Compares the two base models layer by layer: how alike each SD1.5 layer is to every SDXL "
                   "layer of the same kind and size, on a scale where 0 is what unrelated layers share by chance "
                   "and 1 is the same. Reads the base weights as loaded (LoRAs already applied to the inputs are "
                   f"ignored). How the scores are made: {DOCS}.")
    CATEGORY = CATEGORY
    FUNCTION = "compare"
    RETURN_TYPES = (MAP_TYPE, "IMAGE", "STRING")
    RETURN_NAMES = ("subspace_map", "plot", "summary")
    OUTPUT_TOOLTIPS = ("The per-layer similarities and layer matching, for Project LoRA-X.",
                       "Per-layer best score grouped by block, with the threshold and chance level.",
                       "Readable per-layer table.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "source_model": ("MODEL", {"tooltip": "The model the LoRA was trained on (SD1.5)."}),
                "target_model": ("MODEL", {"tooltip": "The model to carry the LoRA to (SDXL)."}),
                **option_inputs(),
            },
            "optional": {
                "source_clip": ("CLIP", {"tooltip": "Source text encoder, to carry the LoRA's text-encoder "
                                                    "layers too (SD1.5 CLIP-L -> SDXL CLIP-L)."}),
                "target_clip": ("CLIP", {"tooltip": "Target text encoder (SDXL)."}),
                "lora": (LORA_TYPE, {"tooltip": "Optional: compare only the layers this LoRA touches "
                                                "(much faster than the whole model)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @user_errors
    def compare(self, source_model, target_model, rank, threshold, policy, method, source_clip=None,
                target_clip=None, lora=None, unique_id=None):
        # a MODEL input does not tell which file it came from: the report says so rather than invent a name
        source = PatcherWeights(source_model, source_clip)
        target = PatcherWeights(target_model, target_clip)
        if lora is not None:
            check_transfer_inputs(lora, source, target, lora_name=_lora_label(lora))
        else:
            check_model_pair(source, target)
        options = TransferOptions(rank=rank, method=method, threshold=threshold, policy=policy,
                                  device=engine_device())
        with engine_run() as should_stop:
            smap = compute_similarity_map(source, target, options, lora=lora, cache=subspace_cache(),
                                          progress=ComfyProgress(unique_id), should_stop=should_stop)
        image = plot_similarity(smap.plot_rows(), threshold=threshold,
                                title=f"LoRA-X similarity {source.architecture} -> {target.architecture}, r={rank}")
        summary = map_summary(smap, threshold)
        text = "\n".join(summary["lines"])
        return {"ui": {"lorax": [summary]},
                "result": (smap, torch.from_numpy(image).float().unsqueeze(0), text)}


class ProjectLoRAX:
    DESCRIPTION = ("Carries each LoRA layer to the SDXL layer it was matched with, adapting its change to that "
                   "layer (the mode says how). Layers with no SDXL counterpart, or too unlike theirs, are dropped "
                   f"and the report says why. The method: {DOCS}.")
    CATEGORY = CATEGORY
    FUNCTION = "project"
    RETURN_TYPES = (PROJECTED_TYPE, "STRING")
    RETURN_NAMES = ("projected_lora", "report")
    OUTPUT_TOOLTIPS = ("The LoRA in the target's layer names and shapes, for Apply / Save.",
                       "Per-layer report: similarities, energy kept, applied or why not.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": (LORA_TYPE, {"tooltip": "The source LoRA (from Load Source LoRA)."}),
                "subspace_map": (MAP_TYPE, {"tooltip": "Layer similarities (from Subspace Similarity)."}),
                "mode": mode_input(),
                "rank_cap": ("INT", {"default": 0, "min": 0, "max": 1024,
                                     "tooltip": "Make the output LoRA smaller by keeping at most this many "
                                                "directions per layer (0 = keep all): a smaller file, a little "
                                                "less of the effect."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @user_errors
    def project(self, lora, subspace_map, mode, rank_cap, unique_id=None):
        check_transfer_inputs(lora, subspace_map.source, subspace_map.target, lora_name=_lora_label(lora))
        options = replace(subspace_map.options, mode=mode, output_rank=rank_cap or None)
        with engine_run() as should_stop:
            projected, report = project(lora, subspace_map, options, progress=ComfyProgress(unique_id),
                                        should_stop=should_stop)
        projected = on_engine_device(projected)
        provenance = source_provenance(lora_path=lora.source_path, memo_dir=subspace_cache().fingerprint_dir)
        attach(projected, report, {**provenance, "lorax.source_format": lora.source_format})
        return {"ui": {"lorax": [transfer_summary(report)]},
                "result": (projected, _report_text(report))}


def _report_text(report) -> str:
    return f"{report.format_table()}\n{format_provenance(report.provenance)}"


def _check_sdxl(model, node: str):
    if not is_sdxl(model):
        kind = type(model.model.model_config).__name__
        raise NodeError(f"{node} needs an SDXL model, but the model input is {kind}; "
                        "connect the SDXL checkpoint's MODEL output")


def apply_projected(model, clip, projected_lora: LoraModel, strength_model: float, strength_clip: float):
    """Patch MODEL and CLIP through ComfyUI's own LoRA loading, as the stock LoRA loader does; returns the
    patched pair and the verdict line."""
    if projected_lora.architecture != "sdxl":
        raise NodeError(f"the projected LoRA is for {projected_lora.architecture!r}, not SDXL; project it "
                        "with an SDXL target model")
    # float32 so the patch equals the projected update exactly (ComfyUI computes patches in float32)
    lora_sd = to_kohya_state_dict(projected_lora, "sdxl", dtype=torch.float32)
    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora_sd, strength_model, strength_clip)
    unet, text = len(projected_lora.unet_keys()), len(projected_lora.text_keys())
    return new_model, new_clip, f"patched {unet} UNet + {text} text-encoder weights"


class ApplyToSDXL:
    DESCRIPTION = ("Applies a projected LoRA to an SDXL MODEL and CLIP through ComfyUI's own LoRA loading "
                   "(comfy.sd.load_lora_for_models), exactly like the stock LoRA loader: it stacks with other "
                   "LoRA loaders and adds no cost per sampling step.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = ("The SDXL model with the LoRA patched in.", "The SDXL CLIP with the LoRA patched in.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SDXL model to patch."}),
                "clip": ("CLIP", {"tooltip": "The SDXL CLIP to patch (text-encoder layers of the LoRA)."}),
                "projected_lora": (PROJECTED_TYPE, {"tooltip": "From Project LoRA-X."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                             "tooltip": "How strongly to modify the diffusion model."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                            "tooltip": "How strongly to modify the text encoder."}),
            },
        }

    @user_errors
    def apply(self, model, clip, projected_lora, strength_model, strength_clip):
        _check_sdxl(model, "Apply to SDXL")
        new_model, new_clip, line = apply_projected(model, clip, projected_lora, strength_model, strength_clip)
        summary = {"verdict": "good" if projected_lora.layers else "none", "lines": [line]}
        return {"ui": {"lorax": [summary]}, "result": (new_model, new_clip)}


class SaveLoRAX:
    DESCRIPTION = ("Saves a projected LoRA as a standard SDXL LoRA (kohya/SAI names and metadata, trigger "
                   "words kept, the source files with their sha256, kohya and ModelSpec hashes) that any loader "
                   "in any UI can apply. Names follow ComfyUI's Save nodes: filename_prefix may hold subfolders "
                   "and a _00001_ counter is added, never overwriting.")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Where the file was written.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "projected_lora": (PROJECTED_TYPE, {"tooltip": "From Project LoRA-X."}),
                "filename_prefix": ("STRING", {"default": "loras/lorax_sdxl",
                                               "tooltip": "File name prefix inside the save_to folder, with "
                                                          "optional subfolders, as in core's Save nodes; a "
                                                          "counter is appended (lorax_sdxl_00001_)."}),
                "save_to": (list(SAVE_LOCATIONS), {"default": SAVE_LOCATIONS[0],
                                                   "tooltip": "output (default), or models/loras/lorax so it "
                                                              "appears in the LoRA loaders' list."}),
            },
        }

    @staticmethod
    def _root(save_to):
        if save_to == SAVE_LOCATIONS[1]:
            return os.path.join(folder_paths.get_folder_paths("loras")[0], "lorax")
        return folder_paths.get_output_directory()

    @staticmethod
    def _target(root: str, filename_prefix: str) -> str:
        """``<root>/<subfolders>/<name>_<counter>_.safetensors`` with core's counter; never an existing file."""
        try:
            folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, root)
        except Exception:       # core raises a bare Exception (and logs the paths) for a prefix leaving the folder
            raise NodeError(f"filename_prefix {filename_prefix!r} leaves the {os.path.basename(root)} folder; "
                            "use a relative name such as loras/lorax_sdxl") from None
        stem = sanitize_stem(name)
        while os.path.lexists(path := os.path.join(folder, f"{stem}_{counter:05}_.safetensors")):
            counter += 1
        return path

    @user_errors
    def save(self, projected_lora, filename_prefix, save_to):
        if save_to not in SAVE_LOCATIONS:
            raise NodeError(f"save_to must be one of {', '.join(SAVE_LOCATIONS)}")
        root = os.path.realpath(self._root(save_to))
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as err:
            raise NodeError(f"{save_to}: the folder cannot be created ({err.strerror or err})") from None
        path = self._target(root, filename_prefix)
        try:
            write_lora_with_provenance(projected_lora, path, architecture=projected_lora.architecture)
        except OutputPathError as err:      # named as chosen (save_to/filename_prefix), not by the server's path
            raise NodeError(str(err).replace(path, os.path.join(save_to, os.path.relpath(path, root)))) from None
        return {"ui": {"lorax": [{"verdict": "good", "lines": [f"saved {os.path.basename(path)}"]}],
                       "text": [path]},
                "result": (path,)}


class _ProjectedMemo:
    """Projected LoRAs of the one-node loader, by (LoRA file, checkpoint file, options, CLIP connected), each
    valid while the target weights it was computed against are unchanged (content fingerprints, memoised per
    live tensor, so checking costs no hashing). Bounded in bytes (``$LORAX_MEMORY_CACHE_MB``), least recently
    used first out; emptied when ComfyUI frees memory."""

    def __init__(self):
        self._entries: OrderedDict = OrderedDict()
        self.hits = 0

    def get(self, key, target: PatcherWeights):
        entry = self._entries.get(key)
        if entry is None or any(k not in target or target.fingerprint(k) != fp for k, fp in entry[2].items()):
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0], entry[1]

    def put(self, key, target: PatcherWeights, result: LoraModel, report):
        considered = {c.target_key for layer in report.layers for c in layer.candidates}
        self._entries[key] = (result, report, {k: target.fingerprint(k) for k in considered if k in target})
        budget, used = memory_budget_bytes(), 0
        for k in reversed(list(self._entries)):
            used += _nbytes(self._entries[k][0])
            if used > budget:
                del self._entries[k]

    def clear(self):
        self._entries.clear()


def _nbytes(lora: LoraModel) -> int:
    return sum(t.numel() * t.element_size() for layer in lora.layers.values() for t in (layer.up, layer.down))


projected_memo = _ProjectedMemo()
on_free_memory(projected_memo.clear)


class TransferOptionsNode:
    DESCRIPTION = ("Settings of the transfer, for Load SD1.5 LoRA into SDXL, for people who tune. Without this node "
                   "the loader uses the values shown here (the defaults). What each setting does to the picture is "
                   f"in its tooltip; the method behind them in {DOCS}.")
    CATEGORY = CATEGORY
    FUNCTION = "options"
    RETURN_TYPES = (OPTIONS_TYPE,)
    RETURN_NAMES = ("options",)
    OUTPUT_TOOLTIPS = ("Connect to the options input of Load SD1.5 LoRA into SDXL.",)

    @classmethod
    def INPUT_TYPES(cls):
        options = option_inputs()
        method = options.pop("method")      # shown last, after the mode
        return {"required": {**options, "mode": mode_input(), "method": method}}

    @user_errors
    def options(self, rank, threshold, policy, mode, method):
        return (TransferOptions(rank=rank, threshold=threshold, policy=policy, mode=mode, method=method),)


class LoadSD15LoRAIntoSDXL:
    DESCRIPTION = ("Loads an SD1.5 LoRA into an SDXL model, where a LoRA loader sits: the LoRA is carried over to "
                   "SDXL with LoRA-X, without training, using the SD1.5 checkpoint it was trained on (read from its "
                   "file, never loaded as a model), then patched in like any LoRA. The node then shows a verdict "
                   "(GOOD / WEAK / NONE) saying how much of the LoRA arrived and what that rests on. The transfer "
                   "is remembered: changing only a strength recomputes nothing but the patch. Settings: connect a "
                   f"LoRA-X Options node (defaults otherwise); what the verdict means: {DOCS}.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "report")
    OUTPUT_TOOLTIPS = ("The SDXL model with the transferred LoRA patched in.",
                       "The SDXL CLIP with the LoRA's text-encoder layers patched in (unchanged without CLIP).",
                       "What was transferred: a short summary, then one row per layer (connect a Preview Any node "
                       "to read it).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SDXL model (from Load Checkpoint)."}),
                "lora_name": (folder_paths.get_filename_list("loras"),
                              {"tooltip": "Your SD1.5 LoRA, from the models/loras folder. An SDXL LoRA needs no "
                                          "transfer: load it with Load LoRA."}),
                "source_checkpoint": (folder_paths.get_filename_list("checkpoints"),
                                      {"tooltip": "The SD1.5 checkpoint the LoRA was trained on, usually "
                                                  "v1-5-pruned-emaonly (.safetensors or .ckpt). The transfer "
                                                  "compares its layers with SDXL's; only the layers the LoRA "
                                                  "touches are read."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                             "tooltip": "How strongly the LoRA changes the image model, as in "
                                                        "Load LoRA (0 and 0: model and CLIP pass through "
                                                        "unchanged)."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                            "tooltip": "How strongly the LoRA changes how prompts are read (the "
                                                       "text encoder), as in Load LoRA."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The SDXL CLIP, for the LoRA's text-encoder layers; without it "
                                             "they are reported as not applied."}),
                "options": (OPTIONS_TYPE, {"tooltip": "Transfer settings from a LoRA-X Options node; without it "
                                                      "the defaults are used."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, lora_name, source_checkpoint, **_):
        # a file replaced under the same name must be transferred again
        try:
            return repr([file_stamp(listed_file(kind, name, kind))
                         for kind, name in (("loras", lora_name), ("checkpoints", source_checkpoint))])
        except (OSError, NodeError):
            return float("nan")

    @user_errors
    def load(self, model, lora_name, source_checkpoint, strength_model, strength_clip, clip=None, options=None,
             unique_id=None):
        if strength_model == 0 and strength_clip == 0:
            # as core's LoRA loader: nothing would be patched, so nothing is transferred
            line = "strengths 0 and 0: model and CLIP pass through unchanged, nothing transferred"
            return {"ui": {"lorax": [{"verdict": "off", "lines": [f"OFF: {line}"]}]}, "result": (model, clip, line)}
        _check_sdxl(model, "Load SD1.5 LoRA into SDXL")
        lora_path = listed_file("loras", lora_name, "lora_name")
        checkpoint_path = listed_file("checkpoints", source_checkpoint, "source_checkpoint")
        options = replace(options or TransferOptions(), device=engine_device())
        target = PatcherWeights(model, clip)
        key = (file_stamp(lora_path), file_stamp(checkpoint_path), options, clip is not None)
        hit = projected_memo.get(key, target)
        if hit is None:
            result, report = self._transfer(lora_path, lora_name, checkpoint_path, source_checkpoint, target,
                                            options, unique_id)
            projected_memo.put(key, target, result, report)
        else:
            result, report = hit
        new_model, new_clip, line = apply_projected(model, clip, result, strength_model, strength_clip)
        summary = transfer_summary(report)
        summary["lines"].append(line)
        if clip is None and any(not layer.source_key.startswith(UNET_PREFIX) for layer in report.layers):
            summary["lines"].append("text encoder: not applied (no CLIP connected)")
        summary["reused"] = hit is not None
        if hit is not None:
            summary["lines"].append("transfer reused: only the patch was recomputed")
        return {"ui": {"lorax": [summary]}, "result": (new_model, new_clip, _report_text(report))}

    @staticmethod
    def _transfer(lora_path, lora_name, checkpoint_path, checkpoint_name, target, options, unique_id):
        cache = subspace_cache()
        lora = read_lora(lora_path)
        with CheckpointWeights(checkpoint_path, fingerprint_dir=cache.fingerprint_dir, name=checkpoint_name) as source:
            # names and shapes only: a wrong file is refused before anything is hashed or computed
            check_transfer_inputs(lora, source, target, lora_name=lora_name, source_family="sd1",
                                  target_family="sdxl")
            hash_ahead(lora_path, checkpoint_path, memo_dir=cache.fingerprint_dir)
            with engine_run() as should_stop:
                # the LoRA's copy on the compute device lives only as long as the transfer: its VRAM goes back with
                # the transfer's temporaries
                result, report = transfer(lora.to(engine_device()), source, target, options, cache=cache,
                                          progress=ComfyProgress(unique_id), should_stop=should_stop)
        # remembered across runs and patched from the CPU (as ComfyUI keeps LoRA patches): no VRAM held after this
        result = result.to("cpu")
        provenance = source_provenance(lora_path=lora_path, source_model=checkpoint_path,
                                       memo_dir=cache.fingerprint_dir)
        attach(result, report, {**provenance, "lorax.source_format": lora.source_format})
        return result, report


class ComparisonGrid:
    DESCRIPTION = ("Puts up to four image batches side by side under text labels, one row per image of the "
                   "batch: the way to compare SDXL without the LoRA, the SD1.5 LoRA through a stock loader and "
                   "the LoRA-X transfer with the same prompts and seeds.")
    CATEGORY = CATEGORY
    FUNCTION = "grid"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("grid",)
    OUTPUT_TOOLTIPS = ("One labelled image: columns are the inputs, rows the images of each batch.",)
    MAX_COLUMNS = 4

    @classmethod
    def INPUT_TYPES(cls):
        image = ("IMAGE", {"tooltip": "A batch of images for one column."})
        return {
            "required": {
                "image_1": image,
                "labels": ("STRING", {"default": "no LoRA | stock loader | LoRA-X",
                                      "tooltip": "Column labels separated by '|', in input order."}),
            },
            "optional": {f"image_{i}": image for i in range(2, cls.MAX_COLUMNS + 1)},
        }

    def grid(self, image_1, labels, **more):
        columns = [image_1] + [more[f"image_{i}"] for i in range(2, self.MAX_COLUMNS + 1)
                               if more.get(f"image_{i}") is not None]
        names = [s.strip() for s in labels.split("|")]
        out = labelled_grid([c.detach().float().cpu().numpy() for c in columns], names)
        return (torch.from_numpy(out).unsqueeze(0),)
