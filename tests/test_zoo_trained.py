"""Weights that look trained (METHOD.md §2b): layer pairs of every similarity (lorax_zoo.pairs), checked against
exact float64 SVDs computed here."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lorax_zoo.pairs import PAIR_KINDS, random_orthonormal, slot_pair, trained_spectrum, trained_weight, weight_pair


def _fitted_exponent(s: torch.Tensor, start: int) -> float:
    """Least-squares slope of -log s_i against log(i+1) over i >= start (the bulk past the head)."""
    x = torch.log(torch.arange(start, len(s), dtype=torch.float64) + 1)
    y = torch.log(s[start:].double())
    x, y = x - x.mean(), y - y.mean()
    return -float((x * y).sum() / (x * x).sum())


def _svd(w: torch.Tensor):
    return torch.linalg.svd(w.double(), full_matrices=False)


def _overlap(a: torch.Tensor, b: torch.Tensor, r: int) -> float:
    """||A_r^T B_r||_F^2 / r for the first r columns: 1 for equal subspaces, about r/dim for random ones."""
    return float((a[:, :r].T @ b[:, :r]).square().sum()) / r


@pytest.mark.parametrize("d, exponent, cond", [(1280, 0.2, 1e3), (320, 0.5, 1e4), (64, 0.3, 10.0)])
def test_trained_spectrum_is_a_slow_bulk_under_a_decaying_head(d, exponent, cond):
    s = trained_spectrum(d, exponent=exponent, cond=cond, head=16)
    assert s.dtype == torch.float64 and s.shape == (d,)
    assert bool((s[1:] < s[:-1]).all())
    assert float(s[0] / s[-1]) == pytest.approx(cond, rel=1e-12)
    assert _fitted_exponent(s, 16) == pytest.approx(exponent, rel=1e-9)
    # the head stands out of the bulk: its first value is the whole excess over the bulk's own condition number
    assert float(s[0] / s[16]) == pytest.approx(cond / (d / 17) ** exponent, rel=1e-9)


def test_trained_spectrum_refuses_a_condition_number_the_bulk_already_exceeds():
    with pytest.raises(ValueError, match="cond 2 is below the bulk's own condition number"):
        trained_spectrum(1000, exponent=0.5, cond=2.0)
    with pytest.raises(ValueError, match="exponent must be > 0"):
        trained_spectrum(10, exponent=0.0)


def test_random_orthonormal_is_orthonormal_and_seeded():
    q = random_orthonormal(300, 120, torch.Generator().manual_seed(5))
    assert q.dtype == torch.float64 and q.shape == (300, 120)
    assert_close(q.T @ q, torch.eye(120, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(q, random_orthonormal(300, 120, torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="k=4 orthonormal columns in dimension n=3"):
        random_orthonormal(3, 4, torch.Generator())


def test_trained_weight_has_the_spectrum_full_rank_and_entry_scale():
    w = trained_weight(384, 512, exponent=0.3, cond=1e4, seed=3, scale=0.02)
    assert w.dtype == torch.float64 and w.shape == (384, 512)
    s = torch.linalg.svdvals(w)
    expected = trained_spectrum(384, exponent=0.3, cond=1e4)
    assert_close(s / s[0], expected / expected[0], atol=1e-12, rtol=1e-9)
    assert float(w.square().mean().sqrt()) == pytest.approx(0.02, rel=1e-9)
    assert torch.equal(w, trained_weight(384, 512, exponent=0.3, cond=1e4, seed=3, scale=0.02))
    assert not torch.equal(w, trained_weight(384, 512, exponent=0.3, cond=1e4, seed=4, scale=0.02))


M, N, R = 512, 384, 96


@pytest.mark.parametrize("kind", PAIR_KINDS)
def test_weight_pair_top_subspace_overlap_is_what_the_kind_promises(kind):
    source, target = weight_pair(kind, M, N, exponent=0.2, cond=1e3, seed=7, rank=R, overlap=0.6)
    assert source.shape == target.shape == (M, N)
    us, ss, vhs = _svd(source)
    ut, st, vht = _svd(target)
    left, right = _overlap(us, ut, R), _overlap(vhs.T, vht.T, R)
    if kind in ("identical", "same_subspace"):
        assert left == pytest.approx(1, abs=1e-9) and right == pytest.approx(1, abs=1e-9)
    elif kind == "identical_fp32_fp16":
        # fp16 rounding moves a slow bulk's top subspace a little, but far less than any fast path may (0.01)
        assert 0.995 < left <= 1 + 1e-9 and 0.995 < right <= 1 + 1e-9
    elif kind == "partial_overlap":
        assert left == pytest.approx(0.6, abs=0.03) and right == pytest.approx(0.6, abs=0.03)
        assert_close(st, ss, atol=1e-12, rtol=1e-9)      # a fine-tune here moves directions, not the spectrum
    else:
        assert left == pytest.approx(R / M, abs=0.05) and right == pytest.approx(R / N, abs=0.05)
    assert float(ss[0] / ss[-1]) == pytest.approx(1e3, rel=1e-6)
    assert torch.equal(source, trained_weight(M, N, exponent=0.2, cond=1e3, seed=7).to(source.dtype))


def test_identical_fp32_fp16_is_the_fp16_cast_of_the_fp32_source():
    source, target = weight_pair("identical_fp32_fp16", 64, 48, seed=1, rank=8)
    assert source.dtype == torch.float32 and target.dtype == torch.float16
    assert torch.equal(target, source.half())
    assert torch.equal(source, trained_weight(64, 48, seed=1).float())


def test_same_subspace_changes_only_the_spectrum():
    source, target = weight_pair("same_subspace", M, N, exponent=0.2, cond=1e3, seed=2)
    st = torch.linalg.svdvals(target)
    assert _fitted_exponent(st, 16) == pytest.approx(0.5, rel=1e-6)
    assert float(st[0] / st[-1]) == pytest.approx(1e3, rel=1e-6)
    assert not torch.allclose(source, target)
    _, explicit = weight_pair("same_subspace", M, N, exponent=0.2, cond=1e3, seed=2, target_exponent=0.5)
    assert torch.equal(target, explicit)


@pytest.mark.parametrize("overlap", [0.3, 0.9])
def test_partial_overlap_follows_the_requested_degree(overlap):
    source, target = weight_pair("partial_overlap", 256, 256, seed=4, rank=64, overlap=overlap)
    us, _, _ = _svd(source)
    ut, _, _ = _svd(target)
    assert _overlap(us, ut, 64) == pytest.approx(overlap, abs=0.03)


def test_weight_pair_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="kind must be one of"):
        weight_pair("similar", 8, 8)
    with pytest.raises(ValueError, match=r"min\(m, n\) - rank = 0"):
        weight_pair("partial_overlap", 320, 320, rank=320, overlap=0.5)
    with pytest.raises(ValueError, match="rank 400 exceeds min"):
        weight_pair("identical", 320, 640, rank=400)
    with pytest.raises(ValueError, match="overlap must be in"):
        weight_pair("partial_overlap", 64, 64, rank=8, overlap=1.5)


@pytest.mark.parametrize("kind", ["identical", "identical_fp32_fp16", "unrelated"])
def test_slot_pair_relates_only_the_clip_l_slot(kind):
    source, target = slot_pair(kind, 320, n_source=96, n_target=256, seed=9, rank=24)
    assert source.shape == (320, 96) and target.shape == (320, 256)
    assert target.dtype == (torch.float16 if kind == "identical_fp32_fp16" else torch.float64)
    _, slot = weight_pair(kind, 320, 96, seed=9, rank=24)
    assert torch.equal(target[:, :96], slot)
    other = target[:, 96:].double()
    assert float(torch.linalg.svdvals(other)[0] / torch.linalg.svdvals(other)[-1]) == pytest.approx(1e3, rel=1e-2)
    # the other columns are a weight of their own: their column space is as unrelated to the source's as chance
    uo = _svd(other)[0]
    assert _overlap(_svd(source)[0], uo, 24) == pytest.approx(24 / 320, abs=0.05)
    assert math.isclose(float(other.square().mean().sqrt()), 0.03, rel_tol=1e-2)

