"""On a CUDA GPU, where users run the pack: the example workflow's nodes in-process with ComfyUI on the GPU, the
engine's transfer on cuda against the CPU's, and the command line's default device. Skipped without a GPU;
``make gpu-check`` runs them on the lent GPU machine (scripts/gpu_check.sh), also with ComfyUI's --lowvram
(``LORAX_TEST_LOWVRAM=1``).

ComfyUI chooses its device once, when ``comfy.model_management`` is first imported, so these tests need a
process of their own (``pytest -m cuda``): after the CPU-only ``comfy`` fixture has run they skip.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import comfy_harness
import pytest
import torch
from inprocess_workflow import place_model_files, run_nodes
from safetensors.torch import load_file

from lorax_engine.analysis.subspaces import SubspaceCache
from lorax_engine.cli import build_parser
from lorax_engine.files.base_weights import CheckpointWeights
from lorax_engine.files.lora_formats import read_lora, to_kohya_state_dict
from lorax_engine.projection.transfer import TransferOptions, compute_similarity_map, project, transfer

DEVICE = "cuda"
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check runs these)")]

STRENGTH = 0.75
SCORE_BOUND, DW_BOUND = 0.01, 1e-2     # METHOD §2b: normalised scores and projected updates (relative Frobenius)


def _devices(lora) -> set[str]:
    return {t.device.type for layer in lora.layers.values() for t in (layer.up, layer.down)}


@pytest.fixture(scope="module")
def comfy_gpu():
    """ComfyUI in-process on the GPU (``LORAX_TEST_LOWVRAM=1``: as with --lowvram)."""
    mm = sys.modules.get("comfy.model_management")
    if mm is None:
        comfy_harness.ensure_comfy_path()
        from comfy.cli_args import args
        args.lowvram = os.environ.get("LORAX_TEST_LOWVRAM") == "1"
        import comfy.model_management as mm  # noqa: F401  chooses the GPU now, from args
    if mm.get_torch_device().type != DEVICE:
        pytest.skip("ComfyUI was imported on the CPU earlier in this process: run `pytest -m cuda` on its own")
    return comfy_harness.import_comfy()      # its args.cpu = True comes after the device was chosen


@pytest.fixture(scope="module")
def pack(comfy_gpu):
    return comfy_harness.load_pack()


def test_example_workflow_runs_on_the_gpu_with_tensors_kept_there(comfy_gpu, pack, zoo, tmp_path, monkeypatch):
    """workflows/api/lorax_sd15_lora_to_sdxl.json in-process (64 px, 2 steps, every candidate applied): the LoRA,
    the energies and the projection stay on the GPU between the nodes, the patched weights are W0 + s * ΔW there,
    Save writes CPU tensors, and freeing memory moves the pack's outputs to the CPU."""
    comfy = comfy_gpu
    bridge = sys.modules[f"{pack.__name__}.nodes.comfy_bridge"]
    monkeypatch.setattr(bridge, "_cache", SubspaceCache(directory=tmp_path / "cache"))
    monkeypatch.setattr(comfy.folder_paths, "output_directory", str(tmp_path / "output"))
    lora_file = zoo.make_sd15_lora(tmp_path / "style.safetensors", rank=8, seed=11)
    place_model_files(monkeypatch, comfy.folder_paths, tmp_path, {
        "checkpoints": {"v1-5-pruned-emaonly.safetensors": zoo.checkpoint("tiny_sd15"),
                        "sd_xl_base_1.0.safetensors": zoo.checkpoint("demo_sdxl")},
        "loras": {"my_sd15_style_lora.safetensors": lora_file}})
    prompt = json.loads((comfy_harness.REPO_ROOT / "workflows" / "api" / "lorax_sd15_lora_to_sdxl.json").read_text())
    prompt["90"] = {"class_type": "LoRAX_SaveLoRA", "inputs": {"projected_lora": ["6", 0],
                                                                "filename_prefix": "loras/gpu", "save_to": "output"}}
    out = run_nodes(comfy, pack, prompt, ["12", "90"], overrides={
        "4": {"threshold": -1.0}, "7": {"strength_model": STRENGTH, "strength_clip": STRENGTH},
        "10": {"width": 64, "height": 64}, "11": {"steps": 2}})

    lora, smap, projected, patched = out["3"][0], out["4"][0], out["6"][0], out["7"][0]
    assert _devices(lora) == _devices(projected) == {DEVICE}
    assert smap.options.device.startswith(DEVICE)
    assert projected.layers and all(e.energies for e in smap.entries.values() if e.candidates.targets)
    image = out["12"][0]
    assert image.shape == (1, 64, 64, 3) and bool(torch.isfinite(image).all())

    expected_file = to_kohya_state_dict(projected, "sdxl")      # what Save wrote, from the GPU factors
    assert {t.device.type for t in expected_file.values()} == {"cpu"}
    written = load_file(out["90"][0])
    assert all(torch.equal(written[k], t) for k, t in expected_file.items())

    with torch.inference_mode():
        comfy.model_management.load_models_gpu([patched], force_full_load=True)
        after = patched.model.diffusion_model.state_dict()
        base = load_file(str(zoo.checkpoint("demo_sdxl")), device=DEVICE)
        unet = [k for k in projected.layers if k.startswith("diffusion_model.")]
        assert unet
        for key in unet:
            short = key[len("diffusion_model."):]
            assert after[short].device.type == DEVICE, key
            expected = base[f"model.{key}"].float() + STRENGTH * projected.layers[key].delta_weight()
            torch.testing.assert_close(after[short].float(), expected, rtol=1e-3, atol=1e-4)
    del after, base

    comfy.model_management.unload_all_models()          # "Free memory": the pack's outputs leave VRAM
    assert _devices(lora) == _devices(projected) == {"cpu"}


def test_one_node_loader_transfers_on_the_gpu_and_patches_there(comfy_gpu, pack, zoo, tmp_path, monkeypatch):
    """Load SD1.5 LoRA into SDXL with the GPU as ComfyUI's device (every candidate applied): the transfer runs on
    the GPU, its result is remembered on the CPU (no VRAM held between prompts), the patched weights on the GPU are
    W0 + s * ΔW of that result, and a strength change reuses it without a transfer."""
    comfy = comfy_gpu
    bridge = sys.modules[f"{pack.__name__}.nodes.comfy_bridge"]
    memo = sys.modules[f"{pack.__name__}.nodes.transfer_nodes"].projected_memo
    monkeypatch.setattr(bridge, "_cache", SubspaceCache(directory=tmp_path / "cache"))
    memo.clear()
    hits = memo.hits
    place_model_files(monkeypatch, comfy.folder_paths, tmp_path, {
        "checkpoints": {"v1-5-pruned-emaonly.safetensors": zoo.checkpoint("tiny_sd15")},
        "loras": {"style.safetensors": zoo.make_sd15_lora(tmp_path / "style.safetensors", rank=8, seed=11)}})
    options = pack.NODE_CLASS_MAPPINGS["LoRAX_Options"]().options(rank=64, threshold=-1.0, policy="best",
                                                                   mode="auto", method="fast")[0]
    node = pack.NODE_CLASS_MAPPINGS["LoRAX_LoadSD15LoRAIntoSDXL"]()
    with torch.inference_mode():
        model = comfy.sd.load_checkpoint_guess_config(str(zoo.checkpoint("tiny_sdxl")), output_vae=False,
                                                      output_clip=False)[0]
        first, again = (node.load(model=model, lora_name="style.safetensors",
                                  source_checkpoint="v1-5-pruned-emaonly.safetensors", strength_model=strength,
                                  strength_clip=1.0, options=options) for strength in (STRENGTH, 0.3))
    assert not first["ui"]["lorax"][0]["reused"] and again["ui"]["lorax"][0]["reused"] and memo.hits == hits + 1
    [(result, report, _)] = memo._entries.values()
    assert report.options["device"].startswith(DEVICE) and _devices(result) == {"cpu"}
    unet = [k for k in result.layers if k.startswith("diffusion_model.")]
    assert unet

    patched = first["result"][0]
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([patched], force_full_load=True)
        after = patched.model.diffusion_model.state_dict()
        base = load_file(str(zoo.checkpoint("tiny_sdxl")), device=DEVICE)
        for key in unet:
            short = key[len("diffusion_model."):]
            assert after[short].device.type == DEVICE, key
            expected = base[f"model.{key}"].float() + STRENGTH * result.layers[key].delta_weight().to(DEVICE)
            torch.testing.assert_close(after[short].float(), expected, rtol=1e-3, atol=1e-4)
    del after, base
    comfy.model_management.unload_all_models()


@pytest.mark.parametrize("method", ["fast", "exact"])
def test_engine_transfer_on_cuda_agrees_with_the_cpu(zoo, tmp_path, method):
    """METHOD §2b's bounds between the two devices: scores within 0.01, projected ΔW within 1e-2 (relative
    Frobenius) where both chose the same target, and a different choice only between candidates within 0.01."""
    lora = read_lora(zoo.make_sd15_lora(tmp_path / "lora.safetensors", rank=8, seed=3))
    options = TransferOptions(rank=64, method=method, threshold=-1.0)
    results = {}
    with CheckpointWeights(zoo.checkpoint("tiny_sd15")) as source, \
            CheckpointWeights(zoo.checkpoint("tiny_sdxl")) as target:
        for device in ("cpu", DEVICE):
            results[device] = transfer(lora.to(device), source, target, replace(options, device=device),
                                       cache=SubspaceCache())
        smap = compute_similarity_map(source, target, replace(options, device=DEVICE), lora=lora.to(DEVICE),
                                      cache=SubspaceCache())
        capped, _ = project(lora.to(DEVICE), smap, replace(options, device=DEVICE, output_rank=4))
    (cpu_lora, cpu_report), (gpu_lora, gpu_report) = results["cpu"], results[DEVICE]
    assert _devices(gpu_lora) == _devices(capped) == {DEVICE} and _devices(cpu_lora) == {"cpu"}
    assert all(layer.rank <= 4 for layer in capped.layers.values())

    compared = 0
    for c_layer, g_layer in zip(cpu_report.layers, gpu_report.layers, strict=True):
        c_scores = {c.target_key: c.similarity["score"] for c in c_layer.candidates if c.similarity}
        g_scores = {c.target_key: c.similarity["score"] for c in g_layer.candidates if c.similarity}
        assert c_scores.keys() == g_scores.keys()
        for key in c_scores:
            assert abs(c_scores[key] - g_scores[key]) <= SCORE_BOUND, (c_layer.source_key, key)
        c_applied = {c.target_key for c in c_layer.candidates if c.applied}
        g_applied = {c.target_key for c in g_layer.candidates if c.applied}
        for a, b in zip(sorted(c_applied - g_applied), sorted(g_applied - c_applied), strict=True):
            assert abs(c_scores[a] - c_scores[b]) <= SCORE_BOUND, (c_layer.source_key, a, b)
        compared += len(c_applied & g_applied)
    assert compared
    # a target weight that received the same source layers on both devices holds the same update
    cpu_sources = {t.target_key: t.sources for t in cpu_report.targets}
    same = [t.target_key for t in gpu_report.targets if cpu_sources.get(t.target_key) == t.sources]
    assert same
    for key in same:
        want = cpu_lora.layers[key].delta().double()
        got = gpu_lora.layers[key].delta().double().cpu()
        assert float(torch.linalg.norm(got - want)) <= DW_BOUND * float(torch.linalg.norm(want)), key


def test_command_line_uses_the_gpu_by_default(capsys):
    args = build_parser().parse_args(["transfer", "--source-model", "a", "--target-model", "b", "--lora", "l",
                                      "--out", "o"])
    assert args.device == "cuda"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["transfer", "--help"])
    assert "default: cuda when torch sees a CUDA GPU, else cpu; here cuda" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("method", ["randomized", "gram"])
def test_a_processs_first_gpu_bases_come_from_two_threads_at_once(zoo, method):
    """torch loads its CUDA linear-algebra kernels on first use, and two threads' first uses at once failed with
    "lazy wrapper should be called at most once" (pytorch/pytorch#90613) in every cold GPU transfer: the process
    is fresh, so its first linear algebra is the two basis threads'. Their singular values against float64's."""
    script = """if True:
        import sys, torch
        from lorax_engine.analysis.subspaces import SubspaceCache, SubspaceSpec
        from lorax_engine.files.base_weights import CheckpointWeights
        path, method, device = sys.argv[1:]
        with CheckpointWeights(path) as weights:
            keys = [k for k in weights.keys() if k.endswith(("to_q.weight", "q_proj.weight"))][:6]
            spec = SubspaceSpec(rank=32, method=method, sketch_dtype="float32")
            for key, basis in SubspaceCache().get_many(weights, keys, spec, device=device, workers=2):
                want = torch.linalg.svdvals(weights.matrix(key).double())[:32]
                got = basis.s[:32].double()
                if method == "gram":
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
                else:    # Rayleigh-Ritz values: below the true ones, the largest close to them
                    assert bool((got <= want * (1 + 1e-5)).all()) and float(got[0]) >= 0.9 * float(want[0]), key
        print("bases", len(keys))
    """
    done = subprocess.run([sys.executable, "-c", script, str(zoo.checkpoint("tiny_sd15")), method, DEVICE],
                          capture_output=True, text=True, cwd=comfy_harness.REPO_ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(comfy_harness.REPO_ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["bases", "6"]
