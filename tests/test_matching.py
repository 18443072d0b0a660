"""Layer matching (METHOD §4) on the real SD1.5 / SDXL / Vega / CLIP key tables, and the selection policies."""
from __future__ import annotations

import math
import re

import pytest
import torch

from lorax_engine.analysis.matching import TargetIndex, compatibility, parse_key, select, stage_label
from lorax_engine.errors import TransferOptionError
from lorax_engine.files.base_weights import StateDictWeights


def _model(zoo, unet_table, clip=True):
    """A shapes-only provider of a real layout (meta tensors: names and shapes, no values)."""
    tensors = {f"diffusion_model.{k}": torch.empty(s, device="meta") for k, s in zoo.key_table(unet_table).items()}
    if clip:
        tensors.update({f"clip_l.transformer.{k}": torch.empty(s, device="meta")
                        for k, s in zoo.key_table("clip_l").items()})
    return StateDictWeights(tensors, architecture="test", name=unet_table)


@pytest.fixture(scope="module")
def sd15(zoo):
    return _model(zoo, "sd15_unet")


@pytest.fixture(scope="module")
def sdxl(zoo):
    return _model(zoo, "sdxl_unet")


def test_parse_key_positions_and_roles():
    ref = parse_key("diffusion_model.output_blocks.4.1.transformer_blocks.7.attn2.to_out.0.weight")
    assert (ref.side, ref.block, ref.depth, ref.role) == ("output", "output_blocks.4.1", 7, "attn2.to_out.0")
    ref = parse_key("diffusion_model.middle_block.1.proj_in.weight")
    assert (ref.side, ref.block, ref.depth, ref.role) == ("middle", "middle_block.1", None, "proj_in")
    assert parse_key("diffusion_model.input_blocks.5.0.in_layers.2.weight").role == "in_layers.2"
    assert parse_key("diffusion_model.input_blocks.0.0.weight").role == "conv"
    assert parse_key("diffusion_model.time_embed.0.weight").side == "unet"
    ref = parse_key("clip_g.transformer.text_model.encoder.layers.31.mlp.fc2.weight")
    assert (ref.side, ref.block, ref.role) == ("clip_g", "clip_g.layers.31", "mlp.fc2")
    assert parse_key("diffusion_model.input_blocks.4.1.proj_in.bias") is None


def test_stage_width_reads_the_input_side_of_up_projections():
    ff0 = "diffusion_model.input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight"
    assert stage_label(parse_key(ff0), (5120, 640)) == "input@640"
    kv = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    assert stage_label(parse_key(kv), (1280, 768)) == "middle@1280"
    fc1 = "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert stage_label(parse_key(fc1), (3072, 768)) == "clip_l@768"


def test_compatibility_rules():
    assert compatibility("attn1.to_q", (640, 640), (640, 640)) == "same"
    assert compatibility("proj_in", (640, 640, 1, 1), (640, 640)) == "squeeze"
    assert compatibility("attn2.to_k", (640, 768), (640, 2048)) == "embed"
    assert compatibility("attn1.to_k", (640, 768), (640, 2048)) is None     # only the context readers embed
    assert compatibility("attn2.to_k", (640, 2048), (640, 768)) is None     # never shrink
    assert compatibility("in_layers.2", (640, 640, 3, 3), (640, 5760)) is None


def _expected(table_keys, pattern):
    return sorted(k for k in table_keys if re.fullmatch(pattern, k))


def test_sd15_to_sdxl_candidates_follow_the_stage_table(sd15, sdxl):
    index = TargetIndex(sdxl)
    xl = sdxl.keys()
    tb = r"diffusion_model\.{}\.transformer_blocks\.\d+\.{}\.weight"

    def cands(key):
        c = index.candidates(key, sd15.shape(key))
        return c, sorted(t for t, _ in c.targets)

    # SD1.5 320-channel attention: nothing in SDXL
    for block in ("input_blocks.1.1", "input_blocks.2.1", "output_blocks.9.1", "output_blocks.11.1"):
        for role in ("attn1.to_q", "attn2.to_k", "ff.net.0.proj"):
            c, t = cands(f"diffusion_model.{block}.transformer_blocks.0.{role}.weight")
            assert t == [] and c.reason == "no counterpart"
    # 640 input stage: input_blocks.4.1 and 5.1 at depth 2 each; k/v embedded into the 2048 context
    c, t = cands("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight")
    assert t == _expected(xl, tb.format(r"input_blocks\.[45]\.1", r"attn2\.to_k")) and len(t) == 4
    assert {compat for _, compat in c.targets} == {"embed"} and c.stage == "input@640"
    # 1280: SD1.5 output_blocks.3-5 face SDXL output_blocks.0-2 (depth 10): 30 candidates
    c, t = cands("diffusion_model.output_blocks.4.1.transformer_blocks.0.attn1.to_q.weight")
    assert t == _expected(xl, tb.format(r"output_blocks\.[012]\.1", r"attn1\.to_q")) and len(t) == 30
    c, t = cands("diffusion_model.output_blocks.7.1.transformer_blocks.0.ff.net.2.weight")
    assert t == _expected(xl, tb.format(r"output_blocks\.[345]\.1", r"ff\.net\.2")) and len(t) == 6
    c, t = cands("diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_out.0.weight")
    assert len(t) == 10
    # proj_in: SD1.5 1x1 conv -> SDXL linear
    c, t = cands("diffusion_model.input_blocks.7.1.proj_in.weight")
    assert t == ["diffusion_model.input_blocks.7.1.proj_in.weight", "diffusion_model.input_blocks.8.1.proj_in.weight"]
    assert {compat for _, compat in c.targets} == {"squeeze"}
    # resnets exist at 320 in both; the text encoder maps CLIP-L to CLIP-L
    c, t = cands("diffusion_model.input_blocks.1.0.in_layers.2.weight")
    assert t == [f"diffusion_model.input_blocks.{b}.0.in_layers.2.weight" for b in (1, 2)]
    c, t = cands("clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight")
    assert len(t) == 12 and c.stage == "clip_l@768" and {x for _, x in c.targets} == {"same"}


def test_sdxl_to_sd15_cannot_shrink_the_context_and_identity_layouts_include_themselves(zoo, sd15, sdxl):
    c = TargetIndex(sd15).candidates("diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
                                     (640, 2048))
    assert c.targets == [] and c.reason == "shape"
    # a model -> its fine-tune: every weight is a candidate for itself (SD1.5, SDXL with both text encoders)
    xl = StateDictWeights({**{k: torch.empty(sdxl.shape(k), device="meta") for k in sdxl.keys()},
                           **{f"clip_g.transformer.{k}": torch.empty(s, device="meta")
                              for k, s in zoo.key_table("clip_g").items()}}, architecture="test")
    for model in (sd15, xl):
        index = TargetIndex(model)
        checked = 0
        for key in model.keys():
            if key.endswith(".weight") and len(model.shape(key)) in (2, 4):
                assert key in [t for t, _ in index.candidates(key, model.shape(key)).targets], key
                checked += 1
        assert checked > 300


def test_sdxl_to_vega_uses_the_blocks_vega_has(zoo, sdxl):
    vega = _model(zoo, "vega_unet", clip=False)
    index = TargetIndex(vega)
    vega_shapes = {k: vega.shape(k) for k in vega.keys()}
    key = "diffusion_model.output_blocks.1.1.transformer_blocks.7.attn1.to_v.weight"
    c = index.candidates(key, sdxl.shape(key))
    expected = _expected(vega.keys(),
                         r"diffusion_model\.output_blocks\.[012]\.1\.transformer_blocks\.\d+\.attn1\.to_v\.weight")
    assert sorted(t for t, _ in c.targets) == expected and 0 < len(expected) < 30
    assert all(vega_shapes[t] == (1280, 1280) for t in expected)


def test_direct_rule_is_name_and_matrix_shape(sd15, sdxl):
    index = TargetIndex(sdxl)
    k = "diffusion_model.input_blocks.4.1.proj_in.weight"
    assert index.direct(k, sd15.shape(k)).targets == [(k, "squeeze")]
    k = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_v.weight"
    assert index.direct(k, sd15.shape(k)).reason == "shape"
    k = "diffusion_model.output_blocks.10.1.transformer_blocks.0.attn1.to_q.weight"
    assert index.direct(k, sd15.shape(k)).reason == "no counterpart"


def test_select_policies():
    scored = [("a", 0.2), ("own", 0.9), ("b", 0.9), ("c", -0.01)]
    chosen, reasons = select("own", scored, "best", 0.05)
    assert chosen == {"own": 1.0}                                  # tie broken towards the source's own key
    assert reasons == {"a": "another candidate scored higher", "b": "another candidate scored higher",
                       "c": "below threshold"}
    chosen, _ = select("x", scored, "best", 0.05)
    assert chosen == {"own": 1.0}                                  # first in model order among equals
    assert select("x", scored, "best", 0.95) == ({}, {k: "below threshold" for k, _ in scored})
    chosen, reasons = select("x", scored, "all-above-threshold", 0.05)
    assert chosen == {"a": 1.0, "own": 1.0, "b": 1.0} and reasons == {"c": "below threshold"}
    chosen, _ = select("x", scored, "spread", 0.05)
    assert chosen == {"a": 1 / 3, "own": 1 / 3, "b": 1 / 3} and math.isclose(sum(chosen.values()), 1.0)
    chosen, _ = select("x", scored, "spread", -math.inf)
    assert len(chosen) == 4
    with pytest.raises(TransferOptionError):
        select("x", scored, "nearest", 0.0)
    with pytest.raises(TransferOptionError):
        select("x", scored, "best", float("nan"))
