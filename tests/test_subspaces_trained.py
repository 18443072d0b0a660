"""METHOD §2b on weights that look trained (lorax_zoo.pairs): the fast paths' bases against float64 SVDs computed
here. The fast transfer's spectra ("gram") must give normalised scores within 0.01 of the exact ones and projected
updates within 1e-2 relative; screening sketches (as transfer.py asks for them) give estimates whose interval holds
the exact score (tests/test_screening.py sweeps that envelope over every pair kind)."""
from __future__ import annotations

import functools

import pytest
import torch

from lorax_engine.analysis.similarity import layer_similarity
from lorax_engine.analysis.subspaces import Basis, SubspaceSpec, compute_basis, fast_sketch_dtype
from lorax_zoo.pairs import PAIR_KINDS, weight_pair

R = 320
SCREEN = SubspaceSpec(R, "randomized", oversample=96, power_iters=1, sketch_dtype=fast_sketch_dtype("cpu"))
PROJECT = SubspaceSpec(R, "gram")
# (exponent, cond): the zoo's 1/i bulk, i^-0.5 and the slowest trained bulk, from well to ill-conditioned
SPECTRA = [(1.0, 1e4), (0.5, 1e3), (0.5, 1e4), (0.2, 10.0), (0.2, 1e3), (0.2, 1e4)]


@functools.lru_cache(maxsize=8)     # a few pairs at a time: 1280-wide float64 weights are big
def _exact(w: torch.Tensor) -> Basis:
    """Reference: top-R singular vectors from a float64 SVD (independent of the engine's Gram code)."""
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return Basis(tuple(w.shape), u[:, :R].contiguous(), vh[:R].T.contiguous(), None, "svd")


@functools.lru_cache(maxsize=8)     # a few pairs at a time: 1280-wide float64 weights are big
def _fast(w: torch.Tensor, spec: SubspaceSpec) -> Basis:
    return compute_basis(w, spec).top(R)


@functools.lru_cache(maxsize=8)     # a few pairs at a time: 1280-wide float64 weights are big
def _pair(kind, m, n, exponent, cond):
    return weight_pair(kind, m, n, exponent=exponent, cond=cond, seed=11, rank=R)


def _projected(basis: Basis, delta: torch.Tensor) -> torch.Tensor:
    u, v = basis.u.double(), basis.v.double()
    return u @ (u.T @ delta @ v) @ v.T


def _check_pair(kind, m, n, exponent, cond):
    source, target = _pair(kind, m, n, exponent, cond)
    exact = layer_similarity(_exact(source), _exact(target)).score
    fast_s, fast_t = _fast(source, PROJECT), _fast(target, PROJECT)
    score = layer_similarity(fast_s, fast_t).score
    assert abs(score - exact) <= 0.01, f"{PROJECT.describe()}: {score:.4f} vs exact {exact:.4f}"
    assert not fast_s.estimate and not fast_t.estimate
    sketched = layer_similarity(_fast(source, SCREEN), _fast(target, SCREEN))
    assert sketched.estimate and exact <= sketched.hi
    if kind in ("identical", "same_subspace"):
        assert exact == pytest.approx(1.0, abs=1e-6)
    # a LoRA-like update (rank 16) projected onto the target's subspaces, as transfer.py does
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(m, 16, generator=g, dtype=torch.float64) @ torch.randn(16, n, generator=g, dtype=torch.float64)
    want = _projected(_exact(target), delta)
    got = _projected(_fast(target, PROJECT), delta)
    assert float((got - want).norm() / want.norm()) <= 1e-2


def _grid(d, spectra, slow=False):
    """(kind, exponent, cond) a d-wide weight can have: cond >= the bulk's own d^exponent, for the target's
    bulk too (same_subspace's is exponent + 0.3)."""
    marks = [pytest.mark.slow] if slow else []
    return [pytest.param(k, e, c, marks=marks) for k in PAIR_KINDS for e, c in spectra
            if c >= d ** (e + (0.3 if k == "same_subspace" else 0.0))]


QUICK = [(0.2, 1e3)]     # the rest of the grid is slow (~5 s a pair on the 2-core VM)


@pytest.mark.parametrize("kind, exponent, cond", _grid(640, QUICK)
                         + _grid(640, [s for s in SPECTRA if s not in QUICK], slow=True))
def test_fast_bases_agree_with_float64_svd_at_640(kind, exponent, cond):
    _check_pair(kind, 640, 640, exponent, cond)


@pytest.mark.parametrize("kind, exponent, cond", _grid(1280, SPECTRA, slow=True))
def test_fast_bases_agree_with_float64_svd_at_1280(kind, exponent, cond):
    _check_pair(kind, 1280, 1280, exponent, cond)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1280, 5120), (10240, 1280), (640, 2048), (1280, 2048)])
@pytest.mark.parametrize("kind", ["same_subspace", "partial_overlap"])
@pytest.mark.parametrize("exponent, cond", [(0.2, 1e3), (0.5, 1e4)])
def test_fast_bases_agree_with_float64_svd_on_rectangular_layers(shape, kind, exponent, cond):
    _check_pair(kind, *shape, exponent, cond)
