"""The example workflows through the real headless ComfyUI server with this pack installed, on synthetic
checkpoints that ComfyUI detects as SD15 and SDXL."""
from __future__ import annotations

import json

import pytest
import torch
from comfy_harness import REPO_ROOT, load_ui_summary
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
    # unrelated synthetic models score near chance (as SD1.5 vs SDXL may): apply every candidate; a rank no other
    # prompt of the session uses, so ComfyUI cannot answer the Project node from its cache
    prompt["4"]["inputs"].update(rank=72, threshold=-1.0)
    # the session's server is shared: a name no other test saves, so the counter starts at 1
    prompt["7"]["inputs"]["filename_prefix"] = "loras/server_test_convert"
    log_start = len(server.log_text())   # the session's server is shared; other tests use the stock loader
    history = server.run_prompt(prompt, timeout=900)
    assert history["status"]["status_str"] == "success"
    summary = history["outputs"]["6"]["lorax"][0]
    # every candidate of the chosen blocks applies; the tiny zoo's unrelated random UNets score near chance
    assert summary["verdict"] == "weak" and summary["applied"] > 0
    assert summary["lines"][1].startswith("  median score 0.0")
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


def _engine_report(zoo, lora_path, source, target):
    """The engine's own transfer of ``lora_path`` with the shipped defaults."""
    from lorax_engine.analysis.subspaces import SubspaceCache
    from lorax_engine.files.base_weights import CheckpointWeights
    from lorax_engine.files.lora_formats import read_lora
    from lorax_engine.projection.transfer import TransferOptions, transfer

    with CheckpointWeights(zoo.checkpoint(source)) as src, CheckpointWeights(zoo.checkpoint(target)) as tgt:
        return transfer(read_lora(lora_path), src, tgt, TransferOptions(), cache=SubspaceCache())


@pytest.mark.slow
def test_flagship_workflow_end_to_end_with_its_shipped_settings(server, zoo):
    """lorax_sd15_lora_to_sdxl as shipped (rank 320, threshold 0.05, best, auto, fast): only the file names and the
    image size and steps change. The Project node's verdict is the engine's own on the same files; the LoRA's
    text-encoder layers meet SDXL's CLIP-L, the same weights, and arrive whole; the image is rendered."""
    server.upload_model("checkpoints", zoo.checkpoint("demo_sdxl"), "demo_sdxl_flagship.safetensors")
    prompt = _shrink(_api("lorax_sd15_lora_to_sdxl"))
    shipped = {k: v["inputs"] for k, v in _api("lorax_sd15_lora_to_sdxl").items()}
    assert {k: shipped["4"][k] for k in ("rank", "threshold", "policy", "method")} == {
        "rank": 320, "threshold": 0.05, "policy": "best", "method": "fast"}
    assert shipped["6"]["mode"] == "auto" and shipped["6"]["rank_cap"] == 0
    prompt["2"]["inputs"]["ckpt_name"] = "demo_sdxl_flagship.safetensors"
    outputs = server.run_prompt(prompt, timeout=1500)["outputs"]
    _, report = _engine_report(zoo, server.base_dir / "models" / "loras" / LORA_NAME, "tiny_sd15", "demo_sdxl")
    expected = load_ui_summary().transfer_summary(report)
    project = outputs["6"]["lorax"][0]
    assert project["lines"] == expected["lines"] and project["verdict"] == expected["verdict"] == "weak"
    assert project["identical_layers"] == 66 and "66 layers on identical weights arrive whole" in project["lines"]
    assert outputs["7"]["lorax"][0]["lines"] == [
        f"patched {report.summary()['applied'] - 66} UNet + 66 text-encoder weights"]
    assert outputs["5"]["images"] and outputs["13"]["images"]


@pytest.mark.slow
def test_one_node_text_to_image_workflow_patches_the_engine_transfer_and_reuses_it(server, zoo):
    """ComfyUI's default SDXL text-to-image graph with the one-node loader where a LoRA loader sits, as shipped (no
    LoRA-X Options node: the defaults): an image, the verdict on the node (the engine's own on the same files), the
    report in the workflow's Preview Any node, MODEL patched with W0 + strength * ΔW of the engine's own transfer; a
    second prompt changing only the strength reuses the transfer, and after POST /free (unload models) it is
    computed again."""
    server.upload_model("checkpoints", zoo.checkpoint("demo_sdxl"), "demo_sdxl_one_node.safetensors")
    prompt = _shrink(_api("lorax_sdxl_text_to_image"))
    prompt["1"]["inputs"]["ckpt_name"] = "demo_sdxl_one_node.safetensors"
    loader = prompt["2"]["inputs"]
    assert "options" not in loader
    loader["strength_model"] = STRENGTH
    prompt["90"] = {"class_type": "ModelSave", "inputs": {"model": ["2", 0], "filename_prefix": "one_node/unet"}}
    history = server.run_prompt(prompt, timeout=1200)
    outputs = history["outputs"]
    image = outputs["8"]["images"][0]
    with Image.open(server.output_dir / image["subfolder"] / image["filename"]) as img:
        assert img.size == (64, 64)

    lora_path = server.base_dir / "models" / "loras" / LORA_NAME
    expected, report = _engine_report(zoo, lora_path, "tiny_sd15", "demo_sdxl")
    verdict = outputs["2"]["lorax"][0]
    summary = load_ui_summary().transfer_summary(report)
    text_layers = len([k for k in expected.layers if not k.startswith("diffusion_model.")])
    assert verdict["verdict"] == summary["verdict"] == "weak" and not verdict["reused"]
    assert verdict["lines"] == [*summary["lines"], f"patched {len(expected.layers) - text_layers} UNet + "
                                                   f"{text_layers} text-encoder weights"]
    [shown] = outputs["9"]["text"]          # the report, in the workflow's Preview Any node: summary first
    assert shown.splitlines()[0] == ("LoRA-X auto: v1-5-pruned-emaonly.safetensors (sd1) -> unknown (ComfyUI MODEL "
                                     "input) (sdxl)")
    assert any(line.split() == ["layer", "sent", "to", "similarity", "kept", "changed", "result"]
               for line in shown.splitlines())
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
    assert again["lines"][:-1] == verdict["lines"]
    status, _ = server.post_json("/free", {"unload_models": True})
    assert status == 200
    loader["strength_model"] = 0.25
    after_free = server.run_prompt(prompt, timeout=1200)["outputs"]["2"]["lorax"][0]
    assert not after_free["reused"] and after_free["applied"] == verdict["applied"]
