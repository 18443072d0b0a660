"""Key names and architectures: the structural UNet layout against the real models and ComfyUI's own key map."""
from __future__ import annotations

import dataclasses

import lora_factory
import pytest

from lorax_engine.errors import ArchitectureError
from lorax_engine.files.architectures import (
    SD15,
    SDXL,
    SSD1B,
    VEGA,
    detect_checkpoint_architecture,
    detect_lora_architecture,
    unet_config_from_keys,
)
from lorax_engine.files.keys import (
    canonical_to_kohya,
    module_to_canonical,
    split_key,
    text_encoder_shapes,
    underscore_to_dotted,
    unet_layout,
)

CONFIGS = {"sd15": SD15, "sdxl": SDXL, "ssd1b": SSD1B, "vega": VEGA}
LORA_ARCH = {"sd15": "sd1", "sdxl": "sdxl"}


def _unet_weights(zoo, name):
    return {f"diffusion_model.{k}": v for k, v in zoo.key_table(f"{name}_unet").items() if k.endswith(".weight")}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_structural_layout_reproduces_every_weight_and_shape_of_the_real_unet(zoo, name):
    assert unet_layout(CONFIGS[name]).shapes == _unet_weights(zoo, name)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unet_config_read_back_from_the_real_weights(zoo, name):
    table = zoo.key_table(f"{name}_unet")
    cfg = unet_config_from_keys(table, table.__getitem__, "")
    assert dataclasses.replace(cfg, name=CONFIGS[name].name) == CONFIGS[name]


@pytest.mark.parametrize("table", ["sd15", "sdxl"])
def test_every_kohya_name_agrees_with_comfyui_key_map(zoo, table):
    """ComfyUI's model_lora_keys_unet + clip output: each lora_unet_*/lora_te* name maps where ComfyUI maps it
    (the SDXL upsampler quirk included); names ComfyUI lists for weights the model lacks map nowhere."""
    arch = LORA_ARCH[table]
    real = set(_unet_weights(zoo, table)) | set(text_encoder_shapes("clip_l"))
    if arch == "sdxl":
        real |= set(text_encoder_shapes("clip_g"))
    key_map = zoo.lora_key_map(table)
    kohya = {k: v for k, v in key_map.items() if k.startswith(("lora_unet_", "lora_te"))}
    assert len(kohya) > 900
    for lora_key, model_key in kohya.items():
        expected = model_key if model_key in real else None
        assert module_to_canonical(lora_key, arch) == expected, lora_key
    # every other spelling ComfyUI accepts (diffusers, unet., text_encoder., lycoris_, ...) is never mapped wrongly
    mapped = 0
    for lora_key, model_key in key_map.items():
        mine = module_to_canonical(lora_key, arch)
        assert mine in (None, model_key), lora_key
        mapped += mine is not None
    assert mapped > 0.8 * sum(1 for v in key_map.values() if v in real)


@pytest.mark.parametrize("name", ["ssd1b", "vega", "sd15", "sdxl"])
def test_diffusers_mapping_agrees_with_comfyui_unet_to_diffusers(comfy, zoo, name):
    cfg = CONFIGS[name]
    comfy_cfg = {"num_res_blocks": list(cfg.num_res_blocks), "channel_mult": list(cfg.channel_mult),
                 "transformer_depth": list(cfg.transformer_depth),
                 "transformer_depth_output": list(cfg.transformer_depth_output),
                 "transformer_depth_middle": cfg.transformer_depth_middle}
    theirs = comfy.utils.unet_to_diffusers(comfy_cfg)
    real = _unet_weights(zoo, name)
    mine = unet_layout(cfg).from_diffusers
    existing = {d[:-len(".weight")]: ldm[:-len(".weight")] for d, ldm in theirs.items()
                if d.endswith(".weight") and f"diffusion_model.{ldm}" in real}
    assert mine == existing


@pytest.mark.parametrize("arch, ldm", [("sd1", "output_blocks.2.1.conv"), ("sdxl", "output_blocks.2.2.conv")])
def test_upsampler_name_follows_the_structure(arch, ldm):
    assert module_to_canonical("lora_unet_up_blocks_0_upsamplers_0_conv", arch) == f"diffusion_model.{ldm}.weight"


@pytest.mark.parametrize("arch", ["sd1", "sdxl", "unknown"])
@pytest.mark.parametrize("name, path", [
    ("input_blocks_4_1_transformer_blocks_0_attn1_to_out_0", "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0"),
    ("input_blocks_7_1_transformer_blocks_9_ff_net_0_proj", "input_blocks.7.1.transformer_blocks.9.ff.net.0.proj"),
    ("output_blocks_3_0_in_layers_2", "output_blocks.3.0.in_layers.2"),
    ("middle_block_0_emb_layers_1", "middle_block.0.emb_layers.1"),
    ("output_blocks_5_0_skip_connection", "output_blocks.5.0.skip_connection"),
    ("input_blocks_4_1_proj_in", "input_blocks.4.1.proj_in"),
    ("middle_block_1_transformer_blocks_2_attn2_to_k", "middle_block.1.transformer_blocks.2.attn2.to_k"),
    ("out_2", "out.2"),
    ("time_embed_0", "time_embed.0"),
])
def test_sgm_names_map_one_to_one_for_any_architecture(arch, name, path):
    assert underscore_to_dotted(name) == path
    assert module_to_canonical(f"lora_unet_{name}", arch) == f"diffusion_model.{path}.weight"


@pytest.mark.parametrize("module, arch, expected", [
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", "sd1",
     "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"),
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q", "sd1",
     "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"),
    ("unet.up_blocks.0.attentions.1.transformer_blocks.3.attn2.processor.to_out", "sdxl",
     "diffusion_model.output_blocks.1.1.transformer_blocks.3.attn2.to_out.0.weight"),
    ("unet.down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0", "sdxl",
     "diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_out.0.weight"),
    ("base_model.model.mid_block.attentions.0.transformer_blocks.0.ff.net.2", "sd1",
     "diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2.weight"),
    ("unet.base_model.model.up_blocks.3.attentions.2.proj_out", "sd1",
     "diffusion_model.output_blocks.11.1.proj_out.weight"),
    ("unet.mid_block.resnets.1.conv_shortcut", "sd1", None),            # no shortcut conv there
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "sd1",
     "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"),
    ("text_encoder_2.text_model.encoder.layers.31.mlp.fc2", "sdxl",
     "clip_g.transformer.text_model.encoder.layers.31.mlp.fc2.weight"),
    ("text_encoder_2.base_model.model.text_model.encoder.layers.3.self_attn.out_proj", "sdxl",
     "clip_g.transformer.text_model.encoder.layers.3.self_attn.out_proj.weight"),
    ("lora_te_text_model_encoder_layers_11_mlp_fc1", "sd1",
     "clip_l.transformer.text_model.encoder.layers.11.mlp.fc1.weight"),
    ("lora_te1_text_model_encoder_layers_0_self_attn_v_proj", "sdxl",
     "clip_l.transformer.text_model.encoder.layers.0.self_attn.v_proj.weight"),
    ("lora_te2_text_model_encoder_layers_20_self_attn_k_proj", "sdxl",
     "clip_g.transformer.text_model.encoder.layers.20.self_attn.k_proj.weight"),
    ("diffusion_model.input_blocks.1.0.in_layers.2", "sd1", "diffusion_model.input_blocks.1.0.in_layers.2.weight"),
    ("text_encoders.clip_g.transformer.text_model.encoder.layers.1.mlp.fc1", "sdxl",
     "clip_g.transformer.text_model.encoder.layers.1.mlp.fc1.weight"),
    # not understood
    ("lora_unet_foo_bar", "sd1", None),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn3_to_q", "sd1", None),
    ("lora_te_text_model_encoder_layers_0_self_attn_x_proj", "sd1", None),
    ("lora_unet_down_blocks_0_attentions_0_proj_in", "sdxl", None),      # SDXL has no 320-channel attention
    ("lora_unet_double_blocks_0_img_attn_qkv", "unknown", None),
    ("transformer.single_transformer_blocks.0.attn.to_q", "unknown", None),
])
def test_module_names_of_every_scheme(module, arch, expected):
    assert module_to_canonical(module, arch) == expected


@pytest.mark.parametrize("key, module, part, family, peft", [
    ("lora_unet_x.lora_up.weight", "lora_unet_x", "up", "kohya", False),
    ("lora_te1_x.lora_down.weight", "lora_te1_x", "down", "kohya", False),
    ("lora_unet_x.lora_mid.weight", "lora_unet_x", "mid", "kohya", False),
    ("lora_unet_x.alpha", "lora_unet_x", "alpha", None, False),
    ("lora_unet_x.hada_w1_a", "lora_unet_x", "hada_w1_a", "kohya", False),
    ("lora_unet_x.lokr_w2_b", "lora_unet_x", "lokr_w2_b", "kohya", False),
    ("unet.a.processor.to_q_lora.down.weight", "unet.a.processor.to_q", "down", "diffusers-old", False),
    ("text_encoder.a.q_proj.lora_linear_layer.up.weight", "text_encoder.a.q_proj", "up", "diffusers-old", False),
    ("unet.a.to_q.lora_A.weight", "unet.a.to_q", "down", "peft", False),
    ("unet.a.to_q.lora_B.default.weight", "unet.a.to_q", "up", "peft", True),
    ("base_model.model.a.to_q.lora_A.weight", "base_model.model.a.to_q", "down", "peft", True),
    ("unet.a.to_q.lora.up.weight", "unet.a.to_q", "up", "peft", False),
    ("diffusion_model.a.lora_up.weight", "diffusion_model.a", "up", "comfyui", False),
    ("lora_unet_x.dora_scale", "lora_unet_x", "dora_scale", None, False),
])
def test_split_key(key, module, part, family, peft):
    p = split_key(key)
    assert (p.module, p.part, p.family, p.peft_marker) == (module, part, family, peft)


def test_split_key_rejects_non_lora_tensors():
    assert split_key("model.diffusion_model.input_blocks.0.0.weight") is None
    assert split_key("lora_unet_x.diff_b") is None


@pytest.mark.parametrize("table", ["sd15", "sdxl"])
def test_canonical_to_kohya_is_accepted_by_comfyui_and_parses_back(zoo, table):
    arch = LORA_ARCH[table]
    key_map = zoo.lora_key_map(table)
    keys = list(_unet_weights(zoo, table)) + list(text_encoder_shapes("clip_l"))
    if arch == "sdxl":
        keys += list(text_encoder_shapes("clip_g"))
    for key in keys:
        name = canonical_to_kohya(key, arch)
        assert key_map[name] == key, name
        assert module_to_canonical(name, arch) == key
        if key.startswith("diffusion_model."):
            assert name.startswith("lora_unet_input_blocks_") or not name.startswith("lora_unet_down_blocks")
    te = "lora_te_" if arch == "sd1" else "lora_te1_"
    assert canonical_to_kohya("clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight", arch) == (
        f"{te}text_model_encoder_layers_0_mlp_fc1")


def test_text_encoder_shapes_match_the_real_encoders(zoo):
    for enc in ("clip_l", "clip_g"):
        table = zoo.key_table(enc)
        for key, shape in text_encoder_shapes(enc).items():
            short = key[len(f"{enc}.transformer."):]
            if short in table or enc == "clip_g":
                assert table[short] == shape, key


def test_canonical_to_kohya_rejects_what_the_architecture_lacks():
    with pytest.raises(ArchitectureError, match="clip_g.*only in SDXL"):
        canonical_to_kohya("clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "sd1")
    with pytest.raises(ValueError):
        canonical_to_kohya("diffusion_model.input_blocks.0.0.bias", "sd1")


# --- architecture detection --------------------------------------------------------------------------

def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("scheme", ["kohya", "ldm"])
def test_detects_sd15_lora_from_the_zoo(zoo, scheme):
    det = detect_lora_architecture(_shapes(zoo.sd15_lora_state_dict(rank=2, cover="attention", scheme=scheme)))
    assert det.architecture == "sd1"
    assert "768" in det.reason


@pytest.mark.parametrize("scheme", lora_factory.SCHEMES)
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_detects_factory_loras_in_every_scheme(arch, scheme):
    sd = lora_factory.lora_state_dict(lora_factory.random_factors(arch, rank=2), arch, scheme)
    assert detect_lora_architecture(_shapes(sd)).architecture == arch


@pytest.mark.parametrize("shapes, arch, evidence", [
    ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768)}, "sd1", "768-wide text"),
    ({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768)}, "sdxl", "lora_te1_"),
    ({"text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": (4, 1280)}, "sdxl", "OpenCLIP-G"),
    ({"lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight": (4, 640)}, "sdxl",
     "transformer_blocks.1"),
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": (4, 320)}, "sd1",
     "only in SD1.x"),
    ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": (4, 640, 1, 1)}, "sd1", "1x1 convolutions"),
    ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": (4, 640)}, "sdxl", "linear"),
    ({"unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight": (4, 2048)}, "sdxl",
     "2048"),
    ({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.hada_w1_b": (4, 768)}, "sd1", "768"),
    # SD 2.x, Flux, SD3, conflicting and undecidable files
    ({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v.lora_down.weight": (4, 1024)},
     "unknown", "SD 2.x"),
    ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 1024)}, "unknown", "SD 2.x"),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 3072)}, "unknown", "Flux"),
    ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (4, 1536)}, "unknown", "DiT"),
    ({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": (4, 1536)}, "unknown", "SD3"),
    ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 1280),
      "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 768)},
     "unknown", "conflicting"),
    ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": (4, 640)}, "unknown",
     "no key or shape decides"),
])
def test_lora_architecture_evidence(shapes, arch, evidence):
    det = detect_lora_architecture(shapes)
    assert det.architecture == arch
    assert evidence in det.reason


@pytest.mark.parametrize("name, arch", [("sd15", "sd1"), ("sdxl", "sdxl"), ("sd15_finetune", "sd1"),
                                        ("tiny_sd15", "sd1"), ("tiny_sdxl", "sdxl"), ("tiny_vega", "vega")])
def test_detects_zoo_checkpoints_from_keys_and_shapes(zoo, name, arch):
    keys = zoo.checkpoint_keys(name)
    det = detect_checkpoint_architecture(keys, keys.__getitem__)
    assert det.architecture == arch, det.reason


@pytest.mark.parametrize("name, arch", [("ssd1b", "ssd1b"), ("vega", "vega")])
def test_detects_distilled_sdxl_unets(zoo, name, arch):
    keys = {f"model.diffusion_model.{k}": v for k, v in zoo.key_table(f"{name}_unet").items()}
    det = detect_checkpoint_architecture(keys, keys.__getitem__)
    assert det.architecture == arch
    assert det.unet_config.transformer_depth == CONFIGS[name].transformer_depth


def test_checkpoint_detection_rejects_sd2_and_non_unets(zoo):
    keys = dict(zoo.checkpoint_keys("sd15"))
    for k in keys:
        if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            keys[k] = (keys[k][0], 1024)
    det = detect_checkpoint_architecture(keys, keys.__getitem__)
    assert det.architecture == "unknown" and "SD 2.x" in det.reason
    flux = {"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}
    assert detect_checkpoint_architecture(flux, flux.__getitem__).architecture == "unknown"
