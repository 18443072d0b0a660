"""Files written by ``write_lora`` are loaded by ComfyUI's own loader and patch exactly W0 + strength * ΔW.

The file goes through ``comfy.utils.load_torch_file`` and ``comfy.sd.load_lora_for_models`` on real ComfyUI
models (the zoo's tiny SD1.5 / SDXL checkpoints and a real SDXL CLIP), with ComfyUI's logging captured.
"""
from __future__ import annotations

import math
import re

import comfy_harness
import lora_factory as lf
import pytest
import torch

from lorax_engine.files.lora import LoraLayer, LoraModel
from lorax_engine.files.lora_formats import REFACTOR_ENERGY, read_lora, to_kohya_state_dict, write_lora
from lorax_engine.files.safetensors_file import SafetensorsFile

STRENGTH_MODEL, STRENGTH_CLIP = 0.7, 0.4
RANK, ALPHA = 4, 3.0
# every kind of patchable UNet weight: attention, feed-forward, proj (1x1 conv in SD1.5, linear in SDXL),
# resnet convs and shortcuts, down/upsamplers, embeddings, conv_in / conv_out
UNET_TARGETS = re.compile(r"(transformer_blocks\.[09]\.(attn1\.to_q|attn2\.to_(k|out\.0)|ff\.net\.0\.proj)"
                          r"|proj_in|proj_out|\.op|\d\.conv|time_embed\.0|label_emb\.0\.0"
                          r"|(input_blocks\.1|middle_block|output_blocks\.[01])\.0\.(in_layers\.2|out_layers\.3"
                          r"|skip_connection)"
                          r"|input_blocks\.0\.0|out\.2)\.weight$")
TEXT_TARGETS = {
    "clip_l": ["text_model.encoder.layers.0.self_attn.q_proj.weight", "text_model.encoder.layers.11.mlp.fc2.weight"],
    "clip_g": ["text_model.encoder.layers.0.self_attn.v_proj.weight", "text_model.encoder.layers.31.mlp.fc1.weight"],
}


def _w0(zoo, checkpoint, keys, prefix):
    """W0 as stored in the zoo checkpoint ComfyUI loaded (the file, not ComfyUI's copy)."""
    with SafetensorsFile(zoo.checkpoint(checkpoint)) as f:
        return {k: f.get(prefix(k)).float() for k in keys}


def _random_lora(shapes: dict[str, tuple[int, ...]], seed: int) -> LoraModel:
    """Rank-4 layers whose factors are exact in fp16, so the written file holds the very same ΔW."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for key, shape in shapes.items():
        m, n = shape[0], math.prod(shape[1:])
        up = (torch.randn(m, RANK, generator=gen) * 0.05).half().float()
        down = (torch.randn(RANK, n, generator=gen) / math.sqrt(n)).half().float()
        layers[key] = LoraLayer(up, down, ALPHA, shape)
    return LoraModel(layers, metadata={"ss_tag_frequency": '{"1_x": {"x": 1}}'})


def _expected_delta(layer: LoraLayer) -> torch.Tensor:
    return (ALPHA / RANK) * (layer.up.double() @ layer.down.double())


def _unet_targets(zoo, table):
    return {f"diffusion_model.{k}": v for k, v in zoo.key_table(table).items() if UNET_TARGETS.search(k)}


def _text_targets(zoo, encoders):
    return {f"{enc}.transformer.{k}": zoo.key_table(enc)[k] for enc in encoders for k in TEXT_TARGETS[enc]}


def _patched(comfy, patcher, keys):
    """The listed weights as the sampler sees them."""
    state = comfy_harness.patched_weights(comfy, patcher, patcher.model)
    return {k: state[k] for k in keys}


def _check(patched, w0, lora, strength, dtype):
    rtol = 2 ** -10 if dtype == torch.float16 else 1e-5
    for key, value in patched.items():
        delta = _expected_delta(lora.layers[key]).float().reshape(w0[key].shape)
        assert float(delta.norm()) > 1e-3
        # ComfyUI merges in fp32 and rounds once into the weight's dtype
        expected = (w0[key] + strength * delta).to(dtype).float()
        # assert_close's elementwise isclose is too slow for ~100 dense weights on 2 CPU cores
        excess = ((value - expected).abs() - (1e-6 + rtol * expected.abs())).max()
        assert float(excess) <= 0, f"{key}: patched weight off by {float(excess):.3g} beyond tolerance"


def _load(comfy, path, model, clip):
    lora_sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    return comfy.sd.load_lora_for_models(model, clip, lora_sd, STRENGTH_MODEL, STRENGTH_CLIP)


def test_sd15_file_patches_unet_and_clip_l(comfy, zoo, comfy_logs, tmp_path):
    shapes = {**_unet_targets(zoo, "tiny_sd15_unet"), **_text_targets(zoo, ["clip_l"])}
    lora = _random_lora(shapes, seed=1)
    path = write_lora(lora, tmp_path / "sd15_out.safetensors", architecture="sd1")
    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(zoo.checkpoint("tiny_sd15")),
                                                                  output_vae=False, output_clip=True)
        comfy_logs.clear()
        new_model, new_clip = _load(comfy, path, model, clip)
        patched_keys = set(new_model.patches) | set(new_clip.patcher.patches)
        unet_keys = [k for k in shapes if k.startswith("diffusion_model.")]
        text_keys = [k for k in shapes if not k.startswith("diffusion_model.")]
        unet = _patched(comfy, new_model, [k for k in new_model.model.state_dict() if k.startswith("diffusion_model.")])
        text = _patched(comfy, new_clip.patcher, text_keys)
        unet_dtype = new_model.model.diffusion_model.input_blocks[0][0].weight.dtype
        text_dtype = new_clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[0].mlp.fc1.weight.dtype

    assert comfy_logs.lora_keys_not_loaded() == []
    assert not [m for m in comfy_logs.messages() if "NOT LOADED" in m]
    assert patched_keys == set(shapes)
    assert len(unet_keys) > 20
    w0 = _w0(zoo, "tiny_sd15", unet, lambda k: "model." + k)
    w0.update(_w0(zoo, "tiny_sd15", text_keys,
                  lambda k: "cond_stage_model.transformer." + k[len("clip_l.transformer."):]))
    _check({k: unet[k] for k in unet_keys}, w0, lora, STRENGTH_MODEL, unet_dtype)
    _check(text, w0, lora, STRENGTH_CLIP, text_dtype)
    for key in set(unet) - set(unet_keys):          # everything else untouched
        torch.testing.assert_close(unet[key], w0[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def sdxl_clip(comfy):
    """A real SDXL CLIP (CLIP-L + OpenCLIP-G); ComfyUI leaves its weights uninitialised, so the ones the
    test patches are filled with known values."""
    import comfy.sdxl_clip
    import comfy.supported_models_base
    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    clip = comfy.sd.CLIP(target)
    state = clip.cond_stage_model.state_dict(keep_vars=True)
    gen = torch.Generator().manual_seed(7)
    w0 = {}
    with torch.no_grad():
        for enc, keys in TEXT_TARGETS.items():
            for k in keys:
                key = f"{enc}.transformer.{k}"
                param = state[key]
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
                w0[key] = param.detach().float().clone()
    return clip, w0


def test_sdxl_file_patches_unet_clip_l_and_clip_g(comfy, zoo, comfy_logs, sdxl_clip, tmp_path):
    clip, clip_w0 = sdxl_clip
    shapes = {**_unet_targets(zoo, "tiny_sdxl_unet"), **_text_targets(zoo, ["clip_l", "clip_g"])}
    lora = _random_lora(shapes, seed=2)
    path = write_lora(lora, tmp_path / "sdxl_out.safetensors", architecture="sdxl")
    with torch.inference_mode():
        model, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(zoo.checkpoint("tiny_sdxl")),
                                                               output_vae=False, output_clip=False)
        comfy_logs.clear()
        new_model, new_clip = _load(comfy, path, model, clip)
        patched_keys = set(new_model.patches) | set(new_clip.patcher.patches)
        unet_keys = [k for k in shapes if k.startswith("diffusion_model.")]
        unet = _patched(comfy, new_model, unet_keys)
        text = _patched(comfy, new_clip.patcher, list(clip_w0))
        unet_dtype = new_model.model.diffusion_model.input_blocks[0][0].weight.dtype
        text_dtype = new_clip.cond_stage_model.clip_g.transformer.text_model.encoder.layers[0].mlp.fc1.weight.dtype

    assert comfy_logs.lora_keys_not_loaded() == []
    assert not [m for m in comfy_logs.messages() if "NOT LOADED" in m]
    assert patched_keys == set(shapes)
    assert {k.split(".")[0] for k in patched_keys} == {"diffusion_model", "clip_l", "clip_g"}
    w0 = _w0(zoo, "tiny_sdxl", unet_keys, lambda k: "model." + k)
    _check(unet, w0, lora, STRENGTH_MODEL, unet_dtype)
    _check(text, clip_w0, lora, STRENGTH_CLIP, text_dtype)


# --- LyCORIS files: our reader against ComfyUI's own adapters ---------------------------------------------------

# layers whose shapes in the zoo's tiny SD1.5 are the real SD1.5 ones (the factory builds real-size factors)
LYCORIS_LINEAR = ["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                  "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                  "diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
                  "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                  "clip_l.transformer.text_model.encoder.layers.11.mlp.fc1.weight"]
LYCORIS_CONV = ["diffusion_model.input_blocks.1.0.in_layers.2.weight",    # 3x3
                "diffusion_model.input_blocks.1.1.proj_in.weight"]        # 1x1
LYCORIS_FILES = {
    "loha": lambda: lf.loha_state_dict("sd1", LYCORIS_LINEAR + LYCORIS_CONV, rank=4)[0],
    "loha_tucker": lambda: lf.loha_state_dict("sd1", LYCORIS_CONV[:1], rank=3, tucker=True)[0],
    "lokr_lowrank_w2": lambda: lf.lokr_state_dict("sd1", LYCORIS_LINEAR + LYCORIS_CONV, w2_lowrank=True)[0],
    "lokr_full_w2": lambda: lf.lokr_state_dict("sd1", LYCORIS_LINEAR, w2_lowrank=False)[0],
    "locon_mid_tucker": lambda: lf.locon_mid_state_dict("sd1", LYCORIS_CONV[0], rank=3)[0],
}


@pytest.fixture(scope="module")
def tiny_sd15(comfy, zoo):
    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(zoo.checkpoint("tiny_sd15")),
                                                                  output_vae=False, output_clip=True)
    tiny = zoo.key_table("tiny_sd15_unet")
    for key in LYCORIS_LINEAR + LYCORIS_CONV:
        if key.startswith("diffusion_model."):
            assert tuple(tiny[key[len("diffusion_model."):]]) == lf.model_shapes("sd1")[key], key
    return model, clip


def _patched_by_comfy(comfy, model, clip, lora_sd):
    """ComfyUI's patched weights for every key a LoRA state dict patches, the same weights unpatched, and the
    unit roundoff of each weight's dtype (ComfyUI rounds W0 + ΔW once into it)."""
    with torch.inference_mode():
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora_sd, STRENGTH_MODEL, STRENGTH_CLIP)
        out, w0, roundoff = {}, {}, {}
        for patcher, new in ((model, new_model), (clip.patcher, new_clip.patcher)):
            keys = sorted(new.patches)
            if keys:
                out.update(_patched(comfy, new, keys))
                w0.update(_patched(comfy, patcher, keys))
                state = patcher.model.state_dict()
                roundoff.update({k: torch.finfo(state[k].dtype).eps / 2 for k in keys})
    return out, w0, roundoff


@pytest.mark.parametrize("kind", sorted(LYCORIS_FILES))
def test_lycoris_file_read_by_us_patches_like_comfyui_reads_it(comfy, tiny_sd15, comfy_logs, tmp_path, kind):
    """A LoHa / LoKr / LoCon-with-mid file: ComfyUI's adapters on the original tensors, and ComfyUI's plain LoRA
    loader on what our reader makes of it (read_lora -> canonical -> to_kohya_state_dict), patch the same
    weights by the same ΔW, up to the energy the re-factorisation may drop (REFACTOR_ENERGY) and the rounding of
    both patched weights into the model's dtype (fp16 for the text encoder)."""
    model, clip = tiny_sd15
    path = lf.save(LYCORIS_FILES[kind](), tmp_path / f"{kind}.safetensors")
    ours = to_kohya_state_dict(read_lora(path), "sd1", dtype=torch.float32)
    comfy_logs.clear()
    theirs, w0, roundoff = _patched_by_comfy(comfy, model, clip,
                                             comfy.utils.load_torch_file(str(path), safe_load=True))
    mine, _, _ = _patched_by_comfy(comfy, model, clip, ours)
    assert comfy_logs.lora_keys_not_loaded() == []
    assert sorted(mine) == sorted(theirs) and theirs
    for key in theirs:
        delta_theirs = (theirs[key] - w0[key]).double()
        assert float(delta_theirs.norm()) > 1e-4, key
        off = float((mine[key] - theirs[key]).double().norm())
        allowed = (math.sqrt(1 - REFACTOR_ENERGY) * float(delta_theirs.norm())
                   + 2 * roundoff[key] * float(theirs[key].double().norm()))
        assert off <= allowed, f"{key}: our ΔW is {off:.3g} away from ComfyUI's (allowed {allowed:.3g})"
