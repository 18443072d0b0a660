"""Regenerate the committed key/shape tables in ``lorax_zoo/tables/`` from ComfyUI's own model classes.

Run once with the project venv (``.venv/bin/python -m lorax_zoo.make_tables``); ``tests/test_zoo.py``
rebuilds the tables in memory and checks they still equal the committed files. This is the only module
of ``lorax_zoo`` that imports ComfyUI; every model is built on ``device="meta"``, so nothing is allocated.

Tables (``{key: shape}`` unless stated):

* ``<arch>_unet``: ``UNetModel`` state-dict keys (no ``model.diffusion_model.`` prefix) for the real SD1.5,
  SDXL, SSD-1B and Segmind Vega configs and the tiny configs that ComfyUI still detects as SD15 / SDXL /
  Segmind_Vega.
* ``clip_l``: CLIP-L as stored in checkpoints (SD1.5 under ``cond_stage_model.transformer.``, SDXL under
  ``conditioner.embedders.0.transformer.``), i.e. ``text_model.*`` without the position ids.
* ``clip_g``: ComfyUI's OpenCLIP-G model under ``clip_g.transformer.`` (HF layout ``text_model.*`` plus
  ``text_projection.weight``): the layout canonical LoRA keys and ``lora_te2_`` names refer to.
* ``clip_g_openclip``: OpenCLIP-G as stored in SDXL checkpoints under ``conditioner.embedders.1.model.``.
* ``vae``: the SD1.x / SDXL AutoencoderKL as stored in checkpoints under ``first_stage_model.``.
* ``sd15_lora_keys`` / ``sdxl_lora_keys``: ``{lora key prefix: model key}`` from
  ``comfy.lora.model_lora_keys_unet`` + ``model_lora_keys_clip``, i.e. every LoRA name ComfyUI accepts.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TABLES_DIR = Path(__file__).resolve().parent / "tables"
COMFY_DIR = Path(__file__).resolve().parent.parent / ".runtime" / "comfyui"

_COMMON = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "in_channels": 4, "model_channels": 320, "use_temporal_attention": False,
           "use_temporal_resblock": False}
_SD15_LIKE = {**_COMMON, "adm_in_channels": None, "use_linear_in_transformer": False, "context_dim": 768,
              "num_heads": 8}
_SDXL_LIKE = {**_COMMON, "num_classes": "sequential", "adm_in_channels": 2816, "use_linear_in_transformer": True,
              "context_dim": 2048, "num_head_channels": 64}

# Full configs as listed in comfy/model_detection.py (unet_config_from_diffusers_unet); the tiny ones are the
# smallest configs ComfyUI's detection still maps to the same model class (COMFYUI.md section C).
UNET_CONFIGS = {
    "sd15_unet": ({**_SD15_LIKE, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
                   "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
                   "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}, "SD15"),
    "sdxl_unet": ({**_SDXL_LIKE, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
                   "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
                   "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]}, "SDXL"),
    "ssd1b_unet": ({**_SDXL_LIKE, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
                    "transformer_depth": [0, 0, 2, 2, 4, 4], "transformer_depth_middle": -1,
                    "transformer_depth_output": [0, 0, 0, 1, 1, 2, 10, 4, 4]}, "SSD1B"),
    "vega_unet": ({**_SDXL_LIKE, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
                   "transformer_depth": [0, 0, 1, 1, 2, 2], "transformer_depth_middle": -1,
                   "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2]}, "Segmind_Vega"),
    "tiny_sd15_unet": ({**_SD15_LIKE, "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1],
                        "transformer_depth_middle": 1, "transformer_depth_output": [1, 1]}, "SD15"),
    "tiny_sdxl_unet": ({**_SDXL_LIKE, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 1, 1],
                        "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 1,
                        "transformer_depth_output": [0, 0, 0, 0, 0, 0, 0, 0, 1]}, "SDXL"),
    "tiny_vega_unet": ({**_SDXL_LIKE, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 1, 1],
                        "transformer_depth": [0, 0, 1, 1, 2, 2], "transformer_depth_middle": 1,
                        "transformer_depth_output": [0, 0, 0, 0, 0, 0, 0, 0, 1]}, "Segmind_Vega"),
}

# The SD1.x / SDXL VAE config comfy/sd.py's VAE builds when a checkpoint has "decoder.conv_in.weight".
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}

# Checkpoint prefixes of the text encoders (what ComfyUI's process_clip_state_dict_for_saving writes).
SD15_CLIP_L_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."


def import_comfy():
    """Import ComfyUI from ``.runtime/comfyui`` on CPU; returns the ``comfy`` package."""
    if str(COMFY_DIR) not in sys.path:
        sys.path.insert(0, str(COMFY_DIR))
    from comfy.cli_args import args
    args.cpu = True
    import comfy.lora
    import comfy.model_detection
    import comfy.sd  # noqa: F401  (registers the model classes)
    import comfy.supported_models  # noqa: F401
    return comfy


def _shapes(sd) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in sd.items()}


def build_model(name: str):
    """(model_config, BaseModel on meta) for a UNET_CONFIGS entry; checks ComfyUI detects the expected class."""
    comfy = import_comfy()
    import torch
    config, expected = UNET_CONFIGS[name]
    config = comfy.model_detection.convert_config({**config, "dtype": torch.float16})
    model_config = comfy.model_detection.model_config_from_unet_config(config)
    if type(model_config).__name__ != expected:
        raise RuntimeError(f"{name}: ComfyUI detects {type(model_config).__name__}, expected {expected}")
    model = model_config.get_model({}, device="meta")
    # ComfyUI re-detects the config from the checkpoint's tensors; it must map back to the same class.
    sd = {"model.diffusion_model." + k: v for k, v in model.diffusion_model.state_dict().items()}
    detected = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    if type(detected).__name__ != expected:
        raise RuntimeError(f"{name}: checkpoint detected as {type(detected).__name__}, expected {expected}")
    return model_config, model


def build_clip(model_config):
    import torch
    target = model_config.clip_target()
    return target.clip(device="meta", dtype=torch.float16)


def _strip(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def build_tables() -> dict[str, dict]:
    """All tables, freshly computed from ComfyUI (nothing is read from or written to disk)."""
    comfy = import_comfy()
    tables = {}
    models = {}
    for name in UNET_CONFIGS:
        models[name] = build_model(name)
        tables[name] = _shapes(models[name][1].diffusion_model.state_dict())

    for arch in ("sd15", "sdxl"):
        model_config, model = models[f"{arch}_unet"]
        clip = build_clip(model_config)
        saved = model_config.process_clip_state_dict_for_saving(dict(clip.state_dict()))
        saved.pop(SDXL_CLIP_L_PREFIX + "text_model.embeddings.position_ids", None)   # int buffer, unused
        if arch == "sd15":
            tables["clip_l"] = _shapes(_strip(saved, SD15_CLIP_L_PREFIX))
        else:
            if _shapes(_strip(saved, SDXL_CLIP_L_PREFIX)) != tables["clip_l"]:
                raise RuntimeError("SDXL's CLIP-L layout differs from SD1.5's")
            tables["clip_g_openclip"] = _shapes(_strip(saved, SDXL_CLIP_G_PREFIX))
            tables["clip_g"] = _shapes(_strip(clip.state_dict(), "clip_g.transformer."))
        key_map = comfy.lora.model_lora_keys_unet(model, {})
        key_map = comfy.lora.model_lora_keys_clip(clip, key_map)
        tables[f"{arch}_lora_keys"] = dict(key_map)
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL
    with torch.device("meta"):
        tables["vae"] = _shapes(AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4).state_dict())
    return {name: dict(sorted(table.items())) for name, table in tables.items()}


def table_text(table: dict) -> str:
    """The committed JSON form of a table (sorted, one entry per line, for readable diffs)."""
    lines = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(table.items())]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main() -> None:
    TABLES_DIR.mkdir(exist_ok=True)
    for name, table in build_tables().items():
        (TABLES_DIR / f"{name}.json").write_text(table_text(table))
        print(f"{name}: {len(table)} entries")


if __name__ == "__main__":
    main()
