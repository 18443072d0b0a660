"""The pack's nodes run in-process on real ComfyUI ModelPatchers (tiny SD15 and SDXL checkpoints that ComfyUI
detects as such): the similarity map, projection, Apply (through ComfyUI's own LoRA loading) and Save."""
from __future__ import annotations

import hashlib

import comfy_harness
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

STRENGTH = 0.8


@pytest.fixture(scope="module")
def models(comfy, zoo):
    with torch.inference_mode():
        sd15, sd15_clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(zoo.checkpoint("tiny_sd15")),
                                                                      output_vae=False, output_clip=True)
        sdxl, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(zoo.checkpoint("tiny_sdxl")),
                                                              output_vae=False, output_clip=False)
    return sd15, sd15_clip, sdxl


@pytest.fixture(scope="module")
def lora_file(zoo, tmp_path_factory):
    return zoo.make_sd15_lora(tmp_path_factory.mktemp("loras") / "style.safetensors", rank=8, seed=5)


def _run(node_cls, **inputs):
    node = node_cls()
    with torch.inference_mode():
        out = getattr(node, node_cls.FUNCTION)(**inputs)
    return out["result"] if isinstance(out, dict) else out, (out.get("ui") if isinstance(out, dict) else None)


def test_nodes_transfer_and_apply_like_the_stock_loader(comfy, pack, models, lora_file, comfy_logs, tmp_path,
                                                        monkeypatch):
    monkeypatch.setattr(comfy.folder_paths, "output_directory", str(tmp_path))
    fnp = comfy.folder_paths.folder_names_and_paths    # lora_path may name files of the loras folders only
    monkeypatch.setitem(fnp, "loras", ([str(lora_file.parent)], fnp["loras"][1]))
    nodes = pack.NODE_CLASS_MAPPINGS
    sd15, sd15_clip, sdxl = models
    (lora, summary), _ = _run(nodes["LoRAX_LoadSourceLoRA"], lora_name="ignored", strength=1.0,
                              lora_path=str(lora_file))
    assert "architecture sd1" in summary
    (smap, plot, text), ui = _run(nodes["LoRAX_SubspaceSimilarity"], source_model=sd15, target_model=sdxl,
                                  rank=64, threshold=-1.0, policy="best", method="fast", lora=lora)
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3
    assert 0.0 <= float(plot.min()) and float(plot.max()) <= 1.0
    # threshold -1: every layer with a candidate passes; the tiny zoo's unrelated random UNets score near chance
    with_candidates = sum(bool(e.similarities) for e in smap.entries.values())
    summary = ui["lorax"][0]
    assert summary["verdict"] == "weak" and abs(summary["median_score"]) < 0.05
    assert summary["lines"][:2] == [f"WEAK: {with_candidates}/{len(lora.layers)} layers above threshold -1",
                                    f"no counterpart: {len(lora.layers) - with_candidates}"]
    (projected, report_text), ui = _run(nodes["LoRAX_ProjectLoRA"], lora=lora, subspace_map=smap,
                                        mode="subspace", rank_cap=0)
    assert projected.architecture == "sdxl"
    assert projected.layers, report_text
    # every layer of the chosen block passes threshold -1 (the unrelated tiny UNets score ~0); cross-attention k/v
    # of the 320-channel tiny SDXL read a 2048-wide context
    kv = [k for k in projected.layers if k.endswith("attn2.to_k.weight")]
    assert kv and all(projected.layers[k].weight_shape == (320, 2048) for k in kv)

    (patched, _), _ = _run(nodes["LoRAX_ApplyToSDXL"], model=sdxl, clip=None, projected_lora=projected,
                           strength_model=STRENGTH, strength_clip=STRENGTH)
    assert comfy_logs.lora_keys_not_loaded() == []
    after = comfy_harness.patched_weights(comfy, patched)
    for key, layer in projected.layers.items():
        short = key[len("diffusion_model."):]
        w0 = sdxl.model.diffusion_model.state_dict()[short].float()
        expected = w0 + STRENGTH * (layer.scale * layer.up.float() @ layer.down.float()).reshape(w0.shape)
        torch.testing.assert_close(after[short], expected, rtol=1e-4, atol=1e-5)

    (path,), ui = _run(nodes["LoRAX_SaveLoRA"], projected_lora=projected, filename_prefix="loras/my name",
                       save_to="output")
    assert path == str(tmp_path / "loras" / "my name_00001_.safetensors")
    (path2,), _ = _run(nodes["LoRAX_SaveLoRA"], projected_lora=projected, filename_prefix="loras/my name",
                       save_to="output")
    assert path2 == str(tmp_path / "loras" / "my name_00002_.safetensors")
    with pytest.raises(Exception, match="filename_prefix '../../evil' leaves the "):
        _run(nodes["LoRAX_SaveLoRA"], projected_lora=projected, filename_prefix="../../evil", save_to="output")
    written = load_file(path)
    assert len([k for k in written if k.endswith(".lora_up.weight")]) == len(projected.layers)
    with safe_open(path, "pt") as f:       # provenance travels with the file, as with the command line
        meta = f.metadata()
    assert meta["lorax.mode"] == "subspace" and meta["lorax.layers_applied"] == str(len(projected.layers))
    # the real LoRA file with its sha256; the models came as MODEL inputs, whose files cannot be known
    assert meta["lorax.source_lora"] == "style.safetensors"
    assert meta["lorax.source_lora_sha256"] == hashlib.sha256(lora_file.read_bytes()).hexdigest()
    assert meta["lorax.source_model"] == meta["lorax.target_model"] == "unknown (ComfyUI MODEL input)"
    data = open(path, "rb").read()
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def test_apply_refuses_a_non_sdxl_model(pack, models, lora_file):
    nodes = pack.NODE_CLASS_MAPPINGS
    sd15, _, _ = models
    from lorax_engine.files.lora import LoraModel
    with pytest.raises(Exception, match="needs an SDXL model"):
        _run(nodes["LoRAX_ApplyToSDXL"], model=sd15, clip=None, projected_lora=LoraModel({}, "sdxl"),
             strength_model=1.0, strength_clip=1.0)
