"""Decisions made on exact scores (METHOD §2b) and kept together (METHOD §4), end to end through :func:`transfer`:
a screening estimate that alone would pick the wrong block, candidates ruled out by their bound without an exact
score, q and k of one attention applied together or not at all, proj_in following its transformer block."""
from __future__ import annotations

import math

import pytest
import torch

from lorax_engine.analysis.similarity import layer_similarity
from lorax_engine.analysis.subspaces import Basis, SubspaceCache, cache_key, matrix_shape
from lorax_engine.files.base_weights import StateDictWeights
from lorax_engine.files.lora import LoraLayer, LoraModel
from lorax_engine.projection.transfer import TransferOptions, compute_similarity_map, transfer
from lorax_zoo.pairs import random_orthonormal, spectrum_bulk, weight_pair

TB = "diffusion_model.input_blocks.{}.1.transformer_blocks.0.{}.weight"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _lora(keys, n=256, k=4, seed=0, scale=None):
    g = _gen(seed)
    scale = scale or {}
    return LoraModel({key: LoraLayer(torch.randn(n, k, generator=g) * scale.get(key, 1.0),
                                     torch.randn(k, n, generator=g) / 16, float(k), (n, n)) for key in keys}, "sd1")


def _with_left(u: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return ((u * s) @ v.T).float()


def _at_angle(u_s: torch.Tensor, phi: float, gen) -> torch.Tensor:
    """An r-dim basis whose every principal angle with ``u_s`` has cosine^2 ``phi`` (so its overlap is ``phi``)."""
    d, r = u_s.shape
    away = random_orthonormal(d, r, gen)
    away = torch.linalg.qr(away - u_s @ (u_s.T @ away)).Q
    return math.sqrt(phi) * u_s + math.sqrt(1 - phi) * away


def _misleading(u_t: torch.Tensor, u_s: torch.Tensor, loss: float) -> torch.Tensor:
    """A basis that captures all but ``loss`` of ``u_t`` (as a certified sketch promised to) yet turns each
    direction away from ``u_s``: the intermediate-overlap case where such a loss moves the score by ~sqrt(loss)."""
    away = u_s @ (u_s.T @ u_t)
    away = away - u_t @ (u_t.T @ away)
    away = away / away.norm(dim=0).clamp_min(1e-12)
    angle = math.asin(math.sqrt(loss))
    return torch.linalg.qr(u_t * math.cos(angle) - away * math.sin(angle)).Q


def test_a_block_the_screening_estimate_alone_would_pick_wrongly_is_decided_on_exact_scores():
    """Block 5.1 scores higher than block 4.1 (the source's own), but their screening sketches, each within a loss of
    0.002 of the exact subspace, rank them the other way; the decision rests on exact scores."""
    d, r = 256, 64
    g = _gen(1)
    s = spectrum_bulk(d, 0.5)
    u_s, v = random_orthonormal(d, d, g), random_orthonormal(d, d, g)
    key = TB.format(4, "attn1.to_v")
    own, better = key, TB.format(5, "attn1.to_v")
    # normalised scores (phi - r/d) / (1 - r/d): 0.45 for the own block, 0.5 for the better one
    u_own, u_better = _at_angle(u_s[:, :r], 0.25 + 0.75 * 0.45, g), _at_angle(u_s[:, :r], 0.625, g)
    full = lambda top: torch.linalg.qr(torch.cat([top, random_orthonormal(d, d, g)], 1)).Q[:, :d]  # noqa: E731
    source = StateDictWeights({key: _with_left(u_s, v, s)}, "sd1", "s")
    target = StateDictWeights({own: _with_left(full(u_own), v, s), better: _with_left(full(u_better), v, s)},
                              "sd1", "t")
    options = TransferOptions(rank=r)
    spec = options.screening_spec()
    cache = SubspaceCache()
    sketches = {(source, key): u_s[:, :r], (target, own): u_own, (target, better): _misleading(u_better, u_s[:, :r],
                                                                                              0.002)}
    for (weights, k), u in sketches.items():
        shape = matrix_shape(weights.shape(k))
        cache._remember(cache_key(weights.fingerprint(k), shape, spec),
                        Basis(shape, u.float().contiguous(), v[:, :r].float().contiguous(), s[:r].float(),
                              spec.effective(*shape).describe(), estimate=True))

    def score(a, b):
        return layer_similarity(Basis((d, d), a.float(), v[:, :r].float(), None, "t"),
                                Basis((d, d), b.float(), v[:, :r].float(), None, "t")).score

    exact_own, exact_better = score(u_s[:, :r], u_own), score(u_s[:, :r], u_better)
    sketched_better = score(u_s[:, :r], sketches[(target, better)])
    assert exact_better > exact_own > sketched_better          # the case as built: estimates alone pick 4.1
    out, report = transfer(_lora([key]), source, target, options, cache=cache)
    assert list(out.layers) == [better]
    applied = next(c for c in report.layers[0].candidates if c.applied)
    assert applied.similarity["score"] > exact_own and not applied.similarity["estimate"]


def test_candidates_whose_bound_is_below_the_threshold_get_no_exact_score():
    """Unrelated trained-looking weights: the sketches' upper bound settles it; no spectrum is computed."""
    ws, wt = weight_pair("unrelated", 1280, 1280, exponent=0.3, cond=1e3, seed=4)
    key = TB.format(7, "attn1.to_q")
    cache = SubspaceCache()
    g = _gen(2)
    lora = LoraModel({key: LoraLayer(torch.randn(1280, 4, generator=g), torch.randn(4, 1280, generator=g), 4.0,
                                     (1280, 1280))}, "sd1")
    out, report = transfer(lora, StateDictWeights({key: ws.float()}, "sd1", "s"),
                           StateDictWeights({key: wt.float()}, "sd1", "t"), TransferOptions(), cache=cache)
    assert not out.layers and report.layers[0].reason == "below threshold"
    cand = report.layers[0].candidates[0]
    assert cand.similarity["estimate"] and cand.similarity["score_upper_bound"] < 0.05
    assert report.work == {"candidate_pairs": 1, "identical_by_value": 0, "decided_on_estimate": 1,
                           "scored_exactly": 0, "not_needed": 0}
    assert cache.stats.computed == 2                            # the two sketches, no spectrum


def test_a_q_whose_bound_fails_everywhere_spares_its_k_any_basis():
    """q and k pass together or not at all, so once q's bound is below the threshold in every block k needs no score:
    on unrelated trained-looking weights only q's pairs are sketched (the source's q and both blocks' q)."""
    q, k = TB.format(7, "attn1.to_q"), TB.format(7, "attn1.to_k")
    q8, k8 = TB.format(8, "attn1.to_q"), TB.format(8, "attn1.to_k")
    pairs = [weight_pair("unrelated", 1280, 1280, exponent=0.3, cond=1e3, seed=seed) for seed in (4, 5, 6)]
    source = StateDictWeights({q: pairs[0][0].float(), k: pairs[1][0].float()}, "sd1", "s")
    target = StateDictWeights({q: pairs[0][1].float(), k: pairs[1][1].float(), q8: pairs[2][0].float(),
                               k8: pairs[2][1].float()}, "sd1", "t")
    g = _gen(2)
    lora = LoraModel({key: LoraLayer(torch.randn(1280, 4, generator=g), torch.randn(4, 1280, generator=g), 4.0,
                                     (1280, 1280)) for key in (q, k)}, "sd1")
    cache = SubspaceCache()
    out, report = transfer(lora, source, target, TransferOptions(), cache=cache)
    assert not out.layers
    by_role = {r.role: r for r in report.layers}
    assert by_role["attn1.to_q"].reason == "below threshold"
    assert by_role["attn1.to_k"].reason == "its q/k partner does not pass there"
    assert all(c.similarity["score_upper_bound"] < 0.05 for c in by_role["attn1.to_q"].candidates)
    assert all(c.similarity is None for c in by_role["attn1.to_k"].candidates)
    assert report.work == {"candidate_pairs": 4, "identical_by_value": 0, "decided_on_estimate": 2,
                           "scored_exactly": 0, "not_needed": 2}
    assert cache.stats.computed == 3


def _sketches(cache: SubspaceCache) -> int:
    return sum("randomized(" in key for key in cache._lru)


def _threshold_off(source_weights, target_weights, method="fast"):
    """A rank-4 LoRA on the source's one layer (input_blocks.8.1's q), carried with the threshold off."""
    key = TB.format(8, "attn1.to_q")
    g = _gen(2)
    lora = LoraModel({key: LoraLayer(torch.randn(1280, 4, generator=g), torch.randn(4, 1280, generator=g), 4.0,
                                     (1280, 1280))}, "sd1")
    cache = SubspaceCache()
    out, report = transfer(lora, StateDictWeights({key: source_weights.float()}, "sd1", "s"),
                           StateDictWeights({TB.format(7, "attn1.to_q"): target_weights[0].float(),
                                             key: target_weights[1].float()}, "sd1", "t"),
                           TransferOptions(threshold=-math.inf, method=method), cache=cache)
    return out, report, cache


def test_with_the_threshold_off_unrelated_candidates_are_scored_exactly_without_a_sketch():
    """SD1.5 -> SDXL with the threshold off: every candidate may lead, and a sketch of an unrelated pair leaves a bound
    above the leader's exact score, so it could rank nothing out. No sketch is computed: the source's own block first,
    then the other, each scored exactly from spectra, and the choice is the one --exact makes."""
    ws, wt = weight_pair("unrelated", 1280, 1280, exponent=0.3, cond=1e3, seed=4)
    other = weight_pair("unrelated", 1280, 1280, exponent=0.3, cond=1e3, seed=5)[1]
    out, report, cache = _threshold_off(ws, (other, wt))
    assert report.work == {"candidate_pairs": 2, "identical_by_value": 0, "decided_on_estimate": 0,
                           "scored_exactly": 2, "not_needed": 0}
    assert _sketches(cache) == 0 and cache.stats.computed == 3          # the spectra of the source and both targets
    assert all(c.energy_in_target is not None and not c.energy_from_sketch for c in report.layers[0].candidates)
    exact_out, exact_report, _ = _threshold_off(ws, (other, wt), method="exact")
    assert list(out.layers) == list(exact_out.layers) and len(out.layers) == 1
    for got, want in zip(report.layers[0].candidates, exact_report.layers[0].candidates, strict=True):
        assert got.similarity["score"] == pytest.approx(want.similarity["score"], abs=1e-6)


def test_with_the_threshold_off_a_fine_tunes_own_block_leads_and_sketches_rule_the_others_out():
    """An identity layout (a 3% fine-tune of the source), threshold off: the block of the source's own name is
    scored exactly first (though it comes second in model order) and leads by far, so the other block is ruled
    out by its sketch's bound, with no spectrum."""
    ws, wt = weight_pair("finetune", 1280, 1280, exponent=0.3, cond=1e3, seed=4, drift=0.03)
    other = weight_pair("unrelated", 1280, 1280, exponent=0.3, cond=1e3, seed=5)[1]
    out, report, cache = _threshold_off(ws, (other, wt))
    own = TB.format(8, "attn1.to_q")
    assert list(out.layers) == [own]
    assert report.work == {"candidate_pairs": 2, "identical_by_value": 0, "decided_on_estimate": 1,
                           "scored_exactly": 1, "not_needed": 0}
    assert _sketches(cache) == 1 and cache.stats.computed == 3     # the other block's sketch; two spectra
    ruled_out = next(c for c in report.layers[0].candidates if not c.applied)
    assert ruled_out.similarity["estimate"] and ruled_out.energy_from_sketch
    applied = next(c for c in report.layers[0].candidates if c.applied)
    assert ruled_out.similarity["score_upper_bound"] < applied.similarity["score"]


def _related(base: torch.Tensor, amount: float, seed: int) -> torch.Tensor:
    """``base`` plus an independent weight of relative size ``amount``: 0 is the same weight, large is unrelated."""
    other = torch.randn(base.shape, generator=_gen(seed))
    return base + amount * other * (base.norm() / other.norm())


def _qk_models():
    g = _gen(3)
    q, k = (torch.randn(256, 256, generator=g) * torch.linspace(2, 0.1, 256) for _ in range(2))
    src = {TB.format(4, "attn1.to_q"): q, TB.format(4, "attn1.to_k"): k}
    tgt = {TB.format(4, "attn1.to_q"): _related(q, 0.05, 10), TB.format(4, "attn1.to_k"): _related(k, 50.0, 11),
           TB.format(5, "attn1.to_q"): _related(q, 0.3, 12), TB.format(5, "attn1.to_k"): _related(k, 0.3, 13)}
    return StateDictWeights(src, "sd1", "s"), StateDictWeights(tgt, "sd1", "t")


def test_q_and_k_of_one_attention_go_together_or_not_at_all():
    """q fits block 4.1 and 5.1, k only 5.1: per policy, never a q without its k."""
    source, target = _qk_models()
    # most of the LoRA's energy on q: best's block score follows q to block 4.1, where k fails
    lora = _lora(source.keys(), seed=4, scale={TB.format(4, "attn1.to_q"): 10.0})
    q5, k5 = TB.format(5, "attn1.to_q"), TB.format(5, "attn1.to_k")
    for policy, expected in (("all-above-threshold", {q5, k5}), ("spread", {q5, k5}), ("best", set())):
        out, report = transfer(lora, source, target, TransferOptions(rank=32, method="exact", policy=policy),
                               cache=SubspaceCache())
        assert set(out.layers) == expected, policy
        strengths = {c.target_key: c.strength for r in report.layers for c in r.candidates if c.applied}
        assert len(set(strengths.values())) <= 1, policy          # the same strength for q and k
    q_rec = next(r for r in report.layers if r.role == "attn1.to_q")     # best: block 4.1, where k fails
    assert not q_rec.applied and q_rec.reason == "its q/k partner does not pass there"


def test_proj_in_follows_the_transformer_block_it_wraps():
    g = _gen(5)
    v, proj = (torch.randn(256, 256, generator=g) * torch.linspace(2, 0.1, 256) for _ in range(2))
    proj_in = "diffusion_model.input_blocks.{}.1.proj_in.weight"
    source = StateDictWeights({TB.format(4, "attn1.to_v"): v, proj_in.format(4): proj}, "sd1", "s")
    target = StateDictWeights({TB.format(4, "attn1.to_v"): _related(v, 0.1, 20),
                               proj_in.format(4): _related(proj, 0.8, 21),
                               TB.format(5, "attn1.to_v"): _related(v, 50.0, 22),
                               proj_in.format(5): _related(proj, 0.05, 23)}, "sd1", "t")
    lora = _lora(source.keys(), seed=6)
    out, report = transfer(lora, source, target, TransferOptions(rank=32, method="exact"), cache=SubspaceCache())
    assert set(out.layers) == {TB.format(4, "attn1.to_v"), proj_in.format(4)}
    rec = next(r for r in report.layers if r.role == "proj_in")
    assert {c.target_key: c.reason for c in rec.candidates if not c.applied} == {
        proj_in.format(5): "the transformer blocks it wraps went elsewhere"}
    scores = compute_similarity_map(source, target, TransferOptions(rank=32, method="exact"),
                                    source_keys=[proj_in.format(4)]).entries[proj_in.format(4)].similarities
    assert scores[proj_in.format(5)].score > scores[proj_in.format(4)].score     # it scores higher over there
