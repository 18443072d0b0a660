"""The example workflows through the real headless ComfyUI server with this pack installed, on synthetic
checkpoints that ComfyUI detects as SD15 and SDXL."""
from __future__ import annotations

import json

import pytest
import torch
from comfy_harness import REPO_ROOT
from PIL import Image
from safetensors.torch import load_file
from workflow_format import ui_to_api

pytestmark = pytest.mark.server

WORKFLOWS = REPO_ROOT / "workflows"
STRENGTH = 0.75
SD15_NAME = "v1-5-pruned-emaonly.safetensors"
SDXL_NAME = "sd_xl_base_1.0.safetensors"
LORA_NAME = "my_sd15_style_lora.safetensors"


def _api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def server(comfy_server, zoo, tmp_path_factory):
    lora = zoo.make_sd15_lora(tmp_path_factory.mktemp("lora") / LORA_NAME, rank=8, seed=11)
    comfy_server.upload_model("checkpoints", zoo.checkpoint("tiny_sd15"), SD15_NAME)
    comfy_server.upload_model("checkpoints", zoo.checkpoint("tiny_sdxl"), SDXL_NAME)
    comfy_server.upload_model("loras", lora, LORA_NAME)
    return comfy_server


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.json")), ids=lambda p: p.stem)
def test_ui_workflow_matches_its_api_twin(server, path):
    object_info = server.object_info()
    ui = json.loads(path.read_text())
    assert all(node["type"] in object_info for node in ui["nodes"])

    def strip(api):
        return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}

    assert strip(ui_to_api(ui, object_info)) == strip(_api(path.stem))


def _output_file(server, suffix_dir: str, pattern: str):
    found = sorted((server.output_dir / suffix_dir).glob(pattern))
    assert found, f"nothing matching {pattern} in {server.output_dir / suffix_dir}"
    return found[-1]


def test_convert_and_save_workflow_patches_like_the_stock_loader(server, zoo, comfy_logs):
    prompt = _api("lorax_convert_and_save")
    # the same graph also applies the projection and saves the patched UNet with ComfyUI's ModelSave,
    # so the patched weights can be compared with base + strength * dW of the saved LoRA file
    prompt["90"] = {"class_type": "LoRAX_ApplyToSDXL", "inputs": {
        "model": ["2", 0], "clip": ["2", 1], "projected_lora": ["6", 0],
        "strength_model": STRENGTH, "strength_clip": STRENGTH}}
    prompt["91"] = {"class_type": "ModelSave", "inputs": {"model": ["90", 0], "filename_prefix": "patched/unet"}}
    # unrelated synthetic models score near chance (as SD1.5 vs SDXL may): apply every candidate
    prompt["4"]["inputs"].update(rank=64, threshold=-1.0)
    # the session's server is shared: a name no other test saves, so the counter starts at 1
    prompt["7"]["inputs"]["filename_prefix"] = "loras/server_test_convert"
    log_start = len(server.log_text())   # the session's server is shared; other tests use the stock loader
    history = server.run_prompt(prompt, timeout=900)
    assert history["status"]["status_str"] == "success"
    if "6" in history["outputs"]:          # absent when an earlier prompt left Project's result cached
        summary = history["outputs"]["6"]["lorax"][0]
        assert summary["applied"] > 0 and summary["verdict"] in ("good", "weak")
    saved = history["outputs"]["7"]["text"][0]
    assert saved.endswith("/loras/server_test_convert_00001_.safetensors")

    lora_sd = load_file(saved)
    patched = load_file(str(_output_file(server, "patched", "unet*.safetensors")))
    base = load_file(str(zoo.checkpoint("tiny_sdxl")))
    prefix = "model.diffusion_model."
    downs = [k for k in lora_sd if k.endswith(".lora_down.weight")]
    assert downs
    key_map = zoo.lora_key_map("sdxl")
    for down_key in downs:
        name = down_key[: -len(".lora_down.weight")]
        model_key = key_map[name][len("diffusion_model."):]
        down = lora_sd[down_key].float().flatten(1)
        up = lora_sd[f"{name}.lora_up.weight"].float().flatten(1)
        scale = float(lora_sd[f"{name}.alpha"]) / down.shape[0]
        w0 = base[prefix + model_key].float()
        expected = w0 + STRENGTH * (scale * up @ down).reshape(w0.shape)
        got = patched[prefix + model_key].float()
        # the LoRA file stores fp16 factors; the applied ones were float32
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-3 * float(expected.abs().max()))
    untouched = [k for k in base if k.startswith(prefix) and k[len(prefix):] not in
                 {key_map[d[: -len('.lora_down.weight')]][len('diffusion_model.'):] for d in downs}]
    for key in untouched[:50]:
        torch.testing.assert_close(patched[key].float(), base[key].float(), rtol=0, atol=0)
    assert "lora key not loaded" not in server.log_text()[log_start:]


def _shrink(prompt: dict) -> dict:
    """CPU-sized run of a workflow: 64 px latents, 2 sampler steps."""
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        if node["class_type"] == "KSampler":
            inputs["steps"] = 2
    return prompt


@pytest.mark.slow
def test_comparison_workflow_renders_the_labelled_grid(server, zoo):
    """The comparison workflow contains the whole text-to-image workflow (Apply -> CLIP Text Encode -> KSampler
    -> VAE Decode) plus the stock-loader and no-LoRA columns, so it is the one rendered here (CPU time)."""
    workflow = "lorax_compare_side_by_side"
    # demo_sdxl: the tiny SDXL UNet with both real-size SDXL text encoders and a VAE, so every node runs
    server.upload_model("checkpoints", zoo.checkpoint("demo_sdxl"), "demo_sdxl_full.safetensors")
    prompt = _shrink(_api(workflow))
    prompt["2"]["inputs"]["ckpt_name"] = "demo_sdxl_full.safetensors"
    prompt["4"]["inputs"].update(rank=64, threshold=-1.0)
    history = server.run_prompt(prompt, timeout=1200)
    assert history["status"]["status_str"] == "success"
    outputs = history["outputs"]
    assert outputs["5"]["images"], "the similarity plot reaches the Preview Image node"
    project = outputs["6"]["lorax"][0]
    assert project["applied"] > 0
    # the SD1.5 text encoder LoRA layers reach SDXL's CLIP-L (identical weights: score 1)
    apply = outputs["7"]["lorax"][0]["lines"][0]
    assert "text-encoder" in apply and not apply.endswith("+ 0 text-encoder weights")
    saved = outputs["41"]["images"]
    image_path = server.output_dir / saved[0]["subfolder"] / saved[0]["filename"]
    from lorax_engine.reports.grid import GAP, LABEL_HEIGHT
    with Image.open(image_path) as grid:
        # three labelled 64 px columns, one row
        assert grid.size == (3 * 64 + 2 * GAP, LABEL_HEIGHT + 64)
        pixels = torch.frombuffer(bytearray(grid.convert("RGB").tobytes()), dtype=torch.uint8)
    pixels = pixels.reshape(LABEL_HEIGHT + 64, -1, 3)[LABEL_HEIGHT:].int()
    no_lora, lorax = pixels[:, :64], pixels[:, 2 * (64 + GAP):]
    # same prompt and seed: the LoRA-X column differs from the no-LoRA one only through the LoRA
    changed = (no_lora - lorax).abs().amax(dim=2) > 2
    assert float(changed.float().mean()) > 0.05, "the LoRA-X column is (almost) the no-LoRA image"
    assert "comparison_grid" in saved[0]["filename"]


@pytest.mark.slow
def test_one_node_text_to_image_workflow_patches_the_engine_transfer_and_reuses_it(server, zoo):
    """ComfyUI's default SDXL text-to-image graph with the one-node loader where a LoRA loader sits: an image,
    the verdict on the node, MODEL patched with W0 + strength * ΔW of the engine's own transfer; a second prompt
    changing only the strength reuses the transfer, and after POST /free (unload models) it is computed again."""
    from lorax_engine.analysis.subspaces import SubspaceCache
    from lorax_engine.files.base_weights import CheckpointWeights
    from lorax_engine.files.lora_formats import read_lora
    from lorax_engine.projection.transfer import TransferOptions, transfer

    server.upload_model("checkpoints", zoo.checkpoint("demo_sdxl"), "demo_sdxl_one_node.safetensors")
    prompt = _shrink(_api("lorax_sdxl_text_to_image"))
    prompt["1"]["inputs"]["ckpt_name"] = "demo_sdxl_one_node.safetensors"
    loader = prompt["2"]["inputs"]
    loader.update(rank=64, threshold=-1.0, strength_model=STRENGTH)
    prompt["90"] = {"class_type": "ModelSave", "inputs": {"model": ["2", 0], "filename_prefix": "one_node/unet"}}
    history = server.run_prompt(prompt, timeout=1200)
    outputs = history["outputs"]
    image = outputs["8"]["images"][0]
    with Image.open(server.output_dir / image["subfolder"] / image["filename"]) as img:
        assert img.size == (64, 64)
    verdict = outputs["2"]["lorax"][0]
    assert verdict["verdict"] in ("good", "weak") and verdict["applied"] > 0 and not verdict["reused"]

    options = TransferOptions(rank=64, threshold=-1.0, policy=loader["policy"], mode=loader["mode"],
                              method=loader["method"])
    lora_path = server.base_dir / "models" / "loras" / LORA_NAME
    with CheckpointWeights(zoo.checkpoint("tiny_sd15")) as source, \
            CheckpointWeights(zoo.checkpoint("demo_sdxl")) as target:
        expected, _ = transfer(read_lora(lora_path), source, target, options, cache=SubspaceCache())
    patched = load_file(str(_output_file(server, "one_node", "unet*.safetensors")))
    base = load_file(str(zoo.checkpoint("demo_sdxl")))
    unet = {k: v for k, v in expected.layers.items() if k.startswith("diffusion_model.")}
    assert unet
    for key, layer in unet.items():
        w0 = base["model." + key].float()
        want = w0 + STRENGTH * (layer.scale * layer.up.float() @ layer.down.float()).reshape(w0.shape)
        torch.testing.assert_close(patched["model." + key].float(), want, rtol=0,
                                   atol=1e-3 * float(want.abs().max()))

    del prompt["90"]
    loader["strength_model"] = 0.5
    again = server.run_prompt(prompt, timeout=1200)["outputs"]["2"]["lorax"][0]
    assert again["reused"] and again["lines"][-1] == "transfer reused: only the patch was recomputed"
    status, _ = server.post_json("/free", {"unload_models": True})
    assert status == 200
    loader["strength_model"] = 0.25
    after_free = server.run_prompt(prompt, timeout=1200)["outputs"]["2"]["lorax"][0]
    assert not after_free["reused"] and after_free["applied"] == verdict["applied"]
