"""One ComfyUI process doing what a ComfyUI user does (``make bench``'s ``node`` phase; run_bench.py starts it).

ComfyUI in-process (as its server would run it, on ``--device``), the target checkpoint loaded by ComfyUI's own
loader (its Load Checkpoint node), then **Load SD1.5 LoRA into SDXL (LoRA-X)** with the shipped defaults, twice:
the transfer, then the same node with another strength (what a user does next: the transfer is reused, only the
patch is made again). The subspace cache is ``$LORAX_CACHE_DIR`` (run_bench.py points it at the run's folder), so
a first process on an empty cache times a cold transfer and a second process on the same cache times the first
transfer after a ComfyUI restart: in-memory tensors have no file, so their fingerprints are computed again.

Prints one JSON line: seconds of ComfyUI's load, of each node call, the resident memory after the load and the
process's peak, the node's verdict line and whether the second call reused the transfer.

    python bench/node_transfer.py SOURCE_CKPT TARGET_CKPT LORA [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[1:1] = [str(REPO), str(REPO / "tests")]

import comfy_harness  # noqa: E402


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path)
    p.add_argument("target", type=Path)
    p.add_argument("lora", type=Path)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    comfy_harness.ensure_comfy_path()
    from comfy.cli_args import args as comfy_args
    comfy_args.cpu = not args.device.startswith("cuda")
    import comfy.sd
    import folder_paths
    import torch

    pack = comfy_harness.load_pack()
    # the nodes list files from ComfyUI's folders only: the zoo's and the bench's folders become such folders
    folder_paths.add_model_folder_path("checkpoints", str(args.source.parent), is_default=True)
    folder_paths.add_model_folder_path("loras", str(args.lora.parent), is_default=True)
    node = pack.NODE_CLASS_MAPPINGS["LoRAX_LoadSD15LoRAIntoSDXL"]()
    out = {}
    with torch.inference_mode():        # as ComfyUI's executor runs nodes
        t0 = time.perf_counter()
        model, clip = comfy.sd.load_checkpoint_guess_config(str(args.target), output_vae=False)[:2]
        out["comfy_load_s"] = time.perf_counter() - t0
        out["rss_after_load_gb"] = rss_gb()
        for tag, strength in (("node_s", 1.0), ("node_again_s", 0.8)):
            t0 = time.perf_counter()
            result = node.load(model=model, clip=clip, lora_name=args.lora.name, source_checkpoint=args.source.name,
                               strength_model=strength, strength_clip=strength)
            out[tag] = time.perf_counter() - t0
            summary = result["ui"]["lorax"][0]
            out["verdict"], out["reused_again"] = summary["lines"][0], summary["reused"]
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
