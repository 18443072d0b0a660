"""The synthetic model zoo: tables agree with ComfyUI, checkpoints load as the right models, values have the
promised structure, builds are deterministic and safe under concurrency, and the synthetic LoRA is what a
kohya SD1.5 file looks like to ComfyUI."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorax_zoo import make_tables

UNET = "model.diffusion_model."
CLIP_L_SD15 = "cond_stage_model.transformer."


def _meta_state_dict(zoo, name):
    shapes, dtypes = zoo.checkpoint_keys(name), zoo.checkpoint_dtypes(name)
    return {k: torch.empty(shape, dtype=dtypes[k], device="meta") for k, shape in shapes.items()}


def test_committed_tables_equal_tables_regenerated_from_comfyui(comfy):
    fresh = make_tables.build_tables()
    committed = {p.stem: p for p in make_tables.TABLES_DIR.glob("*.json")}
    assert set(fresh) == set(committed)
    for name, table in fresh.items():
        assert json.loads(committed[name].read_text()) == json.loads(json.dumps(table)), name
        assert committed[name].read_text() == make_tables.table_text(table), f"{name}: not in canonical form"


def test_tables_have_the_documented_sizes(zoo):
    # independent anchors from COMFYUI.md: parameter counts and counts of LoRA names
    params = {name: sum(math.prod(s) for s in zoo.key_table(name).values())
              for name in ("sd15_unet", "sdxl_unet", "clip_l", "clip_g")}
    assert round(params["sd15_unet"] / 1e5) == 8595
    assert round(params["sdxl_unet"] / 1e5) == 25675
    assert len(zoo.key_table("sd15_unet")) == 686 and len(zoo.key_table("sdxl_unet")) == 1680
    assert round(params["clip_l"] / 1e6) == 123
    assert round(sum(math.prod(s) for s in zoo.key_table("vae").values()) / 1e5) == 837    # the SD/SDXL VAE
    assert zoo.key_table("clip_g_openclip")["transformer.resblocks.0.attn.in_proj_weight"] == (3840, 1280)
    assert zoo.key_table("clip_g")["text_model.encoder.layers.31.mlp.fc2.weight"] == (1280, 5120)
    assert sum(k.startswith("lora_unet_") for k in zoo.lora_key_map("sd15")) == 796
    assert sum(k.startswith("lora_unet_") for k in zoo.lora_key_map("sdxl")) == 2110
    with pytest.raises(KeyError, match="lora_key_map"):
        zoo.key_table("sd15_lora_keys")


@pytest.mark.parametrize("name, expected", [("sd15", "SD15"), ("sdxl", "SDXL"), ("sd15_finetune", "SD15"),
                                            ("tiny_sd15", "SD15"), ("tiny_sdxl", "SDXL"),
                                            ("tiny_vega", "Segmind_Vega"), ("demo_sdxl", "SDXL"),
                                            ("sd15_trained", "SD15"), ("sdxl_trained", "SDXL"),
                                            ("sd15_trained_finetune", "SD15"), ("tiny_sd15_trained", "SD15"),
                                            ("demo_sdxl_trained", "SDXL")])
def test_checkpoint_layouts_map_onto_comfyui_models(comfy, zoo, name, expected):
    """ComfyUI detects the layout and maps every tensor of it, text encoders included (no file needed)."""
    sd = _meta_state_dict(zoo, name)
    model_config = comfy.model_detection.model_config_from_unet(sd, UNET)
    assert type(model_config).__name__ == expected
    model = model_config.get_model({}, device="meta")
    unet = {k: tuple(v.shape) for k, v in model.diffusion_model.state_dict().items()}
    assert unet == {k[len(UNET):]: tuple(v.shape) for k, v in sd.items() if k.startswith(UNET)}

    clip_sd = model_config.process_clip_state_dict(dict(sd))
    if not any(not k.startswith(UNET) for k in sd):
        assert clip_sd == {}
        return
    clip_model = model_config.clip_target().clip(device="meta", dtype=torch.float16)
    want = {k: tuple(v.shape) for k, v in clip_model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in clip_sd.items()}
    assert set(got) <= set(want), "keys ComfyUI would not load"
    # ComfyUI itself ignores exactly these when missing (comfy/sd.py load_state_dict_guess_config)
    missing = [k for k in set(want) - set(got) if ".logit_scale" not in k and ".transformer.text_projection." not in k]
    assert missing == []
    assert all(got[k] == want[k] for k in got)


def test_tiny_checkpoint_files_hold_the_zoo_values(zoo):
    path = zoo.checkpoint("tiny_sd15")
    assert path == zoo.checkpoint("tiny_sd15")            # second call: the cached file
    keys = zoo.checkpoint_keys("tiny_sd15")
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(keys)
        meta = f.metadata()
        for key in (UNET + "input_blocks.1.1.proj_in.weight", CLIP_L_SD15 + "text_model.final_layer_norm.bias",
                    CLIP_L_SD15 + "text_model.embeddings.token_embedding.weight"):
            t = f.get_tensor(key)
            assert t.dtype == torch.float16 and tuple(t.shape) == keys[key]
            torch.testing.assert_close(t, zoo.weight("tiny_sd15", key), rtol=0, atol=0)
    assert meta["lorax_zoo.name"] == "tiny_sd15" and meta["lorax_zoo.version"] == str(zoo.ZOO_VERSION)
    assert path.stat().st_size == 8 + int.from_bytes(path.read_bytes()[:8], "little") + \
        2 * sum(math.prod(s) for s in keys.values())


def _svdvals(w):
    """Singular values, descending, via the eigenvalues of the smaller Gram matrix in float64 (LAPACK's SVD
    of a wide 1280 x 23040 matrix takes minutes on 2 cores; this takes a second)."""
    a = w.double().flatten(1)
    gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    return torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().flip(0)


@pytest.mark.parametrize("key", [UNET + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",   # 640x640
                                 UNET + "input_blocks.7.1.transformer_blocks.0.ff.net.0.proj.weight",  # 10240x1280
                                 UNET + "input_blocks.1.0.in_layers.2.weight"])                       # 320x2880
def test_weights_have_a_decaying_spectrum_over_a_noise_floor(zoo, key):
    w = zoo.weight("sd15", key).float()
    m, n = w.shape[0], math.prod(w.shape[1:])
    k = min(m, n, 512)
    assert 0.019 < float(w.std()) < 0.051
    s = _svdvals(w)
    ratio = s[:k // 2] * torch.arange(1, k // 2 + 1) / s[0]          # s_i / s_1 = 1 / i
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0.05, atol=0)
    if len(s) > k:
        assert float(s[k]) < float(s[k - 1]) and float(s[-1]) > 0        # full rank, floor below s_K


def test_values_depend_only_on_seed_namespace_and_key(zoo):
    clip_key = "text_model.encoder.layers.3.self_attn.q_proj.weight"
    sd15 = zoo.weight("sd15", CLIP_L_SD15 + clip_key)
    torch.testing.assert_close(zoo.weight("sdxl", "conditioner.embedders.0.transformer." + clip_key), sd15,
                               rtol=0, atol=0)
    torch.testing.assert_close(zoo.weight("tiny_sd15", CLIP_L_SD15 + clip_key), sd15, rtol=0, atol=0)
    torch.testing.assert_close(zoo.weight("sd15", CLIP_L_SD15 + clip_key), sd15, rtol=0, atol=0)
    # same name and shape in both UNets, but unrelated values (SDXL was trained from scratch)
    key = UNET + "input_blocks.1.0.in_layers.2.weight"
    a, b = zoo.weight("sd15", key).float().flatten(), zoo.weight("sdxl", key).float().flatten()
    assert a.shape == b.shape
    assert abs(float(torch.nn.functional.cosine_similarity(a, b, dim=0))) < 0.02
    with pytest.raises(KeyError, match="no tensor"):
        zoo.weight("sd15", UNET + "label_emb.0.0.weight")


@pytest.mark.parametrize("name, key", [
    ("sd15_finetune", UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"),
    ("sd15_finetune", CLIP_L_SD15 + "text_model.encoder.layers.0.mlp.fc1.weight"),
    ("sdxl_finetune", UNET + "output_blocks.2.1.transformer_blocks.9.attn1.to_v.weight"),
    ("sdxl_finetune", "conditioner.embedders.1.model.transformer.resblocks.5.attn.in_proj_weight"),
    ("sdxl_finetune", UNET + "input_blocks.1.0.in_layers.2.weight"),
])
def test_finetunes_are_base_plus_small_rank4_drift(zoo, name, key):
    base = zoo.weight(name.replace("_finetune", ""), key).float().flatten(1)
    drift = zoo.weight(name, key).float().flatten(1) - base
    assert 0.027 < float(drift.norm() / base.norm()) < 0.033
    s = _svdvals(drift)
    assert float(s[4] / s[3]) < 0.05                # rank 4, up to fp16 rounding of both files


def test_finetunes_keep_1d_tensors(zoo):
    for key in (UNET + "middle_block.1.norm.weight", UNET + "out.2.bias",
                CLIP_L_SD15 + "text_model.final_layer_norm.bias"):
        torch.testing.assert_close(zoo.weight("sd15_finetune", key), zoo.weight("sd15", key), rtol=0, atol=0)


def test_concurrent_builds_publish_one_valid_file(zoo, tmp_path):
    env = {**os.environ, "LORAX_ZOO_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "lorax_zoo", "build", "tiny_vega"]
    procs = [subprocess.Popen(cmd, env=env, cwd=zoo.zoo.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("built in" in out for out in outputs) == 1 and sum("cached" in out for out in outputs) == 1, outputs
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"tiny_vega-v{zoo.ZOO_VERSION}.lock", f"tiny_vega-v{zoo.ZOO_VERSION}.safetensors"]
    key = UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    with safe_open(str(tmp_path / files[1]), "pt") as f:
        torch.testing.assert_close(f.get_tensor(key), zoo.weight("tiny_vega", key), rtol=0, atol=0)


def test_unknown_names_are_rejected(zoo):
    with pytest.raises(KeyError, match="known: sd15, sdxl"):
        zoo.checkpoint("sd3")
    with pytest.raises(KeyError, match="no zoo table"):
        zoo.key_table("flux_unet")


# ---------------------------------------------------------------- synthetic LoRA

def _modules(sd):
    return sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd})


def test_sd15_lora_is_a_kohya_file_comfyui_loads_completely(zoo, comfy, comfy_logs, tmp_path):
    path = zoo.make_sd15_lora(tmp_path / "style.safetensors", rank=16, seed=1)
    lora = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_dim"] == "16" and float(meta["ss_network_alpha"]) == 8.0
    assert zoo.TRIGGER_WORD in json.loads(meta["ss_tag_frequency"])[f"10_{zoo.TRIGGER_WORD}"]
    modules = _modules(lora)
    # 16 transformer blocks x (8 attention + 2 ff) + 16 x (proj_in, proj_out); 12 text layers x 6
    assert len(modules) == 16 * 10 + 16 * 2 + 12 * 6
    assert len(lora) == 3 * len(modules)
    assert all(lora[f"{m}.lora_up.weight"].dtype == torch.float16 for m in modules)
    # real kohya SD1.5 files carry diffusers module names; examples from ComfyUI's own mapping (COMFYUI.md)
    down = lora["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"]
    assert down.shape == (16, 768)
    assert lora["lora_unet_up_blocks_1_attentions_2_proj_out.lora_down.weight"].shape == (16, 1280, 1, 1)
    assert lora["lora_unet_up_blocks_1_attentions_2_proj_out.lora_up.weight"].shape == (1280, 16, 1, 1)
    assert lora["lora_te_text_model_encoder_layers_11_mlp_fc2.lora_up.weight"].shape == (768, 16)
    assert not [m for m in modules if m.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks"))]

    # ComfyUI's loader (with its own key map for SD1.5) takes every key: nothing "not loaded"
    patches = comfy.lora.load_lora(lora, zoo.lora_key_map("sd15"))
    assert comfy_logs.lora_keys_not_loaded() == []
    assert len(patches) == len(modules)
    assert patches.keys() == set(zoo.sd15_lora_targets().values())
    assert "diffusion_model.output_blocks.5.1.proj_out.weight" in patches
    # a delta a tenth the size of the base weights' entries, like a trained LoRA
    m = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    delta = 0.5 * lora[f"{m}.lora_up.weight"].float() @ lora[f"{m}.lora_down.weight"].float()
    assert 0.003 < float(delta.std()) < 0.005


def test_sd15_lora_options(zoo, comfy, comfy_logs):
    attention = zoo.sd15_lora_state_dict(rank=4, cover="attention")
    assert len(_modules(attention)) == 16 * 8 + 12 * 4
    ldm = zoo.sd15_lora_targets(scheme="ldm")
    assert set(ldm.values()) == set(zoo.sd15_lora_targets().values())
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k" in ldm
    patches = comfy.lora.load_lora(zoo.sd15_lora_state_dict(rank=4, scheme="ldm"), zoo.lora_key_map("sd15"))
    assert len(patches) == len(ldm) and comfy_logs.lora_keys_not_loaded() == []
    a, b = zoo.sd15_lora_state_dict(rank=4, seed=1), zoo.sd15_lora_state_dict(rank=4, seed=2)
    k = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"
    assert not torch.equal(a[k], b[k]) and torch.equal(a[k], zoo.sd15_lora_state_dict(rank=4, seed=1)[k])
    with pytest.raises(ValueError, match="cover"):
        zoo.sd15_lora_targets(cover="everything")


# ---------------------------------------------------------------- full size

@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_full_size_checkpoint_files(zoo, name):
    path = zoo.checkpoint(name)
    keys = zoo.checkpoint_keys(name)
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(keys)
        probe = [k for k in keys if "transformer_blocks.0.attn2.to_k" in k][:2] + [next(iter(keys)), list(keys)[-1]]
        for key in probe:
            torch.testing.assert_close(f.get_tensor(key), zoo.weight(name, key), rtol=0, atol=0)


@pytest.mark.slow
def test_full_size_sd15_loads_in_comfyui(comfy, zoo, comfy_logs):
    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(zoo.checkpoint("sd15")), output_vae=False,
                                                                  output_clip=True)
    assert type(model.model.model_config).__name__ == "SD15" and clip is not None
    assert not [m for m in comfy_logs.messages() if "clip missing" in m or "left over" in m]
    key = "output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight"
    torch.testing.assert_close(model.model.diffusion_model.state_dict()[key].float(),
                               zoo.weight("sd15", UNET + key).float(), rtol=0, atol=0)


@pytest.mark.slow
def test_full_size_sdxl_text_encoders_load_in_comfyui(comfy, zoo, comfy_logs):
    """The OpenCLIP-G checkpoint layout goes through ComfyUI's real SDXL loader with nothing missing (the
    tiny SDXL UNet stands in for the 2.6 B one to keep memory down)."""
    sd = load_file(str(zoo.checkpoint("tiny_sdxl")))
    with safe_open(str(zoo.checkpoint("sdxl")), "pt") as f:
        sd.update({k: f.get_tensor(k) for k in f.keys() if k.startswith("conditioner.")})
    with torch.inference_mode():
        _, clip, _, _ = comfy.sd.load_state_dict_guess_config(sd, output_vae=False, output_clip=True)
    assert type(clip.cond_stage_model).__name__ == "SDXLClipModel"
    assert not [m for m in comfy_logs.messages() if "clip missing" in m]
    loaded = clip.cond_stage_model.state_dict()
    g = "conditioner.embedders.1.model."
    in_proj = zoo.weight("sdxl", g + "transformer.resblocks.5.attn.in_proj_weight")
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        torch.testing.assert_close(loaded[f"clip_g.transformer.text_model.encoder.layers.5.self_attn.{proj}.weight"]
                                   .float(), in_proj[1280 * i:1280 * (i + 1)].float(), rtol=0, atol=0)
    # OpenCLIP stores the projection as x @ P; ComfyUI's Linear holds P^T
    torch.testing.assert_close(loaded["clip_g.transformer.text_projection.weight"].float(),
                               zoo.weight("sdxl", g + "text_projection").float().T, rtol=0, atol=0)
    l_key = "text_model.encoder.layers.11.mlp.fc2.weight"
    torch.testing.assert_close(loaded["clip_l.transformer." + l_key].float(),
                               zoo.weight("sd15", CLIP_L_SD15 + l_key).float(), rtol=0, atol=0)


@pytest.mark.slow
def test_demo_sdxl_runs_text_to_image_pieces_in_comfyui(comfy, zoo, comfy_logs):
    """demo_sdxl: detected as SDXL with both text encoders and a working VAE (what the demo workflow needs)."""
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(zoo.checkpoint("demo_sdxl")),
                                                                    output_vae=True, output_clip=True)
        assert type(model.model.model_config).__name__ == "SDXL"
        assert type(clip.cond_stage_model).__name__ == "SDXLClipModel"
        messages = comfy_logs.messages()
        assert not [m for m in messages if "clip missing" in m or "VAE" in m and ("Missing" in m or "No " in m)]
        torch.testing.assert_close(vae.first_stage_model.state_dict()["decoder.conv_in.weight"].float(),
                                   zoo.weight("demo_sdxl", "first_stage_model.decoder.conv_in.weight").float(),
                                   rtol=0, atol=0)
        image = vae.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
    assert 0 <= float(image.min()) and float(image.max()) <= 1 and float(image.std()) > 0
