"""Reading every LoRA format into the canonical form, writing kohya/SAI files, and every error a file can cause."""
from __future__ import annotations

import json
import pickle

import lora_factory as lf
import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from lorax_engine.errors import LoraFileError, OutputPathError
from lorax_engine.files.lora import LoraLayer, LoraModel
from lorax_engine.files.lora_formats import lora_from_state_dict, read_lora, to_kohya_state_dict, write_lora

# one small layer of each kind, for tests that compare dense ΔW
SMALL = ["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
         "diffusion_model.input_blocks.4.1.proj_in.weight",
         "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"]
LABELS = {"kohya": "kohya-locon", "kohya_diffusers": "kohya-locon", "diffusers_old": "diffusers-old",
          "diffusers": "diffusers", "peft": "peft", "peft_default": "peft", "lora_dot": "diffusers"}


def _assert_matches(lora: LoraModel, factors: dict[str, lf.Factors], arch: str):
    assert sorted(lora.layers) == sorted(factors)
    for key, f in factors.items():
        layer = lora.layers[key]
        assert layer.weight_shape == f.shape, key
        assert layer.rank == f.rank
        torch.testing.assert_close(layer.delta(), f.delta().float(), msg=key)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_every_spelling_reads_to_the_same_canonical_lora(tmp_path, arch):
    factors = lf.random_factors(arch, rank=4, alpha=2.0)
    read = {}
    for scheme in lf.SCHEMES:
        path = lf.save(lf.lora_state_dict(factors, arch, scheme), tmp_path / f"{scheme}.safetensors")
        lora = read_lora(path)
        assert lora.architecture == arch, scheme
        assert lora.source_format == LABELS[scheme], scheme
        assert lora.source_dtypes == ("float16",)
        assert lora.source_path == str(path)
        read[scheme] = lora
    _assert_matches(read["kohya"], factors, arch)
    # identical factors, alpha and shape imply an identical ΔW (comparing dense ΔW 84 times is slow on CPU)
    for scheme, lora in read.items():
        assert sorted(lora.layers) == sorted(factors), scheme
        for key, layer in lora.layers.items():
            ref = read["kohya"].layers[key]
            assert (layer.alpha, layer.weight_shape) == (ref.alpha, ref.weight_shape), (scheme, key)
            assert torch.equal(layer.up, ref.up) and torch.equal(layer.down, ref.down), (scheme, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_are_read_into_float32_factors(tmp_path, dtype):
    factors = lf.random_factors("sd1", rank=3, targets=SMALL)
    path = lf.save(lf.lora_state_dict(factors, "sd1", "kohya", dtype=dtype), tmp_path / "x.safetensors")
    lora = read_lora(path)
    assert lora.source_dtypes == (str(dtype).replace("torch.", ""),)
    for key, f in factors.items():
        layer = lora.layers[key]
        assert layer.up.dtype == layer.down.dtype == torch.float32
        rounded = lf.Factors(f.up.to(dtype).float(), f.down.to(dtype).float(), f.alpha, f.shape)
        torch.testing.assert_close(layer.delta(), rounded.delta().float())


@pytest.mark.parametrize("scheme", ["kohya", "peft", "diffusers_old"])
def test_missing_alpha_means_scale_one(tmp_path, scheme):
    factors = lf.random_factors("sd1", rank=4, alpha=None, targets=SMALL)
    path = lf.save(lf.lora_state_dict(factors, "sd1", scheme, with_alpha=False), tmp_path / "x.safetensors")
    lora = read_lora(path)
    for key, f in factors.items():
        assert lora.layers[key].alpha == 4 and lora.layers[key].scale == 1.0
        torch.testing.assert_close(lora.layers[key].delta(), (f.up @ f.down).float())


def test_locon_tucker_mid_is_materialised_exactly(tmp_path):
    key = "diffusion_model.input_blocks.4.0.in_layers.2.weight"
    sd, expected = lf.locon_mid_state_dict("sd1", key, rank=3)
    lora = read_lora(lf.save(sd, tmp_path / "locon.safetensors"))
    layer = lora.layers[key]
    assert layer.rank == 3 and layer.weight_shape == (640, 320, 3, 3)
    torch.testing.assert_close(layer.delta(), expected.float(), rtol=1e-5, atol=1e-7)


def _assert_refactorised(lora, expected):
    for key, exp in expected.items():
        layer = lora.layers[key]
        err = (layer.delta().double() - exp).square().sum() / exp.square().sum()
        assert err <= 1e-3 + 1e-9, (key, float(err))
        note = next(n for n in lora.notes if n.startswith(f"re-factorised {key}:"))
        assert f"rank {layer.rank}," in note
        kept = float(note.rsplit("energy kept ", 1)[1].rstrip("%")) / 100
        assert kept >= 0.999
        assert kept == pytest.approx(1 - float(err), abs=2e-6)   # what is not kept is exactly the error
        assert layer.alpha == layer.rank                          # scale 1: the factors carry ΔW


LOHA_KEYS = ["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
             "diffusion_model.input_blocks.4.0.in_layers.2.weight",
             "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"]


@pytest.mark.parametrize("alpha", [2.0, None])
def test_loha_is_materialised_like_comfyui_and_refactorised(tmp_path, alpha):
    sd, expected = lf.loha_state_dict("sd1", LOHA_KEYS, rank=4, alpha=alpha)
    lora = read_lora(lf.save(sd, tmp_path / "loha.safetensors"))
    assert lora.source_format == "lycoris-loha"
    assert lora.layers[LOHA_KEYS[1]].weight_shape == (640, 320, 3, 3)    # a 2-D hada pair patching a conv
    assert max(lora.layers[k].rank for k in LOHA_KEYS) > 4                # a Hadamard product is not rank 4
    _assert_refactorised(lora, expected)


def test_loha_tucker_conv(tmp_path):
    key = "diffusion_model.input_blocks.4.0.in_layers.2.weight"
    sd, expected = lf.loha_state_dict("sd1", [key], rank=3, tucker=True)
    lora = read_lora(lf.save(sd, tmp_path / "loha_cp.safetensors"))
    assert lora.layers[key].weight_shape == (640, 320, 3, 3)
    _assert_refactorised(lora, expected)


@pytest.mark.parametrize("w2_lowrank", [True, False])
def test_lokr_is_materialised_like_comfyui_and_refactorised(tmp_path, w2_lowrank):
    keys = ["diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight",
            "diffusion_model.input_blocks.1.0.in_layers.2.weight"]
    sd, expected = lf.lokr_state_dict("sdxl", keys, w2_lowrank=w2_lowrank)
    sd.update(lf.lora_state_dict(lf.random_factors("sdxl", targets=[
        "clip_g.transformer.text_model.encoder.layers.31.mlp.fc2.weight"]), "sdxl", "kohya"))
    lora = read_lora(lf.save(sd, tmp_path / "lokr.safetensors"))
    assert lora.architecture == "sdxl"
    assert lora.source_format == "kohya+lycoris-lokr"
    assert lora.layers[keys[1]].weight_shape == (320, 320, 3, 3)
    _assert_refactorised(lora, expected)


# --- writing -----------------------------------------------------------------------------------------

TAGS = json.dumps({"10_lrxstyle": {"lrxstyle": 24, "watercolor": 7}})


@pytest.mark.parametrize("arch, scheme", [("sd1", "kohya_diffusers"), ("sd1", "peft"), ("sdxl", "diffusers_old")])
def test_read_write_read_keeps_delta_and_trigger_words(tmp_path, arch, scheme):
    factors = lf.random_factors(arch, rank=4, alpha=3.0)
    src = lf.save(lf.lora_state_dict(factors, arch, scheme), tmp_path / "src.safetensors",
                  {"ss_tag_frequency": TAGS, "ss_output_name": "src", "modelspec.title": "My style"})
    first = read_lora(src)
    out = write_lora(first, tmp_path / "out.safetensors", architecture=arch, dtype=torch.float32,
                     extra_metadata={"lorax.source_file": "src.safetensors", "lorax.method": "identity"})
    assert out == tmp_path / "out.safetensors"
    second = read_lora(out)
    assert second.source_format == "kohya-locon" and second.architecture == arch
    _assert_matches(second, factors, arch)
    md = second.metadata
    assert md["ss_tag_frequency"] == TAGS
    assert md["modelspec.title"] == "My style"
    assert md["ss_output_name"] == "out"
    assert md["ss_network_module"] == "networks.lora"
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("4", "3")
    assert md["ss_base_model_version"] == {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}[arch]
    assert md["modelspec.sai_model_spec"] == "1.0.1"
    assert md["modelspec.architecture"] == {"sd1": "stable-diffusion-v1/lora",
                                            "sdxl": "stable-diffusion-xl-v1-base/lora"}[arch]
    if arch == "sdxl":
        assert md["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert md["lorax.source_file"] == "src.safetensors" and md["lorax.method"] == "identity"
    with safe_open(str(out), "pt") as f:
        names = {k.rsplit(".lora_", 1)[0].rsplit(".alpha", 1)[0] for k in f.keys()}
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                             "lora_te_" if arch == "sd1" else "lora_te1_", "lora_te2_")) for n in names), names


def test_default_fp16_write_and_kohya_tensor_layout(tmp_path):
    factors = lf.random_factors("sd1", rank=4, alpha=2.0)
    lora = read_lora(lf.save(lf.lora_state_dict(factors, "sd1", "peft"), tmp_path / "src.safetensors"))
    sd = to_kohya_state_dict(lora, "sd1")
    conv = "lora_unet_input_blocks_4_0_in_layers_2"
    assert sd[f"{conv}.lora_down.weight"].shape == (4, 320, 3, 3)
    assert sd[f"{conv}.lora_up.weight"].shape == (640, 4, 1, 1)
    assert sd["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"].shape == (4, 640, 1, 1)
    lin = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    assert sd[f"{lin}.lora_down.weight"].shape == (4, 768) and sd[f"{lin}.lora_up.weight"].shape == (320, 4)
    assert sd[f"{lin}.alpha"].shape == () and float(sd[f"{lin}.alpha"]) == 2.0
    assert sd[f"{lin}.lora_down.weight"].dtype == torch.float16
    out = write_lora(lora, tmp_path / "out.safetensors", architecture="sd1")
    again = read_lora(out)
    assert again.source_dtypes == ("float16",)
    _assert_matches(again, factors, "sd1")        # fp16-exact factors survive fp16 storage


def test_refactorised_loha_writes_as_plain_lora(tmp_path):
    sd, expected = lf.loha_state_dict("sd1", LOHA_KEYS, rank=4)
    loha = read_lora(lf.save(sd, tmp_path / "loha.safetensors"))
    again = read_lora(write_lora(loha, tmp_path / "out.safetensors", architecture="sd1", dtype=torch.float32))
    assert again.source_format == "kohya-locon"
    ranks = {layer.rank for layer in loha.layers.values()}
    assert again.metadata["ss_network_dim"] == ("Dynamic" if len(ranks) > 1 else str(ranks.pop()))
    for key in LOHA_KEYS:
        torch.testing.assert_close(again.layers[key].delta(), loha.layers[key].delta())
        torch.testing.assert_close(again.layers[key].delta(), expected[key].float(), rtol=0, atol=0.05 *
                                   float(expected[key].abs().max()))


def _existing(tmp_path):
    target = tmp_path / "keep.safetensors"
    target.write_bytes(b"previous file")
    return target


def test_failed_write_leaves_previous_file_and_no_temp_file(tmp_path, monkeypatch):
    lora = read_lora(lf.save(lf.lora_state_dict(lf.random_factors("sd1", rank=2), "sd1", "kohya"),
                             tmp_path / "src.safetensors"))
    target = _existing(tmp_path)

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OutputPathError, match="No space left"):
        write_lora(lora, target, architecture="sd1")
    assert target.read_bytes() == b"previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors", "src.safetensors"]


def test_successful_write_replaces_previous_file(tmp_path):
    lora = read_lora(lf.save(lf.lora_state_dict(lf.random_factors("sd1", rank=2), "sd1", "kohya"),
                             tmp_path / "src.safetensors"))
    target = _existing(tmp_path)
    write_lora(lora, target, architecture="sd1")
    assert len(read_lora(target).layers) == len(lora.layers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors", "src.safetensors"]


@pytest.mark.parametrize("extra, problem", [
    ({"lorax.rank": 8}, "must map a string to a string"),
    ({"lorax.source": "bad \udcff surrogate"}, "not valid UTF-8"),
    ({"lorax.report": "x" * 4_000_001}, "too large"),
])
def test_bad_metadata_is_rejected_before_writing(tmp_path, extra, problem):
    lora = read_lora(lf.save(lf.lora_state_dict(lf.random_factors("sd1", rank=2), "sd1", "kohya"),
                             tmp_path / "src.safetensors"))
    target = _existing(tmp_path)
    with pytest.raises(LoraFileError, match=problem) as info:
        write_lora(lora, target, architecture="sd1", extra_metadata=extra)
    assert str(target) in str(info.value)
    assert target.read_bytes() == b"previous file"


def test_write_errors_for_missing_folder_and_wrong_architecture(tmp_path):
    lora = LoraModel({"clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.weight":
                      LoraLayer(torch.ones(5120, 1), torch.ones(1, 1280), 1.0, (5120, 1280))})
    with pytest.raises(OutputPathError, match="does not exist"):
        write_lora(lora, tmp_path / "no" / "x.safetensors", architecture="sdxl")
    with pytest.raises(LoraFileError, match="architecture 'flux'"):
        write_lora(lora, tmp_path / "x.safetensors", architecture="flux")
    with pytest.raises(LoraFileError, match="no layers"):
        write_lora(LoraModel({}), tmp_path / "x.safetensors", architecture="sdxl")


# --- errors --------------------------------------------------------------------------------------------

Q = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"


def _one_layer(**over):
    sd = {f"{Q}.lora_up.weight": torch.randn(320, 4), f"{Q}.lora_down.weight": torch.randn(4, 320),
          f"{Q}.alpha": torch.tensor(4.0)}
    sd.update(over)
    return sd


ERROR_CASES = {
    "no_lora_keys": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)},
                     "holds no LoRA weights"),
    "unknown_keys": ({**_one_layer(), **{f"lora_unet_mystery_{i}.lora_up.weight": torch.zeros(2, 2) for i in range(7)}},
                     "unknown key scheme: 7 of 10 keys"),
    "unknown_suffix": (_one_layer(**{f"{Q}.diff_b": torch.zeros(320)}), "unknown key scheme"),
    "flux": ({"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 4),
              "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 3072)}, "Flux"),
    "rank_mismatch": (_one_layer(**{f"{Q}.lora_down.weight": torch.randn(8, 320)}),
                      f"layer '{Q}': inner ranks differ: up [320, 4] has 4 columns but down [8, 320] has 8 rows"),
    "rank_zero": (_one_layer(**{f"{Q}.lora_up.weight": torch.zeros(320, 0),
                                f"{Q}.lora_down.weight": torch.zeros(0, 320)}), "rank 0"),
    "nan": (_one_layer(**{f"{Q}.lora_down.weight": torch.full((4, 320), float("nan"))}),
            f"layer '{Q}': tensor '{Q}.lora_down.weight' contains NaN or Inf"),
    "inf": (_one_layer(**{f"{Q}.lora_up.weight": torch.full((320, 4), float("inf"))}), "NaN or Inf"),
    # one bad value among good ones, in each storage dtype (float8 has no min/max kernel of its own)
    "nan_one_fp16": (_one_layer(**{f"{Q}.lora_down.weight": torch.randn(4, 320).half().index_put_(
        (torch.tensor([2]), torch.tensor([100])), torch.tensor(float("nan")).half())}), "NaN or Inf"),
    "inf_one_bf16": (_one_layer(**{f"{Q}.lora_up.weight": torch.randn(320, 4).bfloat16().index_put_(
        (torch.tensor([7]), torch.tensor([3])), torch.tensor(-float("inf")).bfloat16())}), "NaN or Inf"),
    "nan_one_float8": (_one_layer(**{f"{Q}.lora_down.weight": torch.randn(4, 320).index_put_(
        (torch.tensor([0]), torch.tensor([319])), torch.tensor(float("nan"))).to(torch.float8_e4m3fn)}),
        "NaN or Inf"),
    "alpha_not_scalar": (_one_layer(**{f"{Q}.alpha": torch.tensor([4.0, 4.0])}),
                         "alpha must be a single number but has shape [2]"),
    "mixed": ({**_one_layer(), "unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 640),
               "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight": torch.zeros(640, 4)},
              "mixed key schemes in one file: kohya"),
    "up_without_down": ({f"{Q}.lora_up.weight": torch.randn(320, 4)}, "has a LoRA up factor but no down factor"),
    "incomplete_loha": ({f"{Q}.hada_w1_a": torch.randn(320, 4), f"{Q}.hada_w1_b": torch.randn(4, 320)},
                        "LoHa layer"),
    "mixed_adapters": (_one_layer(**{f"{Q}.hada_w1_a": torch.randn(320, 4)}), f"layer '{Q}' mixes loha and lora"),
    "dora": (_one_layer(**{f"{Q}.dora_scale": torch.ones(320, 1)}), "DoRA"),
    "same_weight_twice": ({**_one_layer(), **{k.replace(Q, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
                                                          "attn1_to_q"): v for k, v in _one_layer().items()}},
                          "two different entries patch the same weight"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_lora_files_raise_one_clear_error(tmp_path, case):
    sd, problem = ERROR_CASES[case]
    path = lf.save(sd, tmp_path / f"{case}.safetensors")
    with pytest.raises(LoraFileError) as info:
        read_lora(path)
    assert str(info.value).startswith(f"{path}: ")
    assert problem in str(info.value)


def test_unknown_key_examples_are_limited_to_five(tmp_path):
    sd, _ = ERROR_CASES["unknown_keys"]
    with pytest.raises(LoraFileError, match=r"mystery_4\.lora_up\.weight' and 2 more") as info:
        read_lora(lf.save(sd, tmp_path / "u.safetensors"))
    assert "mystery_5" not in str(info.value)


def test_file_level_errors(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(LoraFileError, match="not a LoRA file type: '.txt'"):
        read_lora(txt)
    good = lf.save(lf.lora_state_dict(lf.random_factors("sd1", rank=2), "sd1", "kohya"), tmp_path / "cut.safetensors")
    good.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(LoraFileError, match="truncated"):
        read_lora(good)
    with pytest.raises(LoraFileError, match="file not found"):
        read_lora(tmp_path / "missing.safetensors")


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_pickled_loras_load_only_when_weights_only(tmp_path):
    sd = lf.lora_state_dict(lf.random_factors("sd1", rank=2), "sd1", "kohya")
    safe = tmp_path / "safe.pt"
    torch.save(sd, str(safe))
    assert sorted(read_lora(safe).layers) == sorted(read_lora(lf.save(sd, tmp_path / "s.safetensors")).layers)
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({**sd, "x": _Evil(marker)}))
    with pytest.raises(LoraFileError, match="refused"):
        read_lora(evil)
    assert not marker.exists()


def test_state_dict_without_path_names_the_source():
    with pytest.raises(LoraFileError, match="^<LoRA state dict>: holds no tensors"):
        lora_from_state_dict({})


def test_shape_fallback_for_unknown_layouts():
    """A factor pair whose width fits no known weight keeps the factors' own shape."""
    sd = _one_layer(**{f"{Q}.lora_up.weight": torch.randn(7, 4), f"{Q}.lora_down.weight": torch.randn(4, 5, 3, 3)})
    layer = lora_from_state_dict(sd).layers["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"]
    assert layer.weight_shape == (7, 5, 3, 3) and layer.down.shape == (4, 45)
