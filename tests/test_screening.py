"""The screening envelope (similarity.py, METHOD §2b): on every pair kind of lorax_zoo.pairs, including partial
overlaps from anti-correlated to 0.9 and fine-tunes at several drifts, on slow and 1/i spectra, square, rectangular
and in the k/v slot, the exact normalised score of each side is at most the upper bound a screening sketch gives
(the sketch exactly as the fast transfer computes it). The exact scores come from float64 SVDs computed here."""
from __future__ import annotations

import pytest
import torch
from float64_reference import normalised_score, top_subspaces

from lorax_engine.analysis.similarity import layer_similarity, side_upper_bound
from lorax_engine.analysis.subspaces import SubspaceSpec, compute_basis
from lorax_zoo.pairs import finetune_drift, slot_pair, weight_pair

R = 320
KINDS = ([("unrelated", {}), ("same_subspace", {}), ("same_subspace", {"target_exponent": 0.1}),
          ("identical_fp32_fp16", {})]
         + [("partial_overlap", {"overlap": o}) for o in (0.2, 0.35, 0.45, 0.6, 0.9)]
         + [("finetune", {"drift": e}) for e in (0.03, 0.3, 1.0)])
SPECTRA = [(0.2, 1e2), (0.2, 1e4), (0.35, 1e3), (0.5, 1e4), (1.0, 1e4)]


def _check(source: torch.Tensor, target: torch.Tensor, sketch_dtype: str):
    spec = SubspaceSpec(R, "randomized", sketch_dtype=sketch_dtype)
    sim = layer_similarity(compute_basis(source.float(), spec), compute_basis(target.float(), spec))
    assert sim.estimate
    us, vs = top_subspaces(source, R)
    ut, vt = top_subspaces(target, R)
    (m, n) = source.shape
    for side, exact, dim in ((sim.u, normalised_score(us, ut), m), (sim.v, normalised_score(vs, vt), n)):
        assert exact <= side_upper_bound(side, dim) + 1e-9, (exact, side.normalised)
    assert min(normalised_score(us, ut), normalised_score(vs, vt)) <= sim.hi + 1e-9


def _pair(kind, options, m, n, exponent, cond):
    return weight_pair(kind, m, n, exponent=exponent, cond=cond, seed=7, rank=R, **options)


@pytest.mark.parametrize("kind, options", KINDS, ids=[f"{k}{list(o.values())}" for k, o in KINDS])
def test_the_upper_bound_holds_at_640_on_the_slowest_ill_conditioned_spectrum(kind, options):
    _check(*_pair(kind, options, 640, 640, 0.2, 1e4), "bfloat16")


@pytest.mark.slow
@pytest.mark.parametrize("sketch_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("shape", [(640, 640), (1280, 1280), (640, 2560), (5120, 640)])
@pytest.mark.parametrize("exponent, cond", SPECTRA)
@pytest.mark.parametrize("kind, options", KINDS, ids=[f"{k}{list(o.values())}" for k, o in KINDS])
def test_the_upper_bound_holds_on_every_pair_kind_spectrum_and_shape(kind, options, exponent, cond, shape,
                                                                       sketch_dtype):
    if cond < min(shape) ** (exponent + (0.3 if kind == "same_subspace" and not options else 0.0)):
        pytest.skip("the bulk alone has a larger condition number")
    _check(*_pair(kind, options, *shape, exponent, cond), sketch_dtype)


@pytest.mark.slow
@pytest.mark.parametrize("kind, options", [("unrelated", {}), ("partial_overlap", {"overlap": 0.45}),
                                           ("identical", {})])
def test_the_upper_bound_holds_in_the_kv_slot(kind, options):
    """SD1.5's k/v [1280, 768] against SDXL's [1280, 2048], scored within the CLIP-L slot (METHOD §3)."""
    source, target = slot_pair(kind, 1280, exponent=0.3, cond=1e3, seed=7, rank=R, **options)
    spec = SubspaceSpec(R, "randomized", sketch_dtype="bfloat16")
    sim = layer_similarity(compute_basis(source.float(), spec), compute_basis(target.float(), spec))
    us, vs = top_subspaces(source.double(), R)
    ut, vt = top_subspaces(target.double(), R)
    exact = min(normalised_score(us, ut), normalised_score(vs, vt))
    assert exact <= sim.hi + 1e-9


def test_a_fine_tune_drift_has_the_size_asked_for():
    source, target = weight_pair("finetune", 320, 200, rank=100, drift=0.03, seed=1)
    assert float((target - source).norm() / source.norm()) == pytest.approx(0.03)
    torch.testing.assert_close(finetune_drift(source, 0.0, 1), source)
