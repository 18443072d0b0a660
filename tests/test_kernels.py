"""The float64 kernels of the CPU spectra (lorax_engine/analysis/kernels.py): numpy's and torch's sides give the same
results, numpy's BLAS is held to the threads given and nothing else is touched, and without threadpoolctl
everything runs on torch."""
from __future__ import annotations

import pytest
import threadpoolctl
import torch

from lorax_engine.analysis import kernels
from lorax_engine.analysis.subspaces import SubspaceCache, SubspaceSpec, compute_basis
from lorax_engine.files.base_weights import StateDictWeights
from lorax_zoo.pairs import trained_weight


def _blas_threads_now() -> list[int]:
    return [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]


def _tall(seed: int, m: int = 300, n: int = 120) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_numpy_and_torch_give_the_same_eigenpairs_and_products():
    x = _tall(1)
    gram = x.T @ x
    for got_vals, got_vecs in (kernels.eigh(kernels.gram(x, numpy=True), numpy=True),
                               kernels.eigh(kernels.gram_lower(x), numpy=True)):
        want_vals, want_vecs = torch.linalg.eigh(gram)
        torch.testing.assert_close(got_vals, want_vals, rtol=1e-12, atol=1e-10)
        # eigenvectors up to sign (the eigenvalues are simple): |cosines| of 1 column by column
        torch.testing.assert_close((got_vecs * want_vecs).sum(0).abs(), torch.ones(120, dtype=torch.float64),
                                   rtol=0, atol=1e-9)
    torch.testing.assert_close(kernels.eigh(kernels.gram(x, numpy=False), numpy=False)[0], torch.linalg.eigvalsh(gram),
                               rtol=1e-12, atol=1e-10)
    for numpy in (True, False):     # whatever lies above the diagonal, on and below it is the Gram
        torch.testing.assert_close(kernels.gram(x, numpy=numpy).tril(), gram.tril(), rtol=1e-12, atol=1e-10)
    b = _tall(2, 120, 40)
    torch.testing.assert_close(kernels.matmul(x, b, numpy=True), x @ b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kernels.matmul(x.T.contiguous().T, b, numpy=True), x @ b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(640, 256), (256, 640)])
def test_a_spectrum_is_the_same_on_either_side(monkeypatch, shape):
    """Both sides, tall and wide, on a trained-looking weight (i^-0.2 bulk, cond 1e4): singular values and every
    direction agree to float32 storage, so the cache may serve an entry computed by either."""
    w = trained_weight(*shape, exponent=0.2, cond=1e4, seed=3).float()
    spectra = []
    for numpy in (False, True):
        monkeypatch.setattr(kernels, "prefer_numpy", lambda numpy=numpy: numpy)
        spectra.append(compute_basis(w, SubspaceSpec(64, "gram")))
    torch_side, numpy_side = spectra
    torch.testing.assert_close(numpy_side.s, torch_side.s, rtol=1e-6, atol=0)
    for a, b in ((numpy_side.u, torch_side.u), (numpy_side.v, torch_side.v)):
        cosines = (a.double() * b.double()).sum(0).abs()
        torch.testing.assert_close(cosines, torch.ones_like(cosines), rtol=0, atol=1e-5)


def test_blas_threads_holds_numpys_blas_and_leaves_torchs_threads_alone():
    assert kernels._blas_controller() is not None, "threadpoolctl finds no BLAS of numpy's to control"
    before, torch_threads = _blas_threads_now(), torch.get_num_threads()
    with kernels.blas_threads(1):
        assert _blas_threads_now() == [1] * len(before)
        torch.set_num_threads(max(1, torch_threads - 1))
        torch.set_num_threads(torch_threads)
    assert _blas_threads_now() == before and torch.get_num_threads() == torch_threads


def test_get_many_holds_numpys_blas_to_each_workers_share_while_it_runs(tmp_path):
    if torch.get_num_threads() < 2:
        pytest.skip("needs 2 torch threads to split between 2 workers")
    weights = StateDictWeights({f"w{i}.weight": trained_weight(96, 64, seed=i).float() for i in range(4)})
    before, torch_threads = _blas_threads_now(), torch.get_num_threads()
    seen = []
    for _ in SubspaceCache(tmp_path).get_many(weights, weights.keys(), SubspaceSpec(16, "gram"), workers=2):
        seen.append((_blas_threads_now(), torch.get_num_threads()))
    share = torch_threads // 2
    assert seen == [([share] * len(before), share)] * 4
    assert _blas_threads_now() == before and torch.get_num_threads() == torch_threads


def test_without_threadpoolctl_everything_stays_on_torch(monkeypatch):
    """A pack installed without its requirements: numpy's BLAS cannot be held to a thread count, so numpy is not
    used at all (its own pool on top of the basis workers would oversubscribe the cores)."""
    monkeypatch.setattr(kernels, "threadpoolctl", None)
    kernels._blas_controller.cache_clear()
    kernels.prefer_numpy.cache_clear()
    try:
        assert kernels._blas_controller() is None and kernels.prefer_numpy() is False
        with kernels.blas_threads(1):
            pass
        called = []
        monkeypatch.setattr(kernels.np.linalg, "eigh", lambda *a, **k: called.append(a))
        spectrum = compute_basis(trained_weight(96, 64, seed=1).float(), SubspaceSpec(16, "gram"))
        assert not called and spectrum.s.shape == (64,)
    finally:
        kernels._blas_controller.cache_clear()
        kernels.prefer_numpy.cache_clear()


@pytest.mark.parametrize(("vendor", "mkl", "expected"), [("AuthenticAMD", True, True), ("GenuineIntel", True, False),
                                                      ("AuthenticAMD", False, False)])
def test_numpy_is_chosen_by_a_fixed_rule(monkeypatch, vendor, mkl, expected):
    """numpy's OpenBLAS (controlled by threadpoolctl here) replaces torch's MKL on CPUs not made by Intel, and only
    there: a rule, not a timing, so every process of a machine computes the same bits."""
    monkeypatch.setattr(kernels, "_cpu_vendor", lambda: vendor)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: mkl)
    kernels.prefer_numpy.cache_clear()
    try:
        assert kernels.prefer_numpy() is expected
    finally:
        kernels.prefer_numpy.cache_clear()

