"""Projection on factors (METHOD §2, §3) against dense float64 computations done here, independently."""
from __future__ import annotations

import math

import pytest
import torch
from float64_reference import soft_transfer

from lorax_engine.analysis.subspaces import Basis, Spectrum
from lorax_engine.errors import TransferOptionError
from lorax_engine.files.lora import LoraLayer
from lorax_engine.projection.operators import (
    check_mode,
    combine,
    compress,
    embed_down,
    energy_fraction,
    knee_angles,
    pass_through,
    passes_through,
    project_soft,
    project_subspace,
    projected_energy,
    relative_change,
    side_weight,
    soft_overlaps,
    soft_weights,
)


def _orthonormal(d, r, seed):
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _basis(m, n, r, seed, full_u=False, full_v=False):
    u = None if full_u else _orthonormal(m, r, seed).float()
    v = None if full_v else _orthonormal(n, r, seed + 1).float()
    return Basis((m, n), u, v, None, "test")


def _proj(x, d):
    """Dense projector of a basis (identity for None) in float64."""
    return torch.eye(d, dtype=torch.float64) if x is None else x.double() @ x.double().T


def _layer(m, n, k=6, alpha=3.0, seed=0, shape=None):
    g = torch.Generator().manual_seed(seed)
    return LoraLayer(torch.randn(m, k, generator=g), torch.randn(k, n, generator=g) / math.sqrt(n), alpha,
                     shape or (m, n))


def _delta64(layer):
    return layer.scale * (layer.up.double() @ layer.down.double())


def test_subspace_projection_is_pu_delta_pv_on_factors_with_rank_and_alpha_kept():
    m, n, r = 96, 80, 20
    layer = _layer(m, n)
    basis = _basis(m, n, r, seed=3)
    out = project_subspace(layer, basis, (m, n))
    assert out.rank == layer.rank and out.alpha == layer.alpha and out.weight_shape == (m, n)
    expected_up = basis.u.double() @ (basis.u.double().T @ layer.up.double())
    expected_down = (layer.down.double() @ basis.v.double()) @ basis.v.double().T
    torch.testing.assert_close(out.up.double(), expected_up, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.down.double(), expected_down, rtol=1e-5, atol=1e-6)
    dense = _proj(basis.u, m) @ _delta64(layer) @ _proj(basis.v, n)
    torch.testing.assert_close(out.delta().double(), dense, rtol=1e-5, atol=1e-7)
    # energy kept from k x k products equals the dense ratio
    kept = float(dense.norm() ** 2 / _delta64(layer).norm() ** 2)
    assert energy_fraction(layer, out) == pytest.approx(kept, rel=1e-5)
    assert projected_energy(layer, basis) == pytest.approx(kept, rel=1e-5)


def test_projection_does_not_depend_on_signs_or_order_of_basis_vectors():
    m, n, r = 64, 64, 16
    layer = _layer(m, n)
    basis = _basis(m, n, r, seed=5)
    perm = torch.randperm(r, generator=torch.Generator().manual_seed(1))
    signs = torch.where(torch.rand(r, generator=torch.Generator().manual_seed(2)) > 0.5, 1.0, -1.0)
    other = Basis((m, n), basis.u[:, perm] * signs, basis.v[:, perm] * signs, None, "test")
    torch.testing.assert_close(project_subspace(layer, other, (m, n)).delta(),
                               project_subspace(layer, basis, (m, n)).delta(), rtol=1e-5, atol=1e-6)


def test_full_sides_leave_factors_untouched():
    layer = _layer(40, 40)
    out = project_subspace(layer, _basis(40, 40, 40, seed=1, full_u=True, full_v=True), (40, 40))
    assert torch.equal(out.up, layer.up) and torch.equal(out.down, layer.down)


def test_cross_attention_down_is_embedded_into_the_clip_l_slot():
    m, ns, nt, r = 48, 24, 64, 12
    layer = _layer(m, ns)
    basis = _basis(m, nt, r, seed=7)
    out = project_subspace(layer, basis, (m, nt))
    assert tuple(out.down.shape) == (layer.rank, nt)
    embedded = torch.zeros(m, nt, dtype=torch.float64)
    embedded[:, :ns] = _delta64(layer)
    dense = _proj(basis.u, m) @ embedded @ _proj(basis.v, nt)
    torch.testing.assert_close(out.delta().double(), dense, rtol=1e-5, atol=1e-7)
    assert torch.equal(embed_down(layer.down, nt)[:, ns:], torch.zeros(layer.rank, nt - ns))


def _spectrum(w: torch.Tensor) -> Spectrum:
    """All singular triplets from torch's float64 SVD (not the engine's Gram code)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return Spectrum(tuple(w.shape), u.float(), vh.T.float(), s.float(), "svd")


def _weight(m, n, seed, exponent=0.4):
    """A weight with a slow spectrum and singular vectors in general position."""
    g = torch.Generator().manual_seed(seed)
    d = min(m, n)
    q1, _ = torch.linalg.qr(torch.randn(m, d, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    return (q1 * torch.arange(1, d + 1, dtype=torch.float64) ** -exponent) @ q2.T


@pytest.mark.parametrize("mode", ["auto", "subspace+null"])
@pytest.mark.parametrize("m, ns, nt", [(72, 72, 72), (96, 40, 40), (40, 96, 96), (48, 24, 64)])
def test_soft_operator_matches_the_dense_float64_formula_and_keeps_rank_and_alpha(mode, m, ns, nt):
    """METHOD §2c's T = S_t S_s + w C_t C_s on factors against the dense reference (tests/float64_reference.py),
    square, both rectangular orientations and a narrower source input embedded in the slot (§3)."""
    r = 12
    ws, layer = _weight(m, ns, seed=1), _layer(m, ns, k=5)
    related = torch.cat([ws, torch.zeros(m, nt - ns, dtype=torch.float64)], 1) + 0.3 * _weight(m, nt, seed=2)
    for wt in (related, _weight(m, nt, seed=3)):
        w_u, w_v = soft_weights(mode, soft_overlaps(_spectrum(ws), _spectrum(wt), r))
        out = project_soft(layer, _spectrum(ws), _spectrum(wt), r, (m, nt), w_u, w_v)
        want, want_u, want_v = soft_transfer(mode, ws, wt, _delta64(layer), r)
        assert (w_u, w_v) == (pytest.approx(want_u, abs=1e-5), pytest.approx(want_v, abs=1e-5))
        torch.testing.assert_close(out.delta().double(), want, rtol=1e-4, atol=1e-6)
        assert out.rank == layer.rank and out.alpha == layer.alpha and out.weight_shape == (m, nt)


def test_soft_operator_is_the_identity_on_equal_weights_and_w_is_one_there():
    w = _weight(64, 48, seed=5)
    layer = _layer(64, 48, k=4)
    for mode in ("auto", "subspace+null"):
        w_u, w_v = soft_weights(mode, soft_overlaps(_spectrum(w), _spectrum(w), 10))
        out = project_soft(layer, _spectrum(w), _spectrum(w), 10, (64, 48), w_u, w_v)
        assert (w_u, w_v) == (pytest.approx(1.0, abs=1e-6), pytest.approx(1.0, abs=1e-6))
        torch.testing.assert_close(out.delta().double(), _delta64(layer), rtol=1e-4, atol=1e-6)


def test_the_knee_and_the_side_weight():
    s = torch.tensor([100.0, 25.0, 10.0, 5.0, 2.0, 1.0, 0.2, 0.0])
    theta = knee_angles(s, 6)                # sigma_r = 1: 0 at or below 1/5, pi/4 at 1, pi/2 at or above 5
    assert float(theta[5]) == pytest.approx(math.pi / 4)
    assert [float(x) for x in theta[[0, 1, 2, 3]]] == [pytest.approx(math.pi / 2)] * 4
    assert float(theta[6]) == pytest.approx(0.0, abs=1e-12) and float(theta[7]) == 0.0 and 0 < float(theta[4]) < 1.5
    # a rank covering every direction: every direction of nonzero sigma is fully inside
    assert [float(x) for x in knee_angles(s, 8)] == [pytest.approx(math.pi / 2)] * 7 + [0.0]
    assert [side_weight(x) for x in (-0.2, 0.0, 0.5, 0.9, 1.0, 1.3)] == \
        [0.0, 0.0, 0.75, pytest.approx(0.99), 1.0, 1.0]


def test_the_identity_axiom_applies_to_the_side_wise_modes():
    assert passes_through("auto", True) and passes_through("subspace+null", True)
    assert not passes_through("subspace", True) and not passes_through("auto", False)


def test_compress_is_the_truncated_svd_of_delta():
    layer = _layer(70, 90, k=12, alpha=5.0)
    out, kept = compress(layer, max_rank=5)
    u, s, vh = torch.linalg.svd(_delta64(layer))
    expected = (u[:, :5] * s[:5]) @ vh[:5]
    torch.testing.assert_close(out.delta().double(), expected, rtol=1e-4, atol=1e-6)
    assert out.rank == 5 and out.alpha == 5.0
    assert kept == pytest.approx(float((s[:5] ** 2).sum() / (s ** 2).sum()), rel=1e-6)
    # without a cap nothing is lost
    full, kept_all = compress(layer)
    torch.testing.assert_close(full.delta(), layer.delta(), rtol=1e-4, atol=1e-6)
    assert kept_all == pytest.approx(1.0)


def test_combine_sums_updates_with_strengths():
    a, b = _layer(30, 20, k=3, alpha=1.5, seed=1), _layer(30, 20, k=5, alpha=10.0, seed=2)
    out = combine([(a, 0.25), (b, 0.75)], (30, 20))
    torch.testing.assert_close(out.delta().double(), 0.25 * _delta64(a) + 0.75 * _delta64(b), rtol=1e-5, atol=1e-7)
    assert out.rank == 8 and out.alpha == 8.0
    single = combine([(a, 0.5)], (30, 20, 1, 1))
    assert single.alpha == a.alpha and single.weight_shape == (30, 20, 1, 1)
    torch.testing.assert_close(single.delta().double(), 0.5 * _delta64(a), rtol=1e-5, atol=1e-7)
    assert combine([(a, 1.0)], (30, 20)).up is a.up


def test_direct_copies_delta_and_reshapes_conv_1x1_to_linear():
    layer = _layer(32, 32, shape=(32, 32, 1, 1))
    out = pass_through(layer, (32, 32))
    assert out.weight_shape == (32, 32)
    torch.testing.assert_close(out.delta(), layer.delta())


def test_unknown_mode_is_an_option_error():
    with pytest.raises(TransferOptionError, match="mode must be one of"):
        check_mode("sideways")


def test_relative_change_is_the_dense_distance_to_a_direct_copy_including_the_slot_embedding():
    """METHOD §2c "what moved": ||ΔW' - ΔW|| / ||ΔW|| from the factors, with a 768-wide source input placed in the
    first columns of a 2048-wide target (§3); 0 for the same update, whatever its factors' scale and alpha."""
    m, n, width = 64, 48, 112
    layer = _layer(m, n, k=5, alpha=2.0, seed=4)
    basis = _basis(m, width, 12, seed=6)
    out = project_subspace(layer, basis, (m, width))
    embedded = torch.zeros(m, width, dtype=torch.float64)
    embedded[:, :n] = _delta64(layer)
    want = float((_delta64(out) - embedded).norm() / embedded.norm())
    assert relative_change(layer, out) == pytest.approx(want, rel=1e-6)
    same = LoraLayer(layer.up * 4.0, layer.down, layer.alpha / 4.0, (m, n))   # the same ΔW, other factors
    assert relative_change(layer, same) == pytest.approx(0.0, abs=1e-6)


def test_the_report_counts_what_moved_per_applied_pair():
    """A layer on identical weights arrives whole (change 0), one on an unrelated weight moves (METHOD §2c)."""
    from lorax_engine.analysis.subspaces import SubspaceCache
    from lorax_engine.files.base_weights import StateDictWeights
    from lorax_engine.files.lora import LoraModel
    from lorax_engine.projection.transfer import TransferOptions, transfer

    g = torch.Generator().manual_seed(3)
    same = "clip_l.transformer.text_model.encoder.layers.2.self_attn.q_proj.weight"
    other = "clip_l.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight"
    w_same, w_src, w_tgt = (torch.randn(64, 64, generator=g) for _ in range(3))
    source = StateDictWeights({same: w_same, other: w_src}, "sd1", "s")
    target = StateDictWeights({same: w_same.clone(), other: w_tgt}, "sd1", "t")
    lora = LoraModel({k: _layer(64, 64, seed=i) for i, k in enumerate((same, other))}, "sd1")
    out, report = transfer(lora, source, target, TransferOptions(rank=16, method="exact", policy="all-above-threshold",
                                                                 threshold=-math.inf), cache=SubspaceCache())
    changes = {r.source_key: [c.change for c in r.candidates if c.applied] for r in report.layers}
    assert changes[same][0] == pytest.approx(0.0, abs=1e-6)
    moved = report.summary()["moved"]
    # every layer goes to both target layers: one identical pair, three unrelated ones
    assert moved == {"whole": 1, "little": 0, "more": 3}
    assert report.summary()["max_change"] == pytest.approx(max(x for v in changes.values() for x in v))
