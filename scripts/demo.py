"""End-to-end demo: synthetic SD1.5 + SDXL checkpoints and an SD1.5 LoRA, run through a headless ComfyUI with
this pack installed.

    .venv/bin/python scripts/demo.py [WORKFLOW.json] [--models tiny|full] [--out DIR]

WORKFLOW is an API-format prompt (default: workflows/api/lorax_sd15_lora_to_sdxl.json when present, else a
built-in prompt that loads both checkpoints with ComfyUI's stock LoraLoader). The demo places its files in
the server's model folders under fixed names, which workflows refer to:

    checkpoints/lorax_demo_sd15.safetensors   checkpoints/lorax_demo_sdxl.safetensors
    loras/lorax_demo_sd15_style.safetensors   (kohya SD1.5 LoRA, trigger word "lrxstyle")
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

import lorax_zoo  # noqa: E402
from comfy_harness import ComfyServer, PromptError, lora_keys_not_loaded  # noqa: E402

DEFAULT_WORKFLOW = REPO_ROOT / "workflows" / "api" / "lorax_sd15_lora_to_sdxl.json"
SD15_NAME = "lorax_demo_sd15.safetensors"
SDXL_NAME = "lorax_demo_sdxl.safetensors"
LORA_NAME = "lorax_demo_sd15_style.safetensors"
ZOO_MODELS = {"tiny": ("tiny_sd15", "tiny_sdxl"), "full": ("sd15", "sdxl")}


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow", nargs="?", type=Path,
                        help="API-format workflow JSON (default: %(default)s if present, else built in)")
    parser.add_argument("--models", choices=sorted(ZOO_MODELS), default="tiny",
                        help="tiny: small models ComfyUI detects as SD1.5/SDXL (default); full: real sizes "
                             "(6.8 GB SDXL file, needs ~16 GB RAM)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "demo", help="demo folder (%(default)s)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed for the prompt")
    args = parser.parse_args(argv)

    workflow = args.workflow or (DEFAULT_WORKFLOW if DEFAULT_WORKFLOW.is_file() else None)
    if workflow is not None:
        prompt, source = json.loads(workflow.read_text()), str(workflow)
    else:
        prompt, source = builtin_prompt(), "built-in prompt (stock nodes)"

    start = time.perf_counter()
    sd15_zoo, sdxl_zoo = ZOO_MODELS[args.models]
    print(f"[demo] synthetic checkpoints ({args.models}) in {lorax_zoo.cache_dir()}")
    lorax_zoo.build([sd15_zoo, sdxl_zoo])
    lora = lorax_zoo.make_sd15_lora(args.out / LORA_NAME, rank=32, seed=0)
    print(f"[demo] synthetic SD1.5 LoRA: {lora}")

    base = args.out / "comfyui"
    shutil.rmtree(base, ignore_errors=True)
    server = ComfyServer(base)
    print(f"[demo] starting ComfyUI (base directory {base})")
    with server:
        print(f"[demo] ComfyUI is up at {server.url}; running {source}")
        server.upload_model("checkpoints", lorax_zoo.checkpoint(sd15_zoo), SD15_NAME)
        server.upload_model("checkpoints", lorax_zoo.checkpoint(sdxl_zoo), SDXL_NAME)
        server.upload_model("loras", lora, LORA_NAME)
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
        print(f"[demo] ComfyUI logged 'lora key not loaded' for {len(not_loaded)} LoRA modules")
    outputs = sorted(p for p in server.output_dir.rglob("*") if p.is_file())
    print(f"[demo] outputs ({len(outputs)} files) in {server.output_dir}:")
    for path in outputs:
        print(f"  {path.relative_to(server.output_dir)}")
    print(f"[demo] server log: {server.log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
