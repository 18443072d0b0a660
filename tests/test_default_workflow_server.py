"""A shipped example workflow, run through the headless server with its own defaults (threshold, mode, policy,
rank, method), on a pair that is built like the real one: SD1.5 with its CLIP-L stored in float32 (as
v1-5-pruned-emaonly has it) and SDXL whose CLIP-L is that encoder cast to float16. METHOD §2's identity axiom:
the text-encoder layers must arrive whole on SDXL's CLIP-L; the last layer, which SDXL does not read, is reported
and not written."""
from __future__ import annotations

import json

import pytest
import torch
from comfy_harness import REPO_ROOT

from lorax_engine.files.lora_formats import read_lora

pytestmark = [pytest.mark.server, pytest.mark.slow]

WORKFLOW = REPO_ROOT / "workflows" / "api" / "lorax_convert_and_save.json"
SOURCE, TARGET, LORA = "sd15_fp32_clip_default.safetensors", "sdxl_trained_default.safetensors", \
    "default_workflow_lora.safetensors"


def test_convert_and_save_with_its_defaults_keeps_text_encoder_layers_whole(comfy_server, zoo, tmp_path):
    lora_path = zoo.make_sd15_lora(tmp_path / LORA, rank=8, seed=21, cover="full")
    comfy_server.upload_model("checkpoints", zoo.checkpoint("tiny_sd15_trained"), SOURCE)
    comfy_server.upload_model("checkpoints", zoo.checkpoint("demo_sdxl_trained"), TARGET)
    comfy_server.upload_model("loras", lora_path, LORA)
    prompt = json.loads(WORKFLOW.read_text())
    shipped = {k: dict(v["inputs"]) for k, v in prompt.items()}
    # only the file names change: every transfer setting stays as shipped
    prompt["1"]["inputs"]["ckpt_name"] = SOURCE
    prompt["2"]["inputs"]["ckpt_name"] = TARGET
    prompt["3"]["inputs"]["lora_name"] = LORA
    prompt["7"]["inputs"]["filename_prefix"] = "loras/default_workflow_check"
    assert shipped["4"]["threshold"] == 0.05 and shipped["6"]["mode"] == "auto" and shipped["4"]["policy"] == "best"
    history = comfy_server.run_prompt(prompt, timeout=1500)
    assert history["status"]["status_str"] == "success"

    source = read_lora(lora_path)
    saved = read_lora(history["outputs"]["7"]["text"][0])
    text = [k for k in source.layers if k.startswith("clip_l.")]
    used = [k for k in text if ".layers.11." not in k]
    assert len(used) == 66 and len(text) == 72            # 6 modules x 12 layers; SDXL reads layer 10's output
    for key in used:
        # whole: the same update, only rounded to the file's fp16 factors
        torch.testing.assert_close(saved.layers[key].delta().float(), source.layers[key].delta().float(),
                                   rtol=2e-3, atol=1e-6)
    assert not any(".layers.11." in k for k in saved.layers if k.startswith("clip_l."))
    summary = history["outputs"]["6"]["lorax"][0]
    assert summary["identical_layers"] == len(used)
    assert any("arrive whole" in line for line in summary["lines"])
