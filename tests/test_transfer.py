"""End-to-end transfers on the zoo's full-size synthetic checkpoints, checked against float64 SVDs computed
here, against ComfyUI's own LoRA loader, and across LoRA spellings, methods and policies."""
from __future__ import annotations

import functools
import math

import lora_factory
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorax_engine.analysis.matching import DEFAULT_THRESHOLD
from lorax_engine.analysis.subspaces import SubspaceCache
from lorax_engine.errors import ArchitectureError, IncompatibleLoraError, TransferOptionError
from lorax_engine.files.base_weights import CheckpointWeights, StateDictWeights
from lorax_engine.files.lora import LoraLayer, LoraModel
from lorax_engine.files.lora_formats import read_lora, write_lora
from lorax_engine.projection.operators import project_subspace
from lorax_engine.projection.transfer import (
    TransferCancelled,
    TransferOptions,
    compute_similarity_map,
    project,
    transfer,
)

UNET = "diffusion_model."
SD15_FILE_PREFIX = {"diffusion_model.": "model.diffusion_model.",
                    "clip_l.transformer.": "cond_stage_model.transformer."}

# Layers of every kind the method treats differently, all in stages with few candidates (fast to score).
SELF_KEYS = [
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",      # 320: r >= width
    "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",      # square 640
    "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",      # [640, 768]
    "diffusion_model.input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight",   # [5120, 640]
    "diffusion_model.input_blocks.4.1.proj_in.weight",                              # 1x1 conv
    "diffusion_model.input_blocks.5.0.in_layers.2.weight",                          # 3x3 conv [640, 5760]
    "clip_l.transformer.text_model.encoder.layers.3.self_attn.out_proj.weight",     # text encoder
]

# SD1.5 -> SDXL: 320-channel layers (no counterpart), 640 and 1280 stages, cross-attention k/v, 1x1 conv
# proj_in -> linear, text encoder.
XL_KEYS = [
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
    "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
    "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
    "diffusion_model.input_blocks.5.1.transformer_blocks.0.attn2.to_v.weight",
    "diffusion_model.input_blocks.4.1.transformer_blocks.0.ff.net.2.weight",
    "diffusion_model.input_blocks.4.1.proj_in.weight",
    "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
    "diffusion_model.output_blocks.10.1.transformer_blocks.0.attn1.to_k.weight",
    "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "clip_l.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
]


def _file_key(canonical: str) -> str:
    for canon, prefix in SD15_FILE_PREFIX.items():
        if canonical.startswith(canon):
            return prefix + canonical[len(canon):]
    raise KeyError(canonical)


def _lora(keys, rank=8, seed=0, alpha=4.0) -> LoraModel:
    factors = lora_factory.random_factors("sd1", rank=rank, seed=seed, alpha=alpha, targets=keys)
    return LoraModel({k: LoraLayer(f.up, f.down, alpha, f.shape) for k, f in factors.items()}, "sd1")


@functools.cache
def _svd64(path, canonical):
    """Independent reference: full float64 SVD of the checkpoint's weight, read with the safetensors library
    (not regenerated: zoo.weight() can differ from the file in the last fp16 bit with another thread count)."""
    with safe_open(path, "pt") as f:
        w = f.get_tensor(_file_key(canonical)).double()
    w = w.reshape(w.shape[0], -1)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u, vh.T


@pytest.fixture(scope="module")
def sd15(zoo):
    with CheckpointWeights(zoo.checkpoint("sd15")) as weights:
        yield weights


@pytest.fixture(scope="module")
def sdxl(zoo):
    with CheckpointWeights(zoo.checkpoint("sdxl")) as weights:
        yield weights


@pytest.fixture(scope="module")
def cache():
    # one content-keyed cache for the module: a basis is the same whichever test computes it first
    return SubspaceCache(memory_bytes=2 << 30)


# ------------------------------------------------------------------------------------ source = target

@pytest.mark.parametrize("method", ["exact", "fast"])
def test_source_equals_target_passes_through_by_default_and_eq3_projects_onto_own_subspaces(zoo, sd15, cache, method):
    lora = _lora(SELF_KEYS)
    out, report = transfer(lora, sd15, sd15, TransferOptions(method=method), cache=cache)
    eq3, eq3_report = transfer(lora, sd15, sd15, TransferOptions(method=method, mode="subspace"), cache=cache)
    assert sorted(out.layers) == sorted(eq3.layers) == sorted(SELF_KEYS)
    assert report.summary()["applied"] == len(SELF_KEYS) == report.summary()["identical_layers"]
    for key in SELF_KEYS:
        layer = lora.layers[key]
        # identity axiom (METHOD §2): the default mode keeps an update on identical weights whole
        got = out.layers[key]
        assert torch.equal(got.up, layer.up.reshape(got.up.shape)) and torch.equal(got.down, layer.down.reshape(
            got.down.shape)) and got.alpha == layer.alpha
        # the paper's Eq. 3 projects onto the layer's own top-320 subspaces
        got = eq3.layers[key]
        assert got.weight_shape == layer.weight_shape and got.alpha == layer.alpha and got.rank == layer.rank
        u, v = _svd64(str(zoo.checkpoint("sd15")), key)
        u, v = u[:, :320], v[:, :320]
        expected_up = u @ (u.T @ layer.up.double())
        expected_down = (layer.down.double() @ v) @ v.T
        # the source's own layer is the unique best candidate (identical content: score 1)
        for rep in (report, eq3_report):
            rec = next(r for r in rep.layers if r.source_key == key)
            assert [c.target_key for c in rec.candidates if c.applied] == [key]
            assert rec.best.similarity["score"] == 1.0 and rec.best.similarity["identical"]
        if method == "exact":
            torch.testing.assert_close(got.up.double(), expected_up, rtol=1e-3, atol=1e-5)
            torch.testing.assert_close(got.down.double(), expected_down, rtol=1e-3, atol=1e-5)
        else:   # "gram" projection bases: documented within ~5e-4 of exact (subspaces.py)
            for got_f, exp_f in ((got.up, expected_up), (got.down, expected_down)):
                assert float((got_f.double() - exp_f).norm() / exp_f.norm()) < 2e-3


def test_source_equals_target_at_full_rank_keeps_square_layers_and_drops_only_null_spaces(zoo, sd15, cache):
    lora = _lora(SELF_KEYS, seed=1)
    out, report = transfer(lora, sd15, sd15, TransferOptions(rank=100_000, method="exact", mode="subspace"),
                           cache=cache)
    for key in SELF_KEYS:
        layer, got = lora.layers[key], out.layers[key]
        m, n = layer.up.shape[0], layer.down.shape[1]
        u, v = _svd64(str(zoo.checkpoint("sd15")), key)
        if m == n:
            assert torch.equal(got.up, layer.up) and torch.equal(got.down, layer.down), key
            continue
        # a rectangular weight spans only min(m, n) dimensions on its longer side
        expected_up = layer.up.double() if m < n else u @ (u.T @ layer.up.double())
        expected_down = (layer.down.double() @ v) @ v.T if m < n else layer.down.double()
        torch.testing.assert_close(got.up.double(), expected_up, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(got.down.double(), expected_down, rtol=1e-3, atol=1e-5)
        lost = (layer.down.double() - expected_down) if m < n else (layer.up.double() - expected_up)
        assert float(lost.norm()) > 0.1 * float(layer.down.double().norm() if m < n else layer.up.double().norm())


# ------------------------------------------------------------------------------------ related / unrelated

FT_KEYS = [
    "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
    "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
    "diffusion_model.output_blocks.7.1.transformer_blocks.0.ff.net.2.weight",
    "clip_l.transformer.text_model.encoder.layers.3.self_attn.out_proj.weight",
]


@pytest.fixture(scope="module")
def finetune_pair(zoo):
    """sd15 and sd15_finetune restricted to every layer competing with FT_KEYS (all candidates included)."""
    keys = set()
    table = lora_factory.model_shapes("sd1")
    for src in FT_KEYS:
        role = src.split("transformer_blocks.0.")[-1] if UNET in src else src.split("layers.3.")[-1]
        side = src.split(".")[1]
        for k, shape in table.items():
            if k.endswith(role) and k.split(".")[1] == side and shape == table[src]:
                keys.add(k)
    base = {k: zoo.weight("sd15", _file_key(k)) for k in sorted(keys)}
    tuned = {k: zoo.weight("sd15_finetune", _file_key(k)) for k in sorted(keys)}
    return StateDictWeights(base, "sd1", "sd15"), StateDictWeights(tuned, "sd1", "sd15_finetune")


def _in_subspace_lora(weights, keys, k=4):
    """A LoRA living in each layer's top singular directions, as trained LoRAs largely do."""
    layers = {}
    for key in keys:
        w = weights.matrix(key).double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        g = torch.Generator().manual_seed(len(key))
        up = (u[:, :k] @ torch.randn(k, k, generator=g, dtype=torch.float64)).float() * 0.01
        down = vh[:k].float()
        layers[key] = LoraLayer(up, down, float(k), weights.shape(key))
    return LoraModel(layers, "sd1")


def test_finetune_target_scores_near_one_and_keeps_the_delta(finetune_pair, cache):
    base, tuned = finetune_pair
    lora = _in_subspace_lora(base, FT_KEYS)
    out, report = transfer(lora, base, tuned, TransferOptions(method="exact"), cache=cache)
    for rec in report.layers:
        assert rec.applied and [c.target_key for c in rec.candidates if c.applied] == [rec.source_key]
        assert rec.best.similarity["score"] > 0.9
        others = [c.similarity["score"] for c in rec.candidates if not c.applied]
        assert all(abs(s) < 0.02 for s in others), others      # the other layers of the role: chance
    for key in FT_KEYS:
        src, got = lora.layers[key].delta().double(), out.layers[key].delta().double()
        assert float((got - src).norm() / src.norm()) < 0.02


def test_fast_method_agrees_with_exact_on_zoo_weights(finetune_pair, cache):
    base, tuned = finetune_pair
    lora = _lora(FT_KEYS, seed=4)
    exact_out, exact_rep = transfer(lora, base, tuned, TransferOptions(method="exact"), cache=cache)
    fast_out, fast_rep = transfer(lora, base, tuned, TransferOptions(method="fast"), cache=cache)
    worst = 0.0
    for re_, rf in zip(exact_rep.layers, fast_rep.layers, strict=False):
        for ce, cf in zip(re_.candidates, rf.candidates, strict=False):
            assert ce.target_key == cf.target_key
            worst = max(worst, abs(ce.similarity["score"] - cf.similarity["score"]))
    assert worst <= 0.01
    assert sorted(fast_out.layers) == sorted(exact_out.layers)
    for key, layer in exact_out.layers.items():
        e, f = layer.delta().double(), fast_out.layers[key].delta().double()
        assert float((f - e).norm() / e.norm()) <= 1e-2


# ------------------------------------------------------------------------------------ SD1.5 -> SDXL

@pytest.fixture(scope="module")
def xl_transfer(sd15, sdxl, cache):
    lora = _lora(XL_KEYS, rank=8, seed=2)
    cache.pairs = None     # score every pair afresh (bases may come from memory): all candidate energies known
    steps = []
    out, report = transfer(lora, sd15, sdxl, TransferOptions(threshold=-math.inf), cache=cache,
                           progress=lambda d, t: steps.append((d, t)))
    return lora, out, report, steps


def test_sd15_to_sdxl_writes_only_real_sdxl_weights(xl_transfer, zoo):
    lora, out, report, _ = xl_transfer
    xl_shapes = lora_factory.model_shapes("sdxl")
    for key, layer in out.layers.items():
        assert key in xl_shapes, key
        assert layer.weight_shape == tuple(xl_shapes[key])
        assert layer.up.shape[0] == xl_shapes[key][0] and layer.down.shape[1] == math.prod(xl_shapes[key][1:])
    # nothing for the 320-channel blocks: SDXL has no attention there
    for rec in report.layers:
        if ".input_blocks.1.1." in rec.source_key or ".input_blocks.2.1." in rec.source_key \
                or ".output_blocks.10.1." in rec.source_key:
            assert not rec.applied and rec.reason == "no counterpart" and not rec.candidates
    assert not any(".input_blocks.1.1." in k or ".input_blocks.2.1." in k for k in out.layers)
    kv = [k for k in out.layers if ".attn2.to_k." in k or ".attn2.to_v." in k]
    assert kv and all(out.layers[k].weight_shape[1] == 2048 for k in kv)
    proj = [k for k in out.layers if k.endswith("proj_in.weight")]
    assert proj and all(len(out.layers[k].weight_shape) == 2 for k in proj)
    assert out.architecture == "sdxl"


def test_sd15_to_sdxl_similarities_are_chance_for_unet_and_one_for_clip_l(xl_transfer):
    lora, out, report, _ = xl_transfer
    unet_scores, clip_scores = [], []
    for rec in report.layers:
        for c in rec.candidates:
            if c.similarity is not None:
                (unet_scores if rec.source_key.startswith(UNET) else clip_scores).append(c.similarity["score"])
        if rec.source_key.startswith("clip_l.") and ".layers.11." not in rec.source_key:
            # SDXL's CLIP-L is SD1.5's: the same layer is found identical on its values, the update arrives whole,
            # and no other candidate needs a score (identical weights cannot be beaten)
            assert [c.target_key for c in rec.candidates if c.applied] == [rec.source_key]
            assert rec.best.similarity["score"] == 1.0 and rec.best.similarity["identical"]
            assert [c.similarity is None for c in rec.candidates] == [not c.applied for c in rec.candidates]
            assert rec.energy_kept == pytest.approx(1.0)
            torch.testing.assert_close(out.layers[rec.source_key].delta(), lora.layers[rec.source_key].delta())
    # SDXL reads CLIP-L's penultimate layer: layer 11 is reported, not applied
    last = next(r for r in report.layers if ".layers.11." in r.source_key)
    assert not last.applied and last.reason == "unused by target" and last.source_key not in out.layers
    # independent UNets: every candidate at chance, far below the default threshold
    assert unet_scores and max(abs(s) for s in unet_scores) < DEFAULT_THRESHOLD / 2
    assert set(clip_scores) == {1.0}
    # each candidate counted: 640 stage 4 per role, middle 10, CLIP 12
    counts = {rec.source_key.split(".")[1]: len(rec.candidates) for rec in report.layers if rec.candidates}
    assert counts["input_blocks"] == 4 and counts["middle_block"] == 10


def test_sd15_to_sdxl_loads_in_comfyui_with_every_key_applied(xl_transfer, comfy, zoo, comfy_logs, tmp_path):
    import comfy.lora
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sdxl_clip
    import comfy.supported_models_base

    _, out, report, _ = xl_transfer
    path = write_lora(out, tmp_path / "xl.safetensors", architecture="sdxl", extra_metadata=report.metadata())
    sd = load_file(str(path))
    written = {k.rsplit(".lora_up.weight", 1)[0] for k in sd if k.endswith(".lora_up.weight")}
    assert len(written) == len(out.layers) == report.summary()["target_layers_written"]
    with torch.inference_mode():
        # a full-size SDXL UNet and CLIP with uninitialised weights: real key names and shapes, no values
        meta = {"model.diffusion_model." + k: torch.empty(s, device="meta")
                for k, s in zoo.key_table("sdxl_unet").items()}
        config = comfy.model_detection.model_config_from_unet(meta, "model.diffusion_model.")
        assert type(config).__name__ == "SDXL"
        config.set_inference_dtype(torch.float16, None)
        model = comfy.model_patcher.ModelPatcher(config.get_model(meta, "model.diffusion_model."),
                                                 load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
        clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer,
                                                                    comfy.sdxl_clip.SDXLClipModel))
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, sd, 1.0, 1.0)
        assert comfy_logs.lora_keys_not_loaded() == []
        patched = set(new_model.patches) | set(new_clip.patcher.patches)
        assert patched == set(out.layers)
        unet_sd = new_model.model.state_dict()
        for key in out.layers:
            if key.startswith(UNET):
                assert tuple(unet_sd[key].shape) == out.layers[key].weight_shape
        # ComfyUI's own weight calculation of a cross-attention k: W0 + ΔW, with ΔW [1280, 2048]
        key = next(k for k in out.layers if k.startswith("diffusion_model.middle_block.1.")
                   and k.endswith("attn2.to_k.weight"))
        w0 = torch.zeros(out.layers[key].weight_shape)
        got = comfy.lora.calculate_weight(new_model.patches[key], w0.clone(), key)
    expected = out.layers[key].to(dtype=torch.float16).delta()
    torch.testing.assert_close(got.float(), expected.reshape(w0.shape), rtol=2e-3, atol=1e-5)


def test_sd15_to_sdxl_report_agrees_with_output_and_progress_is_complete(xl_transfer):
    lora, out, report, steps = xl_transfer
    s = report.summary()
    assert s["source_layers"] == len(lora.layers)
    assert s["applied"] + s["dropped"] == len(lora.layers)
    assert s["dropped_by_reason"] == {"no counterpart": 3, "unused by target": 1}
    assert {t.target_key for t in report.targets} == set(out.layers)
    assert sum(len(t.sources) for t in report.targets) == sum(
        sum(c.applied for c in r.candidates) for r in report.layers)
    xl_shapes = lora_factory.model_shapes("sdxl")
    for rec in report.layers:
        for c in rec.candidates:
            assert (c.energy_kept is not None) == c.applied
            assert c.energy_kept is None or 0.0 <= c.energy_kept <= 1.0 + 1e-6
            if c.similarity is None:                 # never needed: no number
                continue
            m, n = xl_shapes[c.target_key][0], math.prod(xl_shapes[c.target_key][1:])
            assert c.similarity["chance_u"] == pytest.approx(min(1.0, 320 / m))
            if c.compat == "embed":     # normalised within the CLIP-L slot (METHOD §3), its share reported
                assert 0.0 < c.similarity["slot_share_v"] <= 1.0
            else:
                assert c.similarity["chance_v"] == pytest.approx(min(1.0, 320 / n))
    # progress ends complete and never goes back
    assert steps[-1][0] == steps[-1][1]
    assert all(a[0] <= b[0] for a, b in zip(steps, steps[1:], strict=False))


def test_same_lora_in_every_spelling_gives_the_same_result(sd15, sdxl, cache, tmp_path):
    keys = [k for k in XL_KEYS if ".input_blocks.4.1." in k or "clip_l" in k or ".input_blocks.1.1." in k]
    factors = lora_factory.random_factors("sd1", rank=4, seed=5, alpha=2.0, targets=keys)
    results = {}
    for scheme in ("kohya", "kohya_diffusers", "diffusers", "diffusers_old", "peft"):
        from safetensors.torch import save_file
        path = tmp_path / f"{scheme}.safetensors"
        save_file(lora_factory.lora_state_dict(factors, "sd1", scheme), str(path))
        lora = read_lora(path)
        assert sorted(lora.layers) == sorted(keys), scheme
        results[scheme] = transfer(lora, sd15, sdxl, TransferOptions(threshold=-math.inf), cache=cache)[0]
    ref = results["kohya"]
    assert ref.layers
    for scheme, out in results.items():
        assert sorted(out.layers) == sorted(ref.layers), scheme
        for key, layer in out.layers.items():
            torch.testing.assert_close(layer.delta(), ref.layers[key].delta(), rtol=1e-5, atol=1e-7,
                                       msg=f"{scheme} {key}")


# ------------------------------------------------------------------------------------ policies, split, hooks

def test_policies_spread_and_all_above_threshold(finetune_pair, cache):
    base, _ = finetune_pair
    key = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    lora = _lora([key], seed=6)
    smap = compute_similarity_map(base, base, TransferOptions(method="exact"), lora=lora, cache=cache)
    cands = [t for t, _ in smap.entries[key].candidates.targets]
    assert len(cands) == 2           # input_blocks.4.1 and 5.1
    spread, rep = project(lora, smap, TransferOptions(method="exact", policy="spread", threshold=-math.inf))
    every, _ = project(lora, smap, TransferOptions(method="exact", policy="all-above-threshold",
                                                  threshold=-math.inf))
    assert sorted(spread.layers) == sorted(every.layers) == sorted(cands)
    for t in cands:
        torch.testing.assert_close(spread.layers[t].delta().double(), 0.5 * every.layers[t].delta().double(),
                                   rtol=1e-5, atol=1e-8)
    assert [c.strength for c in rep.layers[0].candidates] == [0.5, 0.5]
    # the default threshold drops the unrelated block (score ~0) under all-above-threshold
    gated, rep = project(lora, smap, TransferOptions(method="exact", policy="all-above-threshold"))
    assert sorted(gated.layers) == [key]
    assert [c.reason for c in rep.layers[0].candidates if not c.applied] == ["below threshold"]


def test_direct_mode_is_the_name_match_baseline(sd15, sdxl, cache):
    lora = _lora(XL_KEYS, seed=7)
    out, report = transfer(lora, sd15, sdxl, TransferOptions(mode="direct"), cache=cache)
    # same names with the same matrix shape only: 640 self-attention and proj_in (conv -> linear), CLIP-L;
    # to_k/v differ in width, 320 blocks and SD1.5 output_blocks.10 do not exist in SDXL
    expected = {k for k in XL_KEYS if ("input_blocks.4.1" in k and "attn2" not in k) or k.startswith("clip_l")}
    assert set(out.layers) == expected
    for key in expected:
        torch.testing.assert_close(out.layers[key].delta().reshape(-1), lora.layers[key].delta().reshape(-1))
    reasons = {r.source_key: r.reason for r in report.layers if not r.applied}
    assert reasons["diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"] == "shape"
    assert reasons["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"] == "no counterpart"
    assert report.mode.startswith("direct")


def test_should_stop_cancels_and_options_are_validated(sd15, cache):
    lora = _lora(SELF_KEYS[:2])
    with pytest.raises(TransferCancelled):
        transfer(lora, sd15, sd15, TransferOptions(), cache=cache, should_stop=lambda: True)
    for bad in ({"policy": "most"}, {"mode": "x"}, {"method": "quick"}, {"threshold": 2.0}, {"rank": 0},
                {"output_rank": 0}, {"device": "tpu"}):
        with pytest.raises(TransferOptionError):
            TransferOptions(**bad)


def test_lora_of_another_model_is_refused_with_a_clear_error(sd15, cache):
    factors = lora_factory.random_factors("sdxl", rank=2, targets=[
        "diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"])
    lora = LoraModel({k: LoraLayer(f.up, f.down, 2.0, f.shape) for k, f in factors.items()}, "sdxl",
                     source_path="xl_style.safetensors")
    with pytest.raises(ArchitectureError, match="^xl_style.safetensors is an SDXL LoRA, but the source model "
                                                "sd15-v1.safetensors is SD1.5: pick the SDXL checkpoint"):
        transfer(lora, sd15, sd15, TransferOptions(), cache=cache)


def test_output_rank_cap_recompresses_merged_layers(finetune_pair, cache):
    base, _ = finetune_pair
    key = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    lora = _lora([key], rank=8, seed=8)
    full, _ = transfer(lora, base, base, TransferOptions(method="exact"), cache=cache)
    capped, rep = transfer(lora, base, base, TransferOptions(method="exact", output_rank=3), cache=cache)
    assert capped.layers[key].rank == 3
    u, s, vh = torch.linalg.svd(full.layers[key].delta().double())
    torch.testing.assert_close(capped.layers[key].delta().double(), (u[:, :3] * s[:3]) @ vh[:3], rtol=1e-3,
                               atol=1e-6)
    assert rep.targets[0].cap_energy_kept == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()), rel=1e-4)


def test_split_map_then_project_checks_the_lora_against_the_source(finetune_pair, cache):
    base, _ = finetune_pair
    good = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    odd = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"   # [640, 768] in SD1.5
    smap = compute_similarity_map(base, base, TransferOptions(method="exact"), source_keys=[good, odd], cache=cache)
    assert smap.entries[good].energies == {}                     # scored without a LoRA
    wrong = LoraLayer(torch.randn(640, 2), torch.randn(2, 2048), 2.0, (640, 2048))      # an SDXL-shaped k
    lora = LoraModel({good: _lora([good]).layers[good], odd: wrong}, "sd1")
    out, report = project(lora, smap)
    assert sorted(out.layers) == [good]
    assert {r.source_key: r.reason for r in report.layers} == {good: None, odd: "not in source model"}
    applied = next(r for r in report.layers if r.source_key == good)
    assert [c.energy_kept is not None for c in applied.candidates] == [c.applied for c in applied.candidates]
    with pytest.raises(IncompatibleLoraError, match="does not fit the source model"):
        project(LoraModel({odd: wrong}, "sd1"), smap)


def test_several_source_layers_on_one_target_are_summed_on_concatenated_factors(finetune_pair, cache):
    base, _ = finetune_pair
    keys = [f"diffusion_model.input_blocks.{b}.1.transformer_blocks.0.attn1.to_q.weight" for b in (4, 5)]
    lora = _lora(keys, rank=3, seed=9, alpha=1.5)
    out, report = transfer(lora, base, base, TransferOptions(method="exact", policy="all-above-threshold",
                                                             threshold=-math.inf, mode="subspace"), cache=cache)
    assert sorted(out.layers) == keys and all(len(t.sources) == 2 for t in report.targets)
    for t in keys:
        basis = cache.get(base, t, TransferOptions(method="exact").exact_spec()).top(320)
        expected = sum(project_subspace(lora.layers[s], basis, (640, 640)).delta().double() for s in keys)
        got = out.layers[t]
        assert got.rank == 6 and got.alpha == 6.0
        torch.testing.assert_close(got.delta().double(), expected, rtol=1e-5, atol=1e-8)
