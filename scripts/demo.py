"""End-to-end demo: synthetic SD1.5 + SDXL checkpoints and an SD1.5 LoRA, run through a headless ComfyUI with
this pack installed.

    .venv/bin/python scripts/demo.py [WORKFLOW.json] [--models tiny|full] [--size PX] [--steps N] [--out DIR]

WORKFLOW is an API-format prompt (default: workflows/api/lorax_sd15_lora_to_sdxl.json when present, else a
built-in prompt of stock nodes). Whatever model files the workflow names are provided from the zoo:
checkpoint names containing "xl" get the synthetic SDXL, other checkpoints the synthetic SD1.5, every LoRA the
synthetic kohya SD1.5 LoRA (trigger word "lrxstyle"). Latent sizes and sampler steps are capped so the run
takes a minute on CPU. Outputs land in out/demo/comfyui/output.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

from comfy_harness import ComfyServer, PromptError, lora_keys_not_loaded  # noqa: E402

import lorax_zoo  # noqa: E402

DEFAULT_WORKFLOW = REPO_ROOT / "workflows" / "api" / "lorax_sd15_lora_to_sdxl.json"
SD15_NAME = "lorax_demo_sd15.safetensors"
SDXL_NAME = "lorax_demo_sdxl.safetensors"
LORA_NAME = "lorax_demo_sd15_style.safetensors"
# (SD1.5, SDXL) zoo checkpoints; demo_sdxl is the tiny SDXL UNet with real-size text encoders and a VAE
ZOO_MODELS = {"tiny": ("tiny_sd15", "demo_sdxl"), "full": ("sd15", "sdxl")}


def builtin_prompt() -> dict:
    """Stock nodes only: the SD1.5 LoRA on its own model (sampled to a latent) and, as-is, on SDXL."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_NAME}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": LORA_NAME,
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a lrxstyle lighthouse"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 0, "steps": 4, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "lorax_demo/sd15"}},
        "8": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL_NAME}},
        "9": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["8", 0], "lora_name": LORA_NAME,
                                                              "strength_model": 1.0}},
        "10": {"class_type": "PreviewAny", "inputs": {"source": ["9", 0]}},
    }


def model_files(prompt: dict) -> dict[str, tuple[str, str]]:
    """{file name the prompt loads: (models subfolder, role)}: every ``ckpt_name`` / ``source_checkpoint`` /
    ``lora_name`` input.

    Checkpoint names containing "xl" get the synthetic SDXL, other checkpoints the SD1.5 one, and every LoRA
    the synthetic SD1.5 LoRA, so example workflows written for the real models run unchanged.
    """
    files = {}
    for node in prompt.values():
        for name, value in node.get("inputs", {}).items():
            if name in ("ckpt_name", "source_checkpoint") and isinstance(value, str):
                files[value] = ("checkpoints", "sdxl" if "xl" in value.lower() else "sd15")
            elif name == "lora_name" and isinstance(value, str):
                files[value] = ("loras", "lora")
    return files


def shrink_for_cpu(prompt: dict, size: int, steps: int) -> list[str]:
    """Cap latent sizes and sampler steps in place (a 1024 px, 25-step SDXL run takes hours on CPU)."""
    changes = []
    for node_id, node in prompt.items():
        inputs = node.get("inputs", {})
        if node.get("class_type") == "EmptyLatentImage":
            for key in ("width", "height"):
                if isinstance(inputs.get(key), int) and inputs[key] > size:
                    changes.append(f"node {node_id} {key} {inputs[key]} -> {size}")
                    inputs[key] = size
        if node.get("class_type", "").startswith("KSampler") and isinstance(inputs.get("steps"), int) \
                and inputs["steps"] > steps:
            changes.append(f"node {node_id} steps {inputs['steps']} -> {steps}")
            inputs["steps"] = steps
    return changes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow", nargs="?", type=Path,
                        help=f"API-format workflow JSON (default: {DEFAULT_WORKFLOW.relative_to(REPO_ROOT)} "
                             "if present, else a built-in prompt of stock nodes)")
    parser.add_argument("--models", choices=sorted(ZOO_MODELS), default="tiny",
                        help="tiny: small UNets ComfyUI detects as SD1.5/SDXL (default); full: real sizes "
                             "(needs ~16 GB RAM; no VAE, so only for workflows that decode no images)")
    parser.add_argument("--size", type=int, default=64, help="cap on latent image width/height (%(default)s px)")
    parser.add_argument("--steps", type=int, default=2, help="cap on sampler steps (%(default)s)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "demo", help="demo folder (%(default)s)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed for the prompt")
    args = parser.parse_args(argv)

    workflow = args.workflow or (DEFAULT_WORKFLOW if DEFAULT_WORKFLOW.is_file() else None)
    if workflow is not None:
        prompt, source = json.loads(workflow.read_text()), str(workflow)
    else:
        prompt, source = builtin_prompt(), "built-in prompt (stock nodes)"
    for change in shrink_for_cpu(prompt, args.size, args.steps):
        print(f"[demo] for CPU: {change}")

    start = time.perf_counter()
    zoo_names = dict(zip(("sd15", "sdxl"), ZOO_MODELS[args.models], strict=True))
    print(f"[demo] synthetic checkpoints ({args.models}) in {lorax_zoo.cache_dir()}")
    lorax_zoo.build(zoo_names.values())
    lora = lorax_zoo.make_sd15_lora(args.out / "synthetic_sd15_style.safetensors", rank=32, seed=0)
    print(f"[demo] synthetic SD1.5 LoRA (trigger word {lorax_zoo.TRIGGER_WORD!r}): {lora}")

    base = args.out / "comfyui"
    shutil.rmtree(base, ignore_errors=True)
    server = ComfyServer(base)
    print(f"[demo] starting ComfyUI (base directory {base})")
    with server:
        print(f"[demo] ComfyUI is up at {server.url}; running {source}")
        for name, (kind, role) in model_files(prompt).items():
            src = lora if role == "lora" else lorax_zoo.checkpoint(zoo_names[role])
            server.upload_model(kind, src, name)
            print(f"[demo]   models/{kind}/{name} <- {src.name}")
        try:
            entry = server.run_prompt(prompt, timeout=args.timeout)
        except PromptError as err:
            print(f"[demo] the workflow failed:\n{err}\nserver log: {server.log_path}", file=sys.stderr)
            return 1
        print("[demo] stopping ComfyUI")
    print(f"[demo] status: {entry['status']['status_str']} ({time.perf_counter() - start:.0f} s in all)")
    for node_id, ui in entry["outputs"].items():
        text = json.dumps(ui)
        print(f"  node {node_id} ({prompt[node_id]['class_type']}): {text[:300]}{'...' if len(text) > 300 else ''}")
    not_loaded = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
                  for k in lora_keys_not_loaded(server.log_text())}
    if not_loaded:
        print(f"[demo] over the whole run ComfyUI logged 'lora key not loaded' for {len(not_loaded)} LoRA modules")
    outputs = sorted(p for p in server.output_dir.rglob("*") if p.is_file())
    print(f"[demo] outputs ({len(outputs)} files) in {server.output_dir}:")
    for path in outputs:
        print(f"  {path.relative_to(server.output_dir)}")
    print(f"[demo] server log: {server.log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
