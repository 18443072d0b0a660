"""Spectra (exact and Gram) and screening sketches against float64 SVDs, the content-keyed cache, and the
base-weight providers (fingerprints, checkpoint layouts)."""
from __future__ import annotations

import hashlib
import math
import os
import threading
from contextlib import closing

import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file

from lorax_engine.analysis.kernels import gram_lower
from lorax_engine.analysis.subspaces import SubspaceCache, SubspaceSpec, _unit_columns, compute_basis
from lorax_engine.errors import LoraFileError, TransferOptionError
from lorax_engine.files import base_weights
from lorax_engine.files.base_weights import CheckpointWeights, StateDictWeights, tensor_fingerprint
from lorax_engine.files.safetensors_file import SafetensorsFile
from lorax_zoo import spectral_matrix
from lorax_zoo.pairs import trained_weight


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _proj(x, d):
    return torch.eye(d, dtype=torch.float64) if x is None else x.double() @ x.double().T


def _svd_projectors(w, r):
    u, s, vh = torch.linalg.svd(w.double().reshape(w.shape[0], -1), full_matrices=False)
    return u[:, :r] @ u[:, :r].T, vh[:r].T @ vh[:r], s[:r]


@pytest.mark.parametrize("shape", [(96, 64), (64, 150), (40, 8, 3, 3)])
def test_exact_basis_matches_float64_svd(shape):
    m, n = shape[0], math.prod(shape[1:])
    w = spectral_matrix(m, n, _gen(m + n)).reshape(shape)
    r, d = 20, min(m, n)
    spectrum = compute_basis(w, SubspaceSpec(r, "exact"))
    assert tuple(spectrum.u.shape) == (m, d) and tuple(spectrum.v.shape) == (n, d)
    assert spectrum.method == f"exact(d={d})"
    torch.testing.assert_close(spectrum.s.double(), torch.linalg.svdvals(w.double().reshape(m, n)), rtol=1e-5,
                               atol=1e-6)
    for x in (spectrum.u, spectrum.v):                 # every direction, orthonormal
        torch.testing.assert_close(x.T @ x, torch.eye(d), rtol=0, atol=1e-5)
    basis = spectrum.top(r)
    assert basis.shape == (m, n) and basis.u.dtype == torch.float32
    assert tuple(basis.u.shape) == (m, r) and tuple(basis.v.shape) == (n, r)
    pu, pv, s = _svd_projectors(w, r)
    torch.testing.assert_close(_proj(basis.u, m), pu, rtol=0, atol=1e-5)
    torch.testing.assert_close(_proj(basis.v, n), pv, rtol=0, atol=1e-5)
    torch.testing.assert_close(basis.s.double(), s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(basis.u.T @ basis.u, torch.eye(r), rtol=0, atol=1e-5)


def test_rank_at_least_the_width_gives_identity_and_row_space():
    w = spectral_matrix(30, 70, _gen(1))
    wide = compute_basis(w, SubspaceSpec(320, "exact")).top(320)
    assert wide.u is None and tuple(wide.v.shape) == (70, 30)
    # P_V keeps W's rows exactly: the row space is all a 30-row weight can span
    torch.testing.assert_close(_proj(wide.v, 70) @ w.double().T, w.double().T, rtol=0, atol=1e-5)
    tall = compute_basis(w.T, SubspaceSpec(30, "randomized")).top(30)      # as large as the weight: a spectrum
    assert tall.v is None and tuple(tall.u.shape) == (70, 30) and not tall.estimate
    square = compute_basis(spectral_matrix(25, 25, _gen(2)), SubspaceSpec(25, "exact")).top(25)
    assert square.u is None and square.v is None


def test_a_sketch_is_a_seeded_estimate_of_the_top_subspace():
    """On a zoo-like 640 x 640 weight (s_i ~ 1/i plus a noise floor) one power iteration captures most of the
    exact top-320 subspace but not all of it: its scores carry similarity.py's interval, never a promise of 0.01."""
    w = spectral_matrix(640, 640, _gen(3))
    r = 320
    pu, _, _ = _svd_projectors(w, r)
    default = SubspaceSpec(r, "randomized")
    basis = compute_basis(w, default)
    assert basis.estimate and basis.top(r) is basis
    captured = float(torch.trace(_proj(basis.u, 640) @ pu)) / r
    assert 0.9 < captured < 0.999
    assert torch.equal(basis.u, compute_basis(w, default).u)                 # seeded: deterministic
    assert SubspaceSpec(r, "randomized", oversample=400).effective(640, 640).method == "gram"


@pytest.mark.parametrize("shape", [(640, 640), (1280, 320), (200, 900)])
def test_gram_basis_is_close_to_exact_and_orthonormal(shape):
    """The fast transfer's projection bases: float64 Gram and eigendecomposition (subspaces.py)."""
    m, n = shape
    w = spectral_matrix(m, n, _gen(m + 2 * n)).half().float()     # fp16-stored, like checkpoint weights
    r = 160
    pu, pv, s = _svd_projectors(w, r)
    spectrum = compute_basis(w, SubspaceSpec(r, "gram"))
    assert spectrum.method == f"gram(d={min(m, n)})"
    basis = spectrum.top(r)
    for x, p, d in ((basis.u, pu, m), (basis.v, pv, n)):
        torch.testing.assert_close(x.T @ x, torch.eye(r), rtol=0, atol=2e-5)
        assert float((_proj(x, d) - p).norm() / p.norm()) < 2e-3
    torch.testing.assert_close(basis.s.double(), s, rtol=1e-4, atol=0)


@pytest.mark.parametrize("shape", [(640, 640), (1280, 640), (320, 1280)])
def test_a_spectrums_other_side_is_float64_accurate_on_an_ill_conditioned_weight(shape):
    """Both sides of a spectrum of a trained-looking weight (i^-0.2 bulk, s_1 / s_d = 1e4) against a float64 SVD:
    every direction orthonormal and the top-r projectors within 1e-5. The side that is not eigendecomposed is
    W V normalised in float64; a float32 product and QR there missed the projector by 6e-5."""
    m, n = shape
    w = trained_weight(m, n, exponent=0.2, cond=1e4, seed=5).float()
    d, r = min(m, n), 160
    pu, pv, s = _svd_projectors(w, r)
    for method in ("gram", "exact"):
        spectrum = compute_basis(w, SubspaceSpec(r, method))
        for x in (spectrum.u, spectrum.v):
            torch.testing.assert_close(x.T @ x, torch.eye(d), rtol=0, atol=2e-6)
        basis = spectrum.top(r)
        for x, p, dim in ((basis.u, pu, m), (basis.v, pv, n)):
            assert float((_proj(x, dim) - p).norm() / p.norm()) < 1e-5
        torch.testing.assert_close(basis.s.double(), s, rtol=1e-5, atol=0)


def test_a_rank_deficient_weight_still_gets_an_orthonormal_spectrum():
    """Directions of zero singular value have no W v / s to normalise: the QR makes them orthonormal too, and the
    weight's own directions are still the exact ones."""
    w = spectral_matrix(300, 40, _gen(4)) @ spectral_matrix(40, 200, _gen(5))      # rank 40 of 200
    spectrum = compute_basis(w, SubspaceSpec(20, "gram"))
    for x in (spectrum.u, spectrum.v):
        torch.testing.assert_close(x.T @ x, torch.eye(200), rtol=0, atol=1e-5)
    pu, pv, _ = _svd_projectors(w, 20)
    basis = spectrum.top(20)
    torch.testing.assert_close(_proj(basis.u, 300), pu, rtol=0, atol=1e-5)
    torch.testing.assert_close(_proj(basis.v, 200), pv, rtol=0, atol=1e-5)


def test_small_singular_directions_are_measured_and_made_orthonormal():
    """Directions with singular values below 1e-4 s_1 are re-orthogonalised rather than replaced: down to where
    float64 resolves them (1e-5 s_1 here) they are the weight's own singular vectors, and the whole side is
    orthonormal (a float64 ``W V`` alone left such columns 1e-6 off orthogonal)."""
    gen = _gen(7)
    u0 = torch.linalg.qr(torch.randn(300, 200, generator=gen, dtype=torch.float64)).Q
    v0 = torch.linalg.qr(torch.randn(200, 200, generator=gen, dtype=torch.float64)).Q
    s0 = torch.logspace(0, -7, 200, dtype=torch.float64)
    w = ((u0 * s0) @ v0.T).float()
    spectrum = compute_basis(w, SubspaceSpec(20, "gram"))
    for x in (spectrum.u, spectrum.v):
        torch.testing.assert_close(x.T @ x, torch.eye(200), rtol=0, atol=2e-6)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    resolved = s >= 1e-5 * s[0]
    assert int((resolved & (s < 1e-4 * s[0])).sum()) >= 20
    for got, want in ((spectrum.u, u), (spectrum.v, vh.T)):
        cosines = (got.double() * want).sum(0).abs()[resolved]
        assert float(cosines.min()) > 1 - 1e-6


def test_columns_in_the_span_of_the_others_still_come_out_orthonormal():
    """The completion of small columns falls back to a whole QR where projecting them off cannot settle them: a
    column that is a tiny multiple of another, and a zero one."""
    x = torch.zeros(6, 5, dtype=torch.float64)
    x[0, 0], x[1, 1], x[2, 2], x[0, 3] = 3.0, 2.0, 1.0, 1e-6
    out = _unit_columns(x, torch.linalg.vector_norm(x, dim=0))
    torch.testing.assert_close(out.T @ out, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[:, :3].abs(), torch.eye(6, 3, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(50, 7), (9, 1), (300, 104), (40, 130)])
def test_the_blockwise_gram_is_what_eigh_reads_of_the_full_one(shape):
    """Spectra and sketches eigendecompose a Gram built on and below the diagonal only (``eigh`` reads that part):
    it must equal the full product there, for widths the blocks do not divide, and give its eigenpairs."""
    x = torch.randn(*shape, generator=_gen(6), dtype=torch.float64)
    full = x.T @ x
    lower = gram_lower(x)
    torch.testing.assert_close(torch.tril(lower), torch.tril(full), rtol=1e-12, atol=1e-12)
    evals, evecs = torch.linalg.eigh(lower)
    torch.testing.assert_close(evals, torch.linalg.eigvalsh(full), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(evecs * evals @ evecs.T, full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sketch_dtype", ["float32", "bfloat16"])
def test_exact_scores_lie_in_the_intervals_of_sketched_ones(sketch_dtype):
    """Screening (transfer.py's fast path) on zoo-like weights, in either sketch dtype: a drifted copy's and an
    unrelated weight's exact scores lie in the intervals their estimates give, and the unrelated one's upper
    bound is below the default threshold."""
    from lorax_engine.analysis.similarity import layer_similarity

    w = spectral_matrix(640, 640, _gen(7))
    low_rank = torch.randn(640, 4, generator=_gen(8)) @ torch.randn(4, 640, generator=_gen(9))
    drift = w + 0.01 * w.norm() / 640 * low_rank
    other = spectral_matrix(640, 640, _gen(10))
    spec = SubspaceSpec(320, "randomized", sketch_dtype=sketch_dtype)
    assert spec.effective(640, 640).describe().endswith(f",{sketch_dtype})")
    product = getattr(torch, sketch_dtype)
    exact = {k: compute_basis(x, SubspaceSpec(320, "exact")).top(320)
             for k, x in (("w", w), ("d", drift), ("o", other))}
    fast = {k: compute_basis(x, spec) for k, x in (("w", w), ("d", drift), ("o", other))}
    for a, b in (("w", "d"), ("w", "o")):
        e, f = layer_similarity(exact[a], exact[b]), layer_similarity(fast[a].to(product), fast[b].to(product))
        assert f.estimate and e.score <= f.hi
    assert layer_similarity(exact["w"], exact["d"]).score > 0.5
    assert layer_similarity(fast["w"].to(product), fast["o"].to(product)).hi < 0.05


def test_spec_validation():
    for bad in ({"rank": 0}, {"method": "svd"}, {"oversample": -1}, {"sketch_dtype": "float16"}):
        with pytest.raises(TransferOptionError):
            SubspaceSpec(**bad)


# --------------------------------------------------------------------------------------------- cache

def _weights(seed=0, shape=(64, 48)):
    return StateDictWeights({"diffusion_model.x.weight": spectral_matrix(*shape, _gen(seed)).half()},
                            architecture="sd1", name="t")


KEY = "diffusion_model.x.weight"
SPEC = SubspaceSpec(16, "exact")


def _entries(directory):
    return sorted((directory / "bases").rglob("*.safetensors"))


def test_memory_and_disk_hits_return_the_same_basis(tmp_path):
    weights = _weights()
    cache = SubspaceCache(tmp_path)
    first = cache.get(weights, KEY, SPEC)
    assert cache.get(weights, KEY, SPEC) is first
    assert (cache.stats.computed, cache.stats.memory_hits) == (1, 1)
    [entry] = _entries(tmp_path)
    with SafetensorsFile(entry) as f:          # a plain safetensors file, no pickle
        assert set(f.keys()) == {"u", "v", "s"}
        assert KEY not in f.metadata["lorax.cache_key"] and weights.fingerprint(KEY) in f.metadata["lorax.cache_key"]
    fresh = SubspaceCache(tmp_path)
    again = fresh.get(weights, KEY, SPEC)
    assert (fresh.stats.disk_hits, fresh.stats.computed) == (1, 0)
    assert torch.equal(again.u, first.u) and torch.equal(again.v, first.v)
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_spectrum_at_hand_serves_a_sketchs_request(tmp_path):
    """A sketch and a spectrum of one weight are separate entries, and the kind is part of the key; a request for
    a sketch is served by the spectrum when one is cached (it is exact), from memory or disk."""
    flat = StateDictWeights({KEY: trained_weight(640, 640, exponent=0.2, cond=1e3).half()}, architecture="sd1")
    screening, spectrum = SubspaceSpec(320, "randomized"), SubspaceSpec(320, "gram")
    cache = SubspaceCache(tmp_path)
    sketch = cache.get(flat, KEY, screening)
    assert sketch.estimate and sketch.method.startswith("randomized(")
    exact = cache.get(flat, KEY, spectrum)
    assert not exact.estimate and cache.stats.computed == 2 and len(_entries(tmp_path)) == 2
    again = SubspaceCache(tmp_path)
    assert again.get(flat, KEY, screening).estimate and again.stats.disk_hits == 1
    (tmp_path / "spare").mkdir()
    only_spectrum = SubspaceCache(tmp_path / "spare")
    first = only_spectrum.get(flat, KEY, spectrum)
    assert only_spectrum.get(flat, KEY, screening) is first and only_spectrum.stats.computed == 1


def test_key_follows_content_rank_and_method(tmp_path):
    cache = SubspaceCache(tmp_path)
    for dt in ("float32", "bfloat16"):                                       # each sketch is its own entry
        assert cache.get(_weights(0), KEY, SubspaceSpec(16, "randomized", oversample=4, sketch_dtype=dt)).estimate
    a = cache.get(_weights(0), KEY, SPEC)
    b = cache.get(_weights(1), KEY, SPEC)            # same key name, other values
    assert not torch.allclose(_proj(a.u, 64), _proj(b.u, 64), atol=1e-2)
    assert cache.get(_weights(0), KEY, SubspaceSpec(12, "exact")) is a     # a spectrum serves every rank
    # "gram" and "exact" are one computation: either serves the other
    assert cache.get(_weights(0), KEY, SubspaceSpec(16, "gram")) is a
    assert cache.stats.computed == 4 and len(_entries(tmp_path)) == 4
    # a weight modified in place is hashed again: no stale basis
    tensors = {KEY: spectral_matrix(64, 48, _gen(0)).half()}
    weights = StateDictWeights(tensors, "sd1")
    before = cache.get(weights, KEY, SPEC)
    tensors[KEY].mul_(-1).add_(spectral_matrix(64, 48, _gen(9)).half())
    after = cache.get(weights, KEY, SPEC)
    assert after is not before and cache.stats.computed == 5


@pytest.mark.parametrize("damage", ["truncate", "garbage", "nan", "swap"])
def test_damaged_disk_entries_are_discarded_and_recomputed(tmp_path, damage):
    weights = _weights()
    reference = SubspaceCache(tmp_path).get(weights, KEY, SPEC)
    [entry] = _entries(tmp_path)
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:-100])
    elif damage == "garbage":
        entry.write_bytes(b"\x00" * 64)
    elif damage == "nan":
        with SafetensorsFile(entry) as f:
            tensors, meta = {k: f.get(k).clone() for k in f.keys()}, dict(f.metadata)
        tensors["u"][0, 0] = float("nan")
        save_file(tensors, str(entry), metadata=meta)
    else:   # an entry of another weight placed under this key's name
        other = tmp_path / "other"
        SubspaceCache(other).get(_weights(5), KEY, SPEC)
        entry.write_bytes(_entries(other)[0].read_bytes())
    cache = SubspaceCache(tmp_path)
    basis = cache.get(weights, KEY, SPEC)
    assert (cache.stats.discarded, cache.stats.computed, cache.stats.disk_hits) == (1, 1, 0)
    torch.testing.assert_close(basis.u, reference.u)
    fresh = SubspaceCache(tmp_path)                  # the rewritten entry is good again
    fresh.get(weights, KEY, SPEC)
    assert fresh.stats.disk_hits == 1


def test_unwritable_cache_directory_costs_only_speed(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = SubspaceCache(blocker / "cache")
    basis = cache.get(_weights(), KEY, SPEC)
    assert basis.u is not None and cache.stats.computed == 1


def test_memory_lru_is_bounded_in_bytes():
    w1, w2 = _weights(1), _weights(2)
    one = compute_basis(w1.matrix(KEY), SPEC).nbytes
    cache = SubspaceCache(memory_bytes=int(1.5 * one))
    cache.get(w1, KEY, SPEC)
    cache.get(w2, KEY, SPEC)                          # evicts w1
    cache.get(w1, KEY, SPEC)
    assert (cache.stats.computed, cache.stats.memory_hits) == (3, 0)
    cache.get(w1, KEY, SPEC)
    assert cache.stats.memory_hits == 1


def _many_weights(n=6, bad=None):
    tensors = {f"diffusion_model.w{i}.weight": spectral_matrix(64, 48 + 8 * i, _gen(20 + i)).half() for i in range(n)}
    if bad is not None:
        tensors[f"diffusion_model.w{bad}.weight"][3, 5] = float("nan")
    return StateDictWeights(tensors, architecture="sd1", name="many")


def test_get_many_yields_in_order_what_get_computes(tmp_path):
    weights = _many_weights()
    keys = list(reversed(weights.keys()))
    threads = torch.get_num_threads()
    cache = SubspaceCache(tmp_path / "a")
    got = list(cache.get_many(weights, keys, SPEC, workers=2))
    assert [k for k, _ in got] == keys and cache.stats.computed == len(keys)
    assert torch.get_num_threads() == threads
    serial = SubspaceCache(tmp_path / "b")
    for key, basis in got:
        expected = serial.get(weights, key, SPEC)
        torch.testing.assert_close(_proj(basis.u, 64), _proj(expected.u, 64), rtol=0, atol=1e-5)
        torch.testing.assert_close(_proj(basis.v, basis.shape[1]), _proj(expected.v, basis.shape[1]), rtol=0, atol=1e-5)
    again = list(cache.get_many(weights, keys, SPEC, workers=2))    # all from memory now
    assert cache.stats.memory_hits == len(keys) and all(a is b for (_, a), (_, b) in zip(got, again, strict=True))


def test_get_many_raises_at_the_damaged_weight_and_cleans_up():
    weights = _many_weights(bad=3)
    threads = torch.get_num_threads()
    seen = []
    with pytest.raises(LoraFileError, match="w3.weight holds NaN"):
        for key, _ in SubspaceCache().get_many(weights, weights.keys(), SPEC, workers=2):
            seen.append(key)
    assert seen == weights.keys()[:3]
    assert torch.get_num_threads() == threads
    assert not [t for t in threading.enumerate() if t.name.startswith("lorax-basis")]


def test_get_many_closed_early_waits_for_its_threads():
    weights = _many_weights()
    threads = torch.get_num_threads()
    with closing(SubspaceCache().get_many(weights, weights.keys(), SPEC, workers=2)) as fetched:
        next(fetched)
    assert torch.get_num_threads() == threads
    assert not [t for t in threading.enumerate() if t.name.startswith("lorax-basis")]


# --------------------------------------------------------------------------------------------- providers

def test_fingerprint_is_xxh3_128_of_dtype_shape_and_bytes_and_sha256_without_xxhash(monkeypatch):
    t = torch.arange(12, dtype=torch.float16).reshape(3, 4)
    content = b"torch.float16|(3, 4)|" + t.numpy().tobytes()
    assert tensor_fingerprint(t) == "xxh3_128:" + xxhash.xxh3_128(content).hexdigest()
    assert tensor_fingerprint(t.float()) != tensor_fingerprint(t)
    assert tensor_fingerprint(t.reshape(4, 3)) != tensor_fingerprint(t)
    monkeypatch.setattr(base_weights, "xxhash", None)
    assert tensor_fingerprint(t) == "sha256:" + hashlib.sha256(content).hexdigest()


def _write(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_sdxl_checkpoint_layout_splits_openclip_in_proj_rows(tmp_path):
    g = _gen(0)
    inproj = torch.randn(3 * 8, 8, generator=g).half()
    tensors = {
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": torch.randn(6, 6, generator=g).half(),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight":
            torch.randn(5, 5, generator=g).half(),
        "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight": inproj,
        "conditioner.embedders.1.model.transformer.resblocks.2.attn.out_proj.weight": torch.randn(8, 8).half(),
        "conditioner.embedders.1.model.transformer.resblocks.2.mlp.c_fc.weight": torch.randn(32, 8).half(),
        "conditioner.embedders.1.model.transformer.resblocks.2.mlp.c_proj.weight": torch.randn(8, 32).half(),
        "first_stage_model.decoder.conv_in.weight": torch.randn(4, 4, 3, 3).half(),
    }
    with CheckpointWeights(_write(tmp_path / "xl.safetensors", tensors)) as w:
        g_layer = "clip_g.transformer.text_model.encoder.layers.2."
        assert sorted(w.keys()) == sorted([
            "diffusion_model.input_blocks.4.1.proj_in.weight",
            "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
            *(f"{g_layer}self_attn.{p}_proj.weight" for p in ("q", "k", "v", "out")),
            f"{g_layer}mlp.fc1.weight", f"{g_layer}mlp.fc2.weight"])
        for i, p in enumerate("qkv"):
            key = f"{g_layer}self_attn.{p}_proj.weight"
            assert w.shape(key) == (8, 8)
            assert torch.equal(w.matrix(key), inproj[8 * i: 8 * (i + 1)].float())
            assert w.fingerprint(key) == tensor_fingerprint(inproj[8 * i: 8 * (i + 1)])
        assert torch.equal(w.matrix(f"{g_layer}mlp.fc1.weight"),
                           tensors["conditioner.embedders.1.model.transformer.resblocks.2.mlp.c_fc.weight"].float())


def test_sd15_unet_only_and_diffusers_layouts(tmp_path):
    conv = torch.randn(8, 8, 1, 1).half()
    sd15 = {"model.diffusion_model.input_blocks.4.1.proj_in.weight": conv,
            "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight": torch.randn(6, 3).half()}
    with CheckpointWeights(_write(tmp_path / "a.safetensors", sd15)) as w:
        assert set(w.keys()) == {"diffusion_model.input_blocks.4.1.proj_in.weight",
                                 "clip_l.transformer.text_model.encoder.layers.3.mlp.fc1.weight"}
        assert w.shape("diffusion_model.input_blocks.4.1.proj_in.weight") == (8, 8, 1, 1)
        assert tuple(w.matrix("diffusion_model.input_blocks.4.1.proj_in.weight").shape) == (8, 8)
    with CheckpointWeights(_write(tmp_path / "b.safetensors", {"input_blocks.4.1.proj_in.weight": conv})) as w:
        assert w.keys() == ["diffusion_model.input_blocks.4.1.proj_in.weight"]
    diffusers = {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.randn(4, 768).half(),
                 "up_blocks.1.attentions.2.proj_out.weight": torch.randn(4, 4, 1, 1).half()}
    with CheckpointWeights(_write(tmp_path / "c.safetensors", diffusers)) as w:
        assert sorted(w.keys()) == ["diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
                                    "diffusion_model.output_blocks.5.1.proj_out.weight"]


def test_a_file_without_model_weights_is_refused(tmp_path):
    path = _write(tmp_path / "lora.safetensors", {"lora_unet_x.lora_up.weight": torch.zeros(2, 2)})
    with pytest.raises(LoraFileError, match="lora.safetensors.*no UNet or text-encoder weights"):
        CheckpointWeights(path)


def test_zoo_sdxl_checkpoint_reads_lazily_with_real_names(zoo):
    path = zoo.checkpoint("sdxl")
    with CheckpointWeights(path) as w:
        assert w.architecture == "sdxl"
        key = "clip_g.transformer.text_model.encoder.layers.31.self_attn.v_proj.weight"
        assert w.shape(key) == (1280, 1280)
        with safe_open(str(path), "pt") as f:
            inproj = f.get_slice("conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight")
            expected = inproj[2560:3840].float()
        assert torch.equal(w.matrix(key), expected)
        assert w.shape("diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight") == (1280, 2048)
        assert len([k for k in w.keys() if k.startswith("clip_g.") and k.endswith("q_proj.weight")]) == 32


def test_digest_memo_is_reused_and_invalidated_by_any_rewrite(tmp_path):
    path = _write(tmp_path / "m.safetensors", {"model.diffusion_model.out.2.weight": torch.ones(4, 4).half()})
    memo = tmp_path / "memo"
    key = "diffusion_model.out.2.weight"
    with CheckpointWeights(path, fingerprint_dir=memo) as w:
        digest = w.fingerprint(key)
    with CheckpointWeights(path, fingerprint_dir=memo) as w:
        assert w.fingerprint(key) == digest and w.read_seconds == 0.0     # not read: memo hit
    stat = os.stat(path)
    _write(path, {"model.diffusion_model.out.2.weight": torch.zeros(4, 4).half()})   # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))                          # mtime forged back
    with CheckpointWeights(path, fingerprint_dir=memo) as w:
        assert w.fingerprint(key) != digest and w.read_seconds > 0.0
    with CheckpointWeights(path, fingerprint_dir=memo, rehash=True) as w:
        assert w.fingerprint(key) == tensor_fingerprint(torch.zeros(4, 4).half())


def test_a_digest_memo_of_the_other_hash_is_computed_again(tmp_path, monkeypatch):
    """Digests memoised while xxhash was missing (sha256) are not mixed with xxh3-128 ones once it is installed:
    equal weights of two files must have equal digests."""
    path = _write(tmp_path / "m.safetensors", {"model.diffusion_model.out.2.weight": torch.ones(4, 4).half()})
    memo = tmp_path / "memo"
    key = "diffusion_model.out.2.weight"
    monkeypatch.setattr(base_weights, "xxhash", None)
    with CheckpointWeights(path, fingerprint_dir=memo) as w:
        assert w.fingerprint(key).startswith("sha256:")
    monkeypatch.undo()
    with CheckpointWeights(path, fingerprint_dir=memo) as w:
        assert w.fingerprint(key) == tensor_fingerprint(torch.ones(4, 4).half()) and w.read_seconds > 0.0
    with CheckpointWeights(path, fingerprint_dir=memo) as w:
        assert w.fingerprint(key).startswith("xxh3_128:") and w.read_seconds == 0.0      # memoised under it now


def test_a_weight_with_nan_is_a_clear_error_not_a_cached_basis(tmp_path):
    w = spectral_matrix(32, 24, _gen(0))
    w[3, 4] = float("nan")
    weights = StateDictWeights({KEY: w}, architecture="sd1", name="broken.safetensors")
    cache = SubspaceCache(tmp_path)
    with pytest.raises(LoraFileError, match="broken.safetensors.*diffusion_model.x.weight holds NaN"):
        cache.get(weights, KEY, SPEC)
    assert not _entries(tmp_path)


def test_fingerprints_hashed_in_threads_equal_the_serial_ones(tmp_path):
    """prefetch_fingerprints hashes many weights of one file at once (positional reads, no shared offset)."""
    from lorax_engine.files.base_weights import prefetch_fingerprints

    g = _gen(5)
    tensors = {f"model.diffusion_model.input_blocks.{i}.0.weight": torch.randn(64 + i, 32, generator=g).half()
               for i in range(12)}
    path = _write(tmp_path / "m.safetensors", tensors)
    expected = {f"diffusion_model.input_blocks.{i}.0.weight": tensor_fingerprint(t)
                for i, t in enumerate(tensors.values())}
    with CheckpointWeights(path) as w:
        prefetch_fingerprints(w, [*expected, *expected], workers=6)
        assert w.missing_fingerprints(expected) == []
        assert {k: w.fingerprint(k) for k in expected} == expected
    state = StateDictWeights({k: t for k, t in zip(expected, tensors.values(), strict=True)}, architecture="sd1")
    assert state.missing_fingerprints(expected) == list(expected)
    prefetch_fingerprints(state, expected, workers=6)
    assert state.missing_fingerprints(expected) == [] and {k: state.fingerprint(k) for k in expected} == expected
    next(iter(state._tensors.values())).add_(1)          # written in place: hashed again
    assert state.missing_fingerprints(expected) == [next(iter(expected))]
