"""Transfer fidelity on weights that look trained (METHOD §2, §2b, §3, §4), against float64 references computed
here: exact SVDs of both weights, the chance-normalised scores written out, and the side-wise operator formed as
dense matrices. Every mode x method x pair kind, the identity axiom across storage dtypes, slot-aware k/v, the
degenerate-pair flag and block-level matching."""
from __future__ import annotations

import math

import pytest
import torch
from float64_reference import reference_transfer
from float64_reference import relative_error as _rel

from lorax_engine.analysis.subspaces import SubspaceCache
from lorax_engine.files.base_weights import StateDictWeights
from lorax_engine.files.lora import LoraLayer, LoraModel
from lorax_engine.projection.transfer import TransferOptions, compute_similarity_map, project, transfer
from lorax_zoo.pairs import PAIR_KINDS, slot_pair, weight_pair

R = 320
SCORE_TOL = 0.01          # METHOD §2b: normalised scores within 0.01 of exact float64
DELTA_TOL = 1e-2          # projected updates within 1e-2 relative (Frobenius)
KEY = "diffusion_model.input_blocks.7.1.transformer_blocks.0.attn1.to_q.weight"
KV_KEY = "diffusion_model.input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight"
TEXT_KEY = "clip_l.transformer.text_model.encoder.layers.4.self_attn.q_proj.weight"


def _generic_lora(key, m, n, k=8, seed=0) -> LoraModel:
    """An ordinary community-style LoRA: factors in no particular subspace of the weight."""
    g = torch.Generator().manual_seed(seed)
    layer = LoraLayer(torch.randn(m, k, generator=g) * 0.02, torch.randn(k, n, generator=g) / math.sqrt(n),
                      float(k), (m, n))
    return LoraModel({key: layer}, "sd1")


_CACHE = SubspaceCache(memory_bytes=2 << 30)     # content-keyed: shared by the tests of this module


def _reference(mode, ws, wt, delta, identical):
    return reference_transfer(mode, ws, wt, delta, identical, R)


def _run(key, ws, wt, lora, mode, method):
    source = StateDictWeights({key: ws}, "sd1", "source")
    target = StateDictWeights({key: wt}, "sdxl", "target")
    out, report = transfer(lora, source, target, TransferOptions(method=method, mode=mode, threshold=-math.inf),
                           cache=_CACHE)
    return out, report.layers[0]


@pytest.fixture(scope="module")
def pairs():
    # 1280 x 1280 with spectra as slow as i^-0.2 and condition numbers up to 1e4 (METHOD §2b)
    cases = {}
    for kind in PAIR_KINDS:
        cases[kind] = weight_pair(kind, 1280, 1280, exponent=0.2, cond=1e4, seed=3, rank=R, overlap=0.6)
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fast", "exact"])
@pytest.mark.parametrize("mode", ["auto", "subspace", "subspace+null"])
@pytest.mark.parametrize("kind", PAIR_KINDS)
def test_every_mode_method_and_pair_kind_against_float64(pairs, kind, mode, method):
    ws, wt = pairs[kind]
    ws_stored, wt_stored = ws.float() if ws.dtype == torch.float64 else ws, \
        wt.float() if wt.dtype == torch.float64 else wt
    lora = _generic_lora(KEY, 1280, 1280, seed=hash(kind) % 1000)
    out, rec = _run(KEY, ws_stored, wt_stored, lora, mode, method)
    identical = kind in ("identical", "identical_fp32_fp16")
    score, expected = _reference(mode, ws_stored.double(), wt_stored.double(), lora.layers[KEY].delta().double(),
                                 identical)
    applied = next(c for c in rec.candidates if c.applied)
    assert applied.similarity["score"] == pytest.approx(score, abs=SCORE_TOL)
    assert applied.similarity["identical"] == identical
    assert _rel(out.layers[KEY].delta().double(), expected) <= DELTA_TOL
    if identical and mode != "subspace":
        assert torch.equal(out.layers[KEY].up, lora.layers[KEY].up) and rec.energy_kept == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["auto", "subspace+null"])
def test_text_encoder_layer_on_identical_clip_l_stored_fp32_vs_fp16_arrives_whole(mode):
    """SD1.5's CLIP-L (fp32, as v1-5-pruned-emaonly stores it) against SDXL's fp16 copy: 100% of the energy."""
    ws, wt = weight_pair("identical_fp32_fp16", 768, 768, exponent=0.3, cond=1e3, seed=5)
    lora = _generic_lora(TEXT_KEY, 768, 768, seed=6)
    out, rec = _run(TEXT_KEY, ws, wt, lora, mode, "fast")
    assert rec.energy_kept == 1.0 and next(c for c in rec.candidates if c.applied).operator.startswith("identity")
    assert torch.equal(out.layers[TEXT_KEY].delta(), lora.layers[TEXT_KEY].delta())
    # the paper's Eq. 3 alone cuts the same generic update to about (320/768)^2 of its energy
    _, eq3 = _run(TEXT_KEY, ws, wt, lora, "subspace", "fast")
    assert eq3.energy_kept == pytest.approx((R / 768) ** 2, rel=0.35)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["identical", "partial_overlap", "unrelated"])
def test_cross_attention_kv_slot_scores_and_projection_against_float64(kind):
    ws, wt = slot_pair(kind, 1280, exponent=0.3, cond=1e3, seed=7, rank=R, overlap=0.6)
    ws, wt = ws.float(), wt.float()
    lora = _generic_lora(KV_KEY, 1280, 768, seed=8)
    source = StateDictWeights({KV_KEY: ws}, "sd1", "source")
    target = StateDictWeights({KV_KEY: wt}, "sdxl", "target")
    out, report = transfer(lora, source, target, TransferOptions(method="exact", threshold=-math.inf),
                           cache=SubspaceCache())
    applied = next(c for c in report.layers[0].candidates if c.applied)
    score, expected = _reference("auto", ws.double(), wt.double(), lora.layers[KV_KEY].delta().double(), False)
    assert applied.compat == "embed"
    assert applied.similarity["score"] == pytest.approx(score, abs=SCORE_TOL)
    assert _rel(out.layers[KV_KEY].delta().double(), expected) <= DELTA_TOL
    assert 0.0 < applied.similarity["slot_share_v"] < 1.0
    # chance within the slot, not +0.27; related slots clearly above it (how far depends on how much of the
    # target's input subspace lies in the slot: the other 1280 columns are an unrelated weight here)
    floor = {"unrelated": None, "partial_overlap": 0.1, "identical": 0.4}[kind]
    if floor is None:
        assert abs(applied.similarity["score_v"]) < 0.05
    else:
        assert applied.similarity["score_v"] > floor


def test_a_pair_where_rank_covers_both_widths_is_flagged_unscored():
    g = torch.Generator().manual_seed(1)
    key = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    source = StateDictWeights({key: torch.randn(64, 64, generator=g)}, "sd1", "s")
    target = StateDictWeights({key: torch.randn(64, 64, generator=g)}, "sd1", "t")
    smap = compute_similarity_map(source, target, TransferOptions(rank=64), source_keys=[key], cache=SubspaceCache())
    sim = smap.entries[key].similarities[key]
    assert sim.unscored and not sim.identical


def _block_models():
    """One SD1.5-like block (q, k) against a target whose two transformer blocks each match one of them."""
    gen = lambda s: torch.randn(256, 256, generator=torch.Generator().manual_seed(s)) / 16  # noqa: E731
    q, k = gen(1), gen(2)
    src = "diffusion_model.input_blocks.4.1.transformer_blocks.0."
    tb0, tb1 = src, src.replace("transformer_blocks.0", "transformer_blocks.1")
    source = StateDictWeights({src + "attn1.to_q.weight": q, src + "attn1.to_k.weight": k}, "sd1", "s")
    target = StateDictWeights({tb0 + "attn1.to_q.weight": q + 0.01 * gen(3), tb0 + "attn1.to_k.weight": gen(4),
                               tb1 + "attn1.to_q.weight": gen(5), tb1 + "attn1.to_k.weight": k + 0.01 * gen(6)},
                              "sdxl", "t")
    return source, target, src


def test_best_moves_a_transformer_block_whole_weighted_by_the_loras_energy():
    source, target, src = _block_models()
    g = torch.Generator().manual_seed(9)
    strong = lambda scale: LoraLayer(torch.randn(256, 4, generator=g) * scale, torch.randn(4, 256, generator=g),  # noqa: E731
                                     4.0, (256, 256))
    # most of the LoRA's energy is on q: the block goes where q's counterpart is, k comes along
    lora = LoraModel({src + "attn1.to_q.weight": strong(1.0), src + "attn1.to_k.weight": strong(0.1)}, "sd1")
    options = TransferOptions(rank=32, method="exact", threshold=-math.inf)
    out, report = transfer(lora, source, target, options, cache=SubspaceCache())
    assert sorted(out.layers) == [src + "attn1.to_k.weight", src + "attn1.to_q.weight"]
    k_rec = next(r for r in report.layers if r.source_key.endswith("to_k.weight"))
    other = next(c for c in k_rec.candidates if not c.applied)
    assert other.reason == "another block scored higher" and other.similarity["score"] > 0.9
    # the same LoRA with its energy on k goes to the other block
    flipped = LoraModel({src + "attn1.to_q.weight": strong(0.1), src + "attn1.to_k.weight": strong(1.0)}, "sd1")
    out, _ = transfer(flipped, source, target, options, cache=SubspaceCache())
    assert sorted(out.layers) == sorted(k.replace("blocks.0", "blocks.1") for k in flipped.layers)


def test_several_source_blocks_on_one_target_block_are_noted_and_counted():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(256, 256, generator=g) / 16
    a = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    b = a.replace("input_blocks.4.1", "input_blocks.5.1")
    source = StateDictWeights({a: w, b: w + 0.01 * torch.randn(256, 256, generator=g)}, "sd1", "s")
    target = StateDictWeights({a: w}, "sdxl", "t")
    lora = LoraModel({k: LoraLayer(torch.randn(256, 2, generator=g), torch.randn(2, 256, generator=g), 2.0,
                                   (256, 256)) for k in (a, b)}, "sd1")
    out, report = transfer(lora, source, target, TransferOptions(rank=32, method="exact", threshold=-math.inf),
                           cache=SubspaceCache())
    assert list(out.layers) == [a] and report.targets[0].sources == [a, b]
    assert any("2 source blocks land on target block input_blocks.4.1.tb0" in n for n in report.notes)
    total = sum(r.energy for r in report.layers)
    assert report.summary()["injected_energy"] == pytest.approx(out.layers[a].energy() / total, rel=1e-5)
    # one source layer applied to two targets: counted, with its total strength
    spread_src = StateDictWeights({a: w}, "sd1", "s")
    spread_tgt = StateDictWeights({a: w, b: w}, "sdxl", "t")
    single = LoraModel({a: lora.layers[a]}, "sd1")
    smap = compute_similarity_map(spread_src, spread_tgt, TransferOptions(rank=32, method="exact"), lora=single,
                                  cache=SubspaceCache())
    _, rep = project(single, smap, TransferOptions(rank=32, method="exact", policy="spread", threshold=-math.inf))
    assert (rep.layers[0].targets_received, rep.layers[0].total_strength) == (2, pytest.approx(1.0))


def test_scores_of_applied_pairs_are_computed_once_per_cache(monkeypatch):
    """Applied pairs get their exact score and soft overlaps once; a second transfer through the same cache (warm
    runs, batch) reads them back instead of computing them again."""
    import lorax_engine.projection.transfer as transfer_module

    source, target, src = _block_models()
    g = torch.Generator().manual_seed(4)
    lora = LoraModel({k: LoraLayer(torch.randn(256, 2, generator=g), torch.randn(2, 256, generator=g), 2.0,
                                   (256, 256)) for k in source.keys()}, "sd1")
    options, cache = TransferOptions(rank=32, threshold=-math.inf), SubspaceCache()
    first, _ = transfer(lora, source, target, options, cache=cache)
    calls = []
    real, real_soft = transfer_module.layer_similarity, transfer_module.soft_overlaps
    monkeypatch.setattr(transfer_module, "layer_similarity", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(transfer_module, "soft_overlaps", lambda *a: calls.append(a) or real_soft(*a))
    again, report = transfer(lora, source, target, options, cache=cache)
    assert calls == [] and sorted(again.layers) == sorted(first.layers)
    for key, layer in again.layers.items():
        torch.testing.assert_close(layer.delta(), first.layers[key].delta())
    assert all(c.similarity["estimate"] is False for r in report.layers for c in r.candidates if c.applied)
