"""The ComfyUI test harness itself: in-process import, model detection of the zoo's tiny checkpoints, ComfyUI's
own LoRA patching checked against an independent computation, and the headless server end to end."""
from __future__ import annotations

import json

import comfy_harness
import pytest
import torch
from safetensors.torch import load_file

STRENGTH_MODEL, STRENGTH_CLIP = 0.7, 0.4


@pytest.fixture(scope="module")
def sd15_lora(zoo, tmp_path_factory):
    return zoo.make_sd15_lora(tmp_path_factory.mktemp("lora") / "zoo_style.safetensors", rank=8, seed=3)


def test_comfy_fixture_is_comfyui_on_cpu(comfy):
    assert comfy.nodes.__file__.startswith(str(comfy_harness.COMFY_DIR))
    assert comfy.sd.__file__.startswith(str(comfy_harness.COMFY_DIR))
    assert comfy.model_management.get_torch_device().type == "cpu"
    assert "LoraLoader" in comfy.nodes.NODE_CLASS_MAPPINGS


@pytest.mark.parametrize("name, config_class, model_class, has_clip", [
    ("tiny_sd15", "SD15", "BaseModel", True),
    ("tiny_sdxl", "SDXL", "SDXL", False),
    ("tiny_vega", "Segmind_Vega", "SDXL", False),
])
def test_tiny_checkpoints_are_detected_like_the_real_models(comfy, zoo, comfy_logs, name, config_class,
                                                            model_class, has_clip):
    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(zoo.checkpoint(name)), output_vae=False,
                                                                  output_clip=True)
    assert type(model.model.model_config).__name__ == config_class
    assert type(model.model).__name__ == model_class
    assert (clip is not None) == has_clip
    assert not [m for m in comfy_logs.messages() if "clip missing" in m]
    # the weights ComfyUI loaded are the zoo's values (fp16 on disk, cast to the model dtype on CPU)
    key = "input_blocks.1.0.in_layers.2.weight"
    loaded = model.model.diffusion_model.state_dict()[key]
    torch.testing.assert_close(loaded.float(), zoo.weight(name, "model.diffusion_model." + key).float(),
                               rtol=0, atol=0)


def test_load_lora_for_models_patches_w0_plus_scaled_delta(comfy, zoo, sd15_lora, comfy_logs):
    lora_sd = load_file(str(sd15_lora))
    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(zoo.checkpoint("tiny_sd15")),
                                                                  output_vae=False, output_clip=True)
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora_sd, STRENGTH_MODEL, STRENGTH_CLIP)
        unet = comfy_harness.patched_weights(comfy, new_model, new_model.model.diffusion_model)
        text = comfy_harness.patched_weights(comfy, new_clip.patcher, new_clip.cond_stage_model)
        text_dtype = new_clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[0].mlp.fc1.weight.dtype

    # expected values from the zoo's own W0 and the LoRA file, independently of ComfyUI
    tiny_shapes = zoo.key_table("tiny_sd15_unet")
    expected_delta = {}
    for lora_key, model_key in zoo.sd15_lora_targets().items():
        up, down = lora_sd[f"{lora_key}.lora_up.weight"].float(), lora_sd[f"{lora_key}.lora_down.weight"].float()
        scale = float(lora_sd[f"{lora_key}.alpha"]) / down.shape[0]
        delta = scale * (up.flatten(1) @ down.flatten(1))
        expected_delta[model_key] = (delta, STRENGTH_MODEL if model_key.startswith("diffusion_model.") else
                                     STRENGTH_CLIP)

    applied_unet = 0
    for key, value in unet.items():
        w0 = zoo.weight("tiny_sd15", "model.diffusion_model." + key).float()
        hit = expected_delta.get("diffusion_model." + key)
        # SD1.5 layers whose shape differs in the tiny model (e.g. its 320-ch middle block) are not merged
        if hit is not None and hit[0].numel() == w0.numel() and tuple(tiny_shapes[key]) == tuple(w0.shape):
            delta, strength = hit
            assert torch.linalg.vector_norm(delta) > 1e-3
            torch.testing.assert_close(value, w0 + strength * delta.reshape(w0.shape), rtol=1e-5, atol=1e-6)
            applied_unet += 1
        else:
            torch.testing.assert_close(value, w0, rtol=0, atol=0, msg=f"{key} changed")
    assert applied_unet == 12          # input_blocks.1.1: 8 attention + 2 ff + proj_in + proj_out

    applied_text = 0
    for key, value in text.items():
        if not key.startswith("clip_l.transformer.text_model."):
            continue                   # text_projection / logit_scale: not in SD1.5 checkpoints
        w0 = zoo.weight("tiny_sd15", "cond_stage_model.transformer." + key[len("clip_l.transformer."):]).float()
        hit = expected_delta.get(key)
        if hit is None:
            torch.testing.assert_close(value, w0, rtol=0, atol=0, msg=f"{key} changed")
        else:
            delta, strength = hit
            # the text encoder is kept in fp16 on CPU: ComfyUI merges in fp32 and rounds once
            expected = (w0 + strength * delta).to(text_dtype).float()
            torch.testing.assert_close(value, expected, rtol=2 ** -10, atol=1e-7)
            applied_text += 1
    assert applied_text == 12 * 6

    not_loaded = comfy_logs.lora_keys_not_loaded()
    assert not [k for k in not_loaded if k.startswith("lora_te_") or "down_blocks_0_attentions_0" in k]
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q.lora_up.weight" in not_loaded


# ---------------------------------------------------------------- server

@pytest.mark.server
def test_server_lists_core_nodes(comfy_server):
    info = comfy_server.object_info()
    for node in ("CheckpointLoaderSimple", "LoraLoader", "LoraLoaderModelOnly", "KSampler", "SaveLatent"):
        assert node in info
    assert comfy_server.get_json("/system_stats")["system"]["comfyui_version"] == "0.3.75"
    assert (comfy_server.base_dir / "custom_nodes" / comfy_harness.PACK_DIR_NAME).resolve() == \
        comfy_harness.REPO_ROOT


@pytest.mark.server
def test_server_runs_checkpoints_with_stock_lora_loader(comfy_server, zoo, sd15_lora):
    sd15 = comfy_server.upload_model("checkpoints", zoo.checkpoint("tiny_sd15"))
    sdxl = comfy_server.upload_model("checkpoints", zoo.checkpoint("tiny_sdxl"))
    lora = comfy_server.upload_model("loras", sd15_lora)
    sd15_prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora,
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a lrxstyle cat"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "latents/harness"}},
    }
    log_start = len(comfy_server.log_text())
    entry = comfy_server.run_prompt(sd15_prompt, timeout=300)
    assert entry["status"]["status_str"] == "success" and "7" in entry["outputs"]
    latents = list((comfy_server.output_dir / "latents").glob("harness*.latent"))
    assert len(latents) == 1
    sample = load_file(str(latents[0]))["latent_tensor"]
    assert sample.shape == (1, 4, 8, 8) and torch.isfinite(sample).all() and sample.std() > 0
    not_loaded = comfy_harness.lora_keys_not_loaded(comfy_server.log_text()[log_start:])
    # the tiny UNet has only SD1.5's first attention stage; the text encoder is the real CLIP-L layout
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q.lora_up.weight" in not_loaded
    assert not [k for k in not_loaded if k.startswith("lora_te_") or "down_blocks_0_attentions_0_" in k]

    sdxl_prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sdxl}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora,
                                                              "strength_model": 1.0}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    entry = comfy_server.run_prompt(sdxl_prompt, timeout=300)
    assert entry["status"]["status_str"] == "success" and "3" in entry["outputs"]


@pytest.mark.server
def test_server_errors_carry_comfyui_text(comfy_server, tmp_path):
    with pytest.raises(comfy_harness.PromptError, match="not_there.safetensors"):
        comfy_server.run_prompt({
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "not_there.safetensors"}},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}})
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + json.dumps({"a": 1}).encode().ljust(16))
    name = comfy_server.upload_model("checkpoints", broken, copy=True)
    with pytest.raises(comfy_harness.PromptError, match=r"node 1 \(CheckpointLoaderSimple\) failed") as err:
        comfy_server.run_prompt({
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}})
    assert err.value.details["node_type"] == "CheckpointLoaderSimple"
