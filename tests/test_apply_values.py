"""Apply LoRA-X to SDXL patches the CLIP by value: after the node ran, the real SDXL CLIP's clip_l and clip_g
weights are W0 + strength_clip * ΔW and the UNet's W0 + strength_model * ΔW, with ΔW = alpha/rank * up @ down
computed here (different strengths, so a swap shows)."""
from __future__ import annotations

import comfy_harness
import torch
from test_lora_comfy_roundtrip import TEXT_TARGETS, _patched, _random_lora, _w0, sdxl_clip  # noqa: F401

from lorax_engine.files.lora import LoraModel

STRENGTH_MODEL, STRENGTH_CLIP = 0.6, 1.3
UNET_KEYS = ["diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
             "diffusion_model.output_blocks.2.1.conv.weight"]


def test_apply_patches_clip_l_and_clip_g_by_strength_clip(comfy, zoo, sdxl_clip):  # noqa: F811
    clip, clip_w0 = sdxl_clip
    unet_table = zoo.key_table("tiny_sdxl_unet")
    shapes = {k: unet_table[k[len("diffusion_model."):]] for k in UNET_KEYS}
    shapes.update({k: tuple(v.shape) for k, v in clip_w0.items()})
    layers = _random_lora(shapes, seed=9).layers
    projected = LoraModel(layers, architecture="sdxl", source_format="lorax")
    apply = comfy_harness.load_pack().NODE_CLASS_MAPPINGS["LoRAX_ApplyToSDXL"]
    with torch.inference_mode():
        model, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(zoo.checkpoint("tiny_sdxl")),
                                                               output_vae=False, output_clip=False)
        out = apply().apply(model, clip, projected, STRENGTH_MODEL, STRENGTH_CLIP)
        new_model, new_clip = out["result"]
        text = _patched(comfy, new_clip.patcher, list(clip_w0))
        unet = _patched(comfy, new_model, UNET_KEYS)
        text_dtype = new_clip.cond_stage_model.clip_g.transformer.text_model.encoder.layers[0].mlp.fc1.weight.dtype
    assert {k.split(".")[0] for k in text} == {"clip_l", "clip_g"}
    unet_w0 = _w0(zoo, "tiny_sdxl", UNET_KEYS, lambda k: "model." + k)
    for weights, w0, strength in ((text, clip_w0, STRENGTH_CLIP), (unet, unet_w0, STRENGTH_MODEL)):
        for key, value in weights.items():
            layer = layers[key]
            delta = (layer.alpha / layer.rank) * (layer.up.double() @ layer.down.double())
            expected = (w0[key].double() + strength * delta.reshape(w0[key].shape)).float()
            if key in clip_w0:
                expected = expected.to(text_dtype).float()    # ComfyUI rounds W0 + ΔW once into the weight dtype
            assert float((value - w0[key]).norm()) > 1e-3, key
            torch.testing.assert_close(value, expected, rtol=2 ** -10, atol=1e-6, msg=key)
    assert out["ui"]["lorax"][0]["verdict"] == "good"
