"""Subspace similarity (METHOD §1, §3) against independent numpy computations, and on zoo weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lorax_engine.analysis.similarity import LayerSimilarity, PairStore, layer_similarity, side_similarity
from lorax_engine.analysis.subspaces import Basis, SubspaceSpec, compute_basis


def _orth(d, r, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, r)))
    return q


def _reference(xs, xt, d):
    """phi / chance / normalised written out with numpy, bases as arrays (never None here).

    Same widths: chance max(r_s, r_t) / d. A narrower source (METHOD §3) is normalised within its slot: chance is
    the mean phi of random r_s-dim subspaces of the slot, estimated here by sampling, and the ceiling the best any
    r_s-dim subspace of the slot reaches (its top singular directions of the target's slot rows)."""
    rs, rt = xs.shape[1], xt.shape[1]
    ds = xs.shape[0]
    k = min(rs, rt)
    emb = np.zeros((d, rs))
    emb[:ds] = xs
    phi = np.linalg.norm(emb.T @ xt) ** 2 / k
    if ds == d:
        chance = max(rs, rt) / d
        return phi, chance, (phi - chance) / (1 - chance)
    slot = xt[:ds]
    rng = np.random.default_rng(0)
    chance = np.mean([np.linalg.norm(np.linalg.qr(rng.standard_normal((ds, rs)))[0].T @ slot) ** 2 / k
                      for _ in range(400)])
    top = np.linalg.svd(slot, compute_uv=False)[:rs]
    ceiling = np.sum(top ** 2) / k
    return phi, chance, (phi - chance) / (ceiling - chance)


@pytest.mark.parametrize("d, rs, rt, ds", [(200, 40, 40, 200), (150, 30, 50, 150), (120, 24, 24, 48)])
def test_side_similarity_matches_the_formula(d, rs, rt, ds):
    xs, xt = _orth(ds, rs, 1), _orth(d, rt, 2)
    # make them partly aligned so phi is not just chance
    xt[:, :10] = _orth(d, 10, 3)
    xt[:ds, :5] += 3 * xs[:, :5]
    xt, _ = np.linalg.qr(xt)
    got = side_similarity(torch.tensor(xs, dtype=torch.float32), torch.tensor(xt, dtype=torch.float32), ds, d)
    phi, chance, hat = _reference(xs, xt, d)
    assert got.phi == pytest.approx(phi, abs=1e-5)
    sampled = ds < d        # the slot's chance level is estimated by sampling in the reference
    assert got.chance == pytest.approx(chance, rel=0.02 if sampled else 1e-6)
    assert got.normalised == pytest.approx(hat, abs=0.02 if sampled else 1e-5)
    assert got.informative
    assert (got.slot_share is not None) == sampled


def test_identical_subspaces_score_one_and_random_ones_score_chance():
    x = torch.tensor(_orth(640, 320, 4), dtype=torch.float32)
    same = side_similarity(x, x, 640, 640)
    assert same.phi == pytest.approx(1.0, abs=1e-6) and same.normalised == pytest.approx(1.0, abs=1e-6)
    scores = [side_similarity(x, torch.tensor(_orth(640, 320, s), dtype=torch.float32), 640, 640)
              for s in range(10, 15)]
    for s in scores:
        assert s.phi == pytest.approx(0.5, abs=0.01)          # chance r/m = 0.5 at m = 640
        assert abs(s.normalised) < 0.02                       # sd ~ sqrt(2)/(m - r) = 0.0044


def test_full_dimensional_side_is_defined_as_one_and_flagged():
    x = torch.tensor(_orth(64, 16, 5), dtype=torch.float32)
    full = side_similarity(None, x, 64, 64)
    assert (full.phi, full.chance, full.normalised, full.informative) == (1.0, 1.0, 1.0, False)
    # an identity source side inside a wider target (768 in 2048) spans its whole slot: every candidate looks
    # alike there, so the side is flagged and the slot share reported
    xt = torch.tensor(_orth(100, 20, 6), dtype=torch.float32)
    slot = side_similarity(None, xt, 40, 100)
    share = float(np.linalg.norm(xt.numpy()[:40].astype(np.float64)) ** 2 / 20)
    assert not slot.informative and slot.slot_share == pytest.approx(share, rel=1e-5)


def test_slot_scores_span_chance_to_one_whatever_the_slot_share():
    """METHOD §3: a random source scores ~0 and a perfect one 1, however little of the target reads the slot
    (the raw 2048-wide normalisation gave +0.27 to random sources and below 0 to perfect ones)."""
    d, ds, r = 2048, 768, 320
    for share in (0.1, 0.6):
        # target input subspace: a `share` of each basis vector in the slot, the rest outside
        inside = _orth(ds, r, 11) * np.sqrt(share)
        outside = _orth(d - ds, r, 12) * np.sqrt(1 - share)
        xt = torch.tensor(np.vstack([inside, outside]), dtype=torch.float32)
        perfect = side_similarity(torch.tensor(_orth(ds, r, 11), dtype=torch.float32), xt, ds, d)
        random = [side_similarity(torch.tensor(_orth(ds, r, s), dtype=torch.float32), xt, ds, d).normalised
                  for s in range(20, 25)]
        assert perfect.normalised == pytest.approx(1.0, abs=1e-4)
        assert max(abs(x) for x in random) < 0.03
        assert perfect.slot_share == pytest.approx(share, abs=1e-4)
    # a target that does not read the slot at all cannot be scored there
    xt = torch.tensor(np.vstack([np.zeros((ds, r)), _orth(d - ds, r, 13)]), dtype=torch.float32)
    empty = side_similarity(torch.tensor(_orth(ds, r, 14), dtype=torch.float32), xt, ds, d)
    assert (empty.normalised, empty.informative, empty.slot_share) == (0.0, False, 0.0)


def test_identity_after_cast_is_read_from_the_values():
    from lorax_engine.analysis.similarity import identical_after_cast

    g = torch.Generator().manual_seed(3)
    w32 = torch.randn(64, 48, generator=g) * 0.03
    w16 = w32.half()
    assert identical_after_cast(w32, w16)                      # SD1.5 fp32 CLIP-L vs SDXL's fp16 copy
    assert identical_after_cast(w32, w16.float())              # ... after ComfyUI upcast the copy on a CPU
    assert identical_after_cast(w32.bfloat16().float(), w32)   # bfloat16 storage
    assert not identical_after_cast(w32, w32 + 1e-3)
    assert not identical_after_cast(w32, (w32 * 1.01).half())
    assert not identical_after_cast(w32, w32[:, :47])
    tweaked = w32.clone()
    tweaked[5, 5] += 1e-7                                       # both fp32, differing below fp16 resolution
    assert identical_after_cast(tweaked, w32.half()) and not identical_after_cast(tweaked, w32 + 1e-4)


def test_layer_score_is_the_smaller_side_and_cross_attention_is_embedded():
    g = torch.Generator().manual_seed(0)
    w_s = torch.randn(64, 24, generator=g)
    # target: the source in the first 24 input columns plus unrelated columns for the rest
    w_t = torch.cat([w_s, 0.01 * torch.randn(64, 40, generator=g)], dim=1)
    bs, bt = compute_basis(w_s, SubspaceSpec(8, "exact")).top(8), compute_basis(w_t, SubspaceSpec(8, "exact")).top(8)
    sim = layer_similarity(bs, bt)
    assert sim.u.normalised > 0.99 and sim.v.normalised > 0.99
    assert sim.score == min(sim.u.normalised, sim.v.normalised)
    moved = torch.cat([0.01 * torch.randn(64, 40, generator=g), w_s], dim=1)   # same weights, other slot
    assert layer_similarity(bs, compute_basis(moved, SubspaceSpec(8, "exact")).top(8)).v.normalised < 0.05
    with pytest.raises(ValueError):
        layer_similarity(bt, bs)           # a wider source input cannot be embedded


def test_zoo_clip_l_is_identical_in_sd15_and_sdxl_and_finetunes_stay_close(zoo):
    spec = SubspaceSpec(320, "exact")
    key = "text_model.encoder.layers.5.self_attn.k_proj.weight"
    a = compute_basis(zoo.weight("sd15", "cond_stage_model.transformer." + key), spec).top(320)
    b = compute_basis(zoo.weight("sdxl", "conditioner.embedders.0.transformer." + key), spec).top(320)
    assert layer_similarity(a, b).score == pytest.approx(1.0, abs=1e-5)
    unet = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_v.weight"
    base = compute_basis(zoo.weight("sd15", unet), spec).top(320)
    tuned = compute_basis(zoo.weight("sd15_finetune", unet), spec).top(320)
    other = compute_basis(zoo.weight("sdxl", unet.replace("transformer_blocks.0", "transformer_blocks.1")),
                          spec).top(320)
    assert layer_similarity(base, tuned).score > 0.9
    assert abs(layer_similarity(base, other).score) < 0.02


def test_pair_store_round_trips_through_disk_and_ignores_damage(tmp_path):
    x = torch.tensor(_orth(50, 10, 7), dtype=torch.float32)
    sim = layer_similarity(Basis((50, 50), x, x, None, "t"), Basis((50, 50), x, None, None, "t"))
    store = PairStore(tmp_path)
    store.put("sha256:a", "sha256:b", "spec", sim)
    store.flush()
    again = PairStore(tmp_path)
    assert again.get("sha256:a", "sha256:b", "spec") == sim
    flagged = LayerSimilarity(sim.u, sim.v, identical=True, estimate=True, hi=0.9)
    again.put("sha256:a", "sha256:c", "spec", flagged)
    again.flush()
    assert PairStore(tmp_path).get("sha256:a", "sha256:c", "spec") == flagged
    assert again.get("sha256:a", "sha256:b", "other spec") is None
    [path] = list((tmp_path / "pairs").rglob("*.json"))
    path.write_text("{not json")
    assert PairStore(tmp_path).get("sha256:a", "sha256:b", "spec") is None


def test_plot_draws_verdicts_threshold_and_returns_an_image_array(tmp_path):
    from PIL import Image

    from lorax_engine.reports.plot import APPLIED, DROPPED, THRESH, plot_similarity

    rows = [{"key": "a", "side": "clip_l", "block": "clip_l.layers.0", "scores": [1.0, 0.0], "best": 1.0,
             "applied": True},
            {"key": "b", "side": "input", "block": "input_blocks.4.1", "scores": [0.01, -0.01], "best": 0.01,
             "applied": False},
            {"key": "c", "side": "output", "block": "output_blocks.9.1", "scores": [], "best": None,
             "applied": False}]
    img = plot_similarity(rows, threshold=0.3, title="t", path=tmp_path / "p.png")
    assert img.dtype == np.float32 and img.ndim == 3 and img.shape[2] == 3
    assert 0.0 <= img.min() and img.max() <= 1.0
    pixels = np.round(img * 255).astype(int)

    def count(color):
        return int(np.all(pixels == np.array(color), axis=2).sum())

    assert count(APPLIED) > 10 and count(DROPPED) > 10
    # in the plot area (above the legend) the applied marker sits above the threshold line, the dropped below
    area = pixels[: img.shape[0] - 40]
    ys_applied = np.nonzero(np.all(area == np.array(APPLIED), axis=2))[0]
    ys_dropped = np.nonzero(np.all(area == np.array(DROPPED), axis=2))[0]
    threshold_rows = np.nonzero(np.all(area == np.array(THRESH), axis=2).sum(axis=1) > 20)[0]
    assert len(ys_applied) and len(ys_dropped) and len(threshold_rows) >= 1
    assert ys_applied.max() < threshold_rows.min() <= threshold_rows.max() < ys_dropped.min()
    saved = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    assert np.array_equal(saved, pixels)
