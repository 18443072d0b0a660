"""METHOD §2c against float64 references (tests/float64_reference.py): a LoRA carried to a fine-tune of its own base
arrives nearly unchanged, a LoRA-X adapter changes no more than the paper's Eq. 3 changes it, and an unrelated target
keeps no more of a generic update than Eq. 3 keeps.

Fine-tunes are ``W + E`` with ``||E|| = eps ||W||``, in the two constructions of the issue and the zoo: half rank-8,
half dense; and lorax_zoo.pairs.finetune_drift (rescaled singular values, turned singular vectors, a rank-4 update
reading the strongest inputs). Spectra from i^-0.2 to i^-0.5, with and without four strong leading directions, and
1/i; square, tall, wide, 1x1 conv and the cross-attention k/v slot; fp32 and fp16 storage; the engine's default
options (auto, r = 320) through :func:`transfer`.
"""
from __future__ import annotations

import math

import pytest
import torch
from float64_reference import relative_error, soft_transfer, top_subspaces

from lorax_engine.analysis.subspaces import SubspaceCache
from lorax_engine.files.base_weights import StateDictWeights
from lorax_engine.files.lora import LoraLayer, LoraModel
from lorax_engine.projection.transfer import TransferOptions, transfer
from lorax_zoo.pairs import finetune_drift, leading_spectrum, random_orthonormal, spectrum_bulk

R = 320
BLOCK = "diffusion_model.input_blocks.4.1."
# shape kind -> (key, source shape, target shape)
SHAPES = {
    "square": (BLOCK + "transformer_blocks.0.attn1.to_q.weight", (640, 640), (640, 640)),
    "tall": (BLOCK + "transformer_blocks.0.ff.net.0.proj.weight", (2560, 640), (2560, 640)),
    "wide": (BLOCK + "transformer_blocks.0.ff.net.2.weight", (640, 2560), (640, 2560)),
    "conv1x1": (BLOCK + "proj_in.weight", (640, 640, 1, 1), (640, 640, 1, 1)),
    "kv_slot": (BLOCK + "transformer_blocks.0.attn2.to_k.weight", (640, 768), (640, 2048)),
}
SLOW_SPECTRA = [(0.2, 0), (0.2, 4), (0.35, 0), (0.35, 4), (0.5, 0), (0.5, 4)]    # (exponent, strong directions)


def _bound(exponent: float, eps: float) -> float:
    """METHOD §2c: <= 3 eps + 0.005 on slow spectra, <= 5 eps on 1/i."""
    return 5 * eps if exponent >= 1.0 else 3 * eps + 0.005


def _spectrum(d: int, exponent: float, strong: int) -> torch.Tensor:
    if exponent >= 1.0:
        return spectrum_bulk(d, 1.0)
    return leading_spectrum(d, exponent, strong=strong) if strong else spectrum_bulk(d, exponent)


def _weight(m: int, n: int, exponent: float, strong: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    d = min(m, n)
    return (random_orthonormal(m, d, gen) * _spectrum(d, exponent, strong)) @ random_orthonormal(n, d, gen).T


def _drifted(w: torch.Tensor, eps: float, construction: str, seed: int) -> torch.Tensor:
    if construction == "zoo":
        return finetune_drift(w, eps, seed)
    gen = torch.Generator().manual_seed(seed + 99)
    m, n = w.shape
    low = torch.randn(m, 8, generator=gen, dtype=torch.float64) @ torch.randn(8, n, generator=gen, dtype=torch.float64)
    dense = torch.randn(m, n, generator=gen, dtype=torch.float64)
    e = low / low.norm() + dense / dense.norm()
    return w + e * (eps * w.norm() / e.norm())


def _pair(shape_kind, exponent, strong, eps, construction="zoo", seed=0):
    """(source, target) float64 matrices of a fine-tune. For the k/v slot the source is embedded in the CLIP-L slot
    of the 2048-wide input first, so eps measures the whole target's distance from it (the other columns are part
    of the drift)."""
    _, source_shape, target_shape = SHAPES[shape_kind]
    m, n = source_shape[0], math.prod(source_shape[1:])
    ws = _weight(m, n, exponent, strong, seed)
    embedded = torch.zeros(m, math.prod(target_shape[1:]), dtype=torch.float64)
    embedded[:, :n] = ws
    return ws, _drifted(embedded, eps, construction, seed)


def _generic(m: int, n: int, seed: int, k: int = 16) -> LoraLayer:
    gen = torch.Generator().manual_seed(seed)
    return LoraLayer(torch.randn(m, k, generator=gen) * 0.02, torch.randn(k, n, generator=gen) / math.sqrt(n),
                     float(k), (m, n))


def _change(delta: torch.Tensor, layer: LoraLayer) -> float:
    """||ΔW' - ΔW|| / ||ΔW||, the source's update embedded in the target's width (computed here, densely)."""
    d = torch.zeros_like(delta)
    d[:, :layer.down.shape[1]] = layer.delta().double()
    return relative_error(delta, d)


def _engine(shape_kind, ws, wt, layer, method="fast", dtypes=(torch.float32, torch.float32), **options):
    """The engine's transfer of one layer; returns (ΔW' as a float64 matrix, the applied candidate's record,
    the weights as stored)."""
    key, source_shape, target_shape = SHAPES[shape_kind]
    stored_s, stored_t = ws.to(dtypes[0]).reshape(source_shape), wt.to(dtypes[1]).reshape(target_shape)
    lora = LoraModel({key: LoraLayer(layer.up, layer.down, layer.alpha, source_shape)}, "sd1")
    out, report = transfer(lora, StateDictWeights({key: stored_s}, "sd1", "s"),
                           StateDictWeights({key: stored_t}, "sd1", "t"),
                           TransferOptions(method=method, **options), cache=SubspaceCache())
    applied = [c for c in report.layers[0].candidates if c.applied]
    delta = out.layers[key].delta().double() if key in out.layers else None
    return delta, (applied[0] if applied else None), (stored_s.double().reshape(ws.shape),
                                                     stored_t.double().reshape(wt.shape))


def _check_continuity(shape_kind, exponent, strong, eps, construction="zoo", method="fast",
                      dtypes=(torch.float32, torch.float32), mode="auto"):
    ws, wt = _pair(shape_kind, exponent, strong, eps, construction)
    layer = _generic(ws.shape[0], ws.shape[1], seed=3)
    delta, applied, (ss, st) = _engine(shape_kind, ws, wt, layer, method, dtypes, mode=mode)
    assert applied is not None, "a fine-tune is a candidate well above the threshold"
    bound, change = _bound(exponent, eps), _change(delta, layer)
    assert change <= bound, f"changed by {change:.4f} > {bound:.4f}"
    want, _, _ = soft_transfer(mode, ss, st, layer.delta().double(), R)
    assert relative_error(delta, want) <= 1e-2
    assert applied.change == pytest.approx(change, rel=1e-3, abs=1e-6)     # what the report says moved


@pytest.mark.parametrize("exponent, strong", SLOW_SPECTRA + [(1.0, 0)])
@pytest.mark.parametrize("eps", [0.01, 0.03])
def test_a_lora_on_a_fine_tune_of_its_base_arrives_nearly_unchanged(exponent, strong, eps):
    _check_continuity("square", exponent, strong, eps)


@pytest.mark.parametrize("exponent, strong", [(0.2, 4), (0.5, 0), (1.0, 0)])
def test_subspace_null_is_continuous_too(exponent, strong):
    _check_continuity("square", exponent, strong, 0.03, mode="subspace+null")


@pytest.mark.parametrize("shape_kind", ["tall", "wide", "conv1x1", "kv_slot"])
@pytest.mark.parametrize("construction", ["zoo", "lowrank+dense"])
def test_continuity_holds_on_every_shape_kind_and_drift(shape_kind, construction):
    _check_continuity(shape_kind, 0.35, 4, 0.03, construction)


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float16), (torch.float32, torch.float16)],
                         ids=["fp16-fp16", "fp32-fp16"])
def test_continuity_holds_in_half_precision_storage(dtypes):
    _check_continuity("square", 0.2, 4, 0.01, dtypes=dtypes)


@pytest.mark.slow
@pytest.mark.parametrize("shape_kind", list(SHAPES))
@pytest.mark.parametrize("exponent, strong", SLOW_SPECTRA + [(1.0, 0)])
@pytest.mark.parametrize("eps", [0.003, 0.01, 0.03])
@pytest.mark.parametrize("method", ["fast", "exact"])
def test_continuity_grid(shape_kind, exponent, strong, eps, method):
    _check_continuity(shape_kind, exponent, strong, eps, "zoo" if (eps * 1000) % 2 else "lowrank+dense", method)


@pytest.mark.parametrize("exponent, strong", [(0.2, 0), (0.35, 4), (0.5, 4), (1.0, 0)])
def test_a_lora_x_adapter_changes_no_more_than_eq3_changes_it(exponent, strong):
    """An update inside the source's top-r subspaces (what LoRA-X trains) on 1% and 3% fine-tunes."""
    for eps in (0.01, 0.03):
        ws, wt = _pair("square", exponent, strong, eps)
        us, vs = top_subspaces(ws, R)
        gen = torch.Generator().manual_seed(5)
        layer = LoraLayer((us @ torch.randn(R, 16, generator=gen, dtype=torch.float64)).float() * 0.02,
                          (torch.randn(16, R, generator=gen, dtype=torch.float64) @ vs.T).float() / 25, 16.0,
                          (640, 640))
        delta, _, (ss, st) = _engine("square", ws, wt, layer)
        ut, vt = top_subspaces(st, R)
        d = layer.delta().double()
        eq3, change = relative_error(ut @ ut.T @ d @ vt @ vt.T, d), _change(delta, layer)
        assert change <= eq3, f"eps {eps}: {change:.4f} > Eq. 3's {eq3:.4f}"


@pytest.mark.parametrize("shape_kind", ["square", "tall", "kv_slot"])
@pytest.mark.parametrize("exponent, strong", [(0.2, 0), (0.5, 4), (1.0, 0)])
def test_an_unrelated_target_keeps_no_more_than_eq3_keeps(shape_kind, exponent, strong):
    """No disguised direct copy: the soft operator at chance is still a projection."""
    key, source_shape, target_shape = SHAPES[shape_kind]
    m, n = source_shape[0], math.prod(source_shape[1:])
    ws = _weight(m, n, exponent, strong, seed=1)
    wt = _weight(m, math.prod(target_shape[1:]), exponent, strong, seed=2)
    layer = _generic(m, n, seed=4)
    delta, applied, (_, st) = _engine(shape_kind, ws, wt, layer, threshold=-math.inf)
    ut, vt = top_subspaces(st, R)
    d = torch.zeros(m, st.shape[1], dtype=torch.float64)
    d[:, :n] = layer.delta().double()
    eq3 = float((ut @ ut.T @ d @ vt @ vt.T).norm() ** 2 / d.norm() ** 2)
    assert applied.energy_kept <= eq3, f"kept {applied.energy_kept:.4f} > Eq. 3's {eq3:.4f}"
    assert float(delta.norm() ** 2 / d.norm() ** 2) == pytest.approx(applied.energy_kept, rel=1e-4)
