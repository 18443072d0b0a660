"""The LoRA-X nodes. Each one only translates between ComfyUI values and the engine (lorax_engine)."""
from __future__ import annotations

import os
from dataclasses import replace

import comfy.sd
import folder_paths
import torch

from ..lorax_engine.analysis.matching import DEFAULT_POLICY, DEFAULT_THRESHOLD, POLICIES
from ..lorax_engine.analysis.subspaces import DEFAULT_RANK
from ..lorax_engine.files.lora import LoraLayer, LoraModel
from ..lorax_engine.files.lora_formats import read_lora, to_kohya_state_dict, write_lora
from ..lorax_engine.files.output_names import unique_output_path
from ..lorax_engine.projection.operators import DEFAULT_MODE, MODES
from ..lorax_engine.projection.transfer import (
    TRANSFER_METHODS,
    TransferOptions,
    compute_similarity_map,
    project,
)
from ..lorax_engine.reports.grid import labelled_grid
from ..lorax_engine.reports.plot import plot_similarity
from .comfy_bridge import (
    ComfyProgress,
    NodeError,
    PatcherWeights,
    compute_device,
    engine_device,
    is_sdxl,
    stop_if_cancelled,
    subspace_cache,
    user_errors,
)
from .ui_summary import map_summary, transfer_summary

CATEGORY = "LoRA-X"
LORA_TYPE = "LORAX_LORA"               # a canonical LoRA as read from a file (source architecture)
MAP_TYPE = "LORAX_SUBSPACE_MAP"        # per-layer similarities of two base models
PROJECTED_TYPE = "LORAX_PROJECTED_LORA"  # a LoRA projected into the target's subspaces
SAVE_LOCATIONS = ("output/loras", "models/loras/lorax")


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
                "lora_path": ("STRING", {"default": "", "tooltip": "Optional full path to a LoRA file "
                                         "outside models/loras; when set it replaces lora_name."}),
            },
        }

    @staticmethod
    def _path(lora_name, lora_path=""):
        if lora_path and lora_path.strip():
            return os.path.expanduser(lora_path.strip())
        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            raise NodeError(f"LoRA {lora_name!r} was not found in the loras folders")
        return path

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
        lora = _scaled(lora, strength).to(compute_device())
        tags = lora.metadata.get("ss_tag_frequency", "")
        summary = (f"{os.path.basename(lora.source_path or lora_name)}: {lora.source_format}, architecture "
                   f"{lora.architecture}, {len(lora.unet_keys())} UNet + {len(lora.text_keys())} text-encoder layers"
                   + (", trigger words kept" if tags else ""))
        return {"ui": {"lorax": [{"verdict": "good" if lora.architecture == "sd1" else "weak",
                                  "lines": [summary[:80]]}]},
                "result": (lora, summary)}


class SubspaceSimilarity:
    DESCRIPTION = ("Compares the base models layer by layer: the top-r singular subspaces of each SD1.5 weight "
                   "against every SDXL candidate of the same role and width (LoRA-X, METHOD §1 and §4). Scores "
                   "are chance-normalised: 0 = what two random subspaces share, 1 = the same subspace. Reads the "
                   "unpatched base weights; LoRAs already applied to the inputs are ignored.")
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
                "rank": ("INT", {"default": DEFAULT_RANK, "min": 8, "max": 4096, "step": 8,
                                 "tooltip": "r: size of the singular subspaces compared and projected onto "
                                            "(the paper uses 320)."}),
                "threshold": ("FLOAT", {"default": DEFAULT_THRESHOLD, "min": -1.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Minimum normalised score for a layer pair to be used "
                                                   "(0 = chance level, 1 = identical subspaces)."}),
                "policy": (list(POLICIES), {"default": DEFAULT_POLICY,
                                            "tooltip": "best: each source layer to its most similar target "
                                                       "layer; all-above-threshold: to every target above the "
                                                       "threshold; spread: to every target of its stage, "
                                                       "strength divided by their count."}),
                "method": (list(TRANSFER_METHODS), {"default": "fast",
                                                    "tooltip": "fast: randomised SVD to score candidates, "
                                                               "Gram-matrix SVD (within ~5e-4 of exact) to project; "
                                                               "exact: exact SVD for both."}),
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
        source = PatcherWeights(source_model, source_clip, name="source model")
        target = PatcherWeights(target_model, target_clip, name="target model")
        options = TransferOptions(rank=rank, method=method, threshold=threshold, policy=policy,
                                  device=engine_device())
        smap = compute_similarity_map(source, target, options, lora=lora, cache=subspace_cache(),
                                      progress=ComfyProgress(unique_id), should_stop=stop_if_cancelled)
        rows = smap.plot_rows()
        image = plot_similarity(rows, threshold=threshold,
                                title=f"LoRA-X similarity {source.architecture} -> {target.architecture}, r={rank}")
        summary = map_summary(rows, threshold)
        text = "\n".join(summary["lines"])
        return {"ui": {"lorax": [summary]},
                "result": (smap, torch.from_numpy(image).float().unsqueeze(0), text)}


class ProjectLoRAX:
    DESCRIPTION = ("Projects each LoRA layer into the matched target layer's principal subspaces "
                   "(LoRA-X, paper Eq. 3, on the factors: B' = U U^T B, A' = A V V^T). Layers without a "
                   "counterpart or below the threshold are dropped and reported.")
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
                "mode": (list(MODES), {"default": DEFAULT_MODE,
                                       "tooltip": "subspace: paper Eq. 3 (default); subspace+null: also "
                                                  "carries the part outside the source subspace into the "
                                                  "target's complement; direct: baseline copy where shapes "
                                                  "agree (what a stock loader does), for comparison only."}),
                "rank_cap": ("INT", {"default": 0, "min": 0, "max": 1024,
                                     "tooltip": "Cap each output layer's rank by truncated SVD (0 = no cap)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @user_errors
    def project(self, lora, subspace_map, mode, rank_cap, unique_id=None):
        options = replace(subspace_map.options, mode=mode, output_rank=rank_cap or None)
        projected, report = project(lora, subspace_map, options, progress=ComfyProgress(unique_id),
                                    should_stop=stop_if_cancelled)
        projected.metadata.update(lora_provenance(lora))
        return {"ui": {"lorax": [transfer_summary(report)]},
                "result": (projected, report.format_table())}


def lora_provenance(lora: LoraModel) -> dict[str, str]:
    return {"lorax.source_file": os.path.basename(lora.source_path or ""),
            "lorax.source_format": lora.source_format}


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
        if not is_sdxl(model):
            kind = type(model.model.model_config).__name__
            raise NodeError(f"Apply to SDXL needs an SDXL model, but the model input is {kind}; "
                            "connect the SDXL checkpoint's MODEL output")
        if projected_lora.architecture != "sdxl":
            raise NodeError(f"the projected LoRA is for {projected_lora.architecture!r}, not SDXL; project it "
                            "with an SDXL target model")
        # float32 so the patch equals the projected update exactly (ComfyUI computes patches in float32)
        lora_sd = to_kohya_state_dict(projected_lora, "sdxl", dtype=torch.float32)
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora_sd, strength_model, strength_clip)
        unet, text = len(projected_lora.unet_keys()), len(projected_lora.text_keys())
        summary = {"verdict": "good" if unet + text else "none",
                   "lines": [f"patched {unet} UNet + {text} text-encoder weights"]}
        return {"ui": {"lorax": [summary]}, "result": (new_model, new_clip)}


class SaveLoRAX:
    DESCRIPTION = ("Saves a projected LoRA as a standard SDXL LoRA (kohya/SAI names and metadata, trigger "
                   "words kept) that any loader in any UI can apply. Never overwrites: a counter is added.")
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
                "filename": ("STRING", {"default": "lorax_sdxl",
                                        "tooltip": "File name (without folders); unsafe characters are replaced."}),
                "save_to": (list(SAVE_LOCATIONS), {"default": SAVE_LOCATIONS[0],
                                                   "tooltip": "output/loras (default), or models/loras/lorax "
                                                              "so it appears in the LoRA loaders' list."}),
            },
        }

    @staticmethod
    def _folder(save_to):
        if save_to == SAVE_LOCATIONS[1]:
            return os.path.join(folder_paths.get_folder_paths("loras")[0], "lorax")
        return os.path.join(folder_paths.get_output_directory(), "loras")

    @user_errors
    def save(self, projected_lora, filename, save_to):
        if save_to not in SAVE_LOCATIONS:
            raise NodeError(f"save_to must be one of {', '.join(SAVE_LOCATIONS)}")
        folder = self._folder(save_to)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise NodeError(f"{folder}: the output folder cannot be created ({err.strerror or err})") from None
        path = unique_output_path(folder, filename)
        write_lora(projected_lora, path, architecture=projected_lora.architecture)
        return {"ui": {"lorax": [{"verdict": "good", "lines": [f"saved {path.name}"]}],
                       "text": [str(path)]},
                "result": (str(path),)}


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
