"""Projection of LoRA factors onto target subspaces (METHOD.md §2, §3), on the factors only.

For ``ΔW = s B A`` (``B`` = up ``[m, k]``, ``A`` = down ``[k, n]``, ``s = alpha / k``) and a target basis
``(U_t, V_t)``:

* ``subspace`` (default): ``B' = U_t (U_t^T B)``, ``A' = (A V_t) V_t^T``, alpha unchanged. Equals
  ``P_Ut ΔW P_Vt`` exactly, keeps the rank, never forms an ``m x n`` matrix.
* ``subspace+null`` (after ProLoRA, arXiv 2506.04244): ``ΔW_in = P_Us ΔW P_Vs`` goes through the target
  projectors, the rest ``ΔW - ΔW_in`` through the complements ``(I - P_Ut) . (I - P_Vt)``. On factors
  (``B1 = P_Us B``, ``A1 = A P_Vs``)::

      out = s [P_Ut B1 | (I-P_Ut) B | -(I-P_Ut) B1] [A1 P_Vt ; A (I-P_Vt) ; A1 (I-P_Vt)]

  rank <= 3k; it is re-compressed exactly (QR of both factors, SVD of the small core, singular values
  below 1e-6 of the largest dropped), and truncated further when an output rank cap is set.
* ``direct`` (baseline, labelled as such): ΔW copied unchanged where the target weight of the same name
  has the same matrix shape, which is what a stock loader does with an SD1.5 LoRA on SDXL.

Inputs narrower than the target (cross-attention k/v, §3) are embedded first: ``A [k, 768]`` becomes
``[A | 0]`` of width 2048 (the CLIP-L slot). Energy kept = ``||ΔW'||_F^2 / ||ΔW||_F^2``, from the factors.
"""
from __future__ import annotations

import torch

from ..analysis.subspaces import Basis
from ..errors import TransferOptionError
from ..files.lora import LoraLayer

MODES = ("subspace", "subspace+null", "direct")
DEFAULT_MODE = "subspace"
NULL_RTOL = 1e-6


def check_mode(mode: str):
    if mode not in MODES:
        raise TransferOptionError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def embed_down(down: torch.Tensor, width: int) -> torch.Tensor:
    """``[k, n]`` -> ``[k, width]``: the source columns first (CLIP-L slot), zeros after."""
    k, n = down.shape
    if n == width:
        return down
    if n > width:
        raise ValueError(f"cannot embed a {n}-wide input into {width}")
    return torch.cat([down, down.new_zeros(k, width - n)], dim=1)


def _factors(layer: LoraLayer, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    up = layer.up.float().reshape(layer.up.shape[0], -1)
    return up, embed_down(layer.down.float().reshape(layer.down.shape[0], -1), width)


def _left(u: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """P_U x (identity for a full side)."""
    return x if u is None else u @ (u.T @ x)


def _right(x: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """x P_V."""
    return x if v is None else (x @ v) @ v.T


def _embedded_v(basis: Basis, width: int) -> torch.Tensor | None:
    """A source V basis in the target's input space (rows 0..n-1); identity stays a slot projector."""
    n = basis.shape[1]
    if n == width:
        return basis.v
    v = basis.v if basis.v is not None else torch.eye(n)
    return torch.cat([v, v.new_zeros(width - n, v.shape[1])], dim=0)


def energy_fraction(original: LoraLayer, result: LoraLayer) -> float:
    total = original.energy()
    return result.energy() / total if total > 0 else 0.0


def projected_energy(layer: LoraLayer, basis: Basis) -> float:
    """Fraction of ``||ΔW||^2`` that ``subspace`` projection onto ``basis`` keeps, from k x k products only."""
    up, down = _factors(layer, basis.shape[1])
    x = up if basis.u is None else basis.u.T @ up          # [r, k]
    y = down if basis.v is None else down @ basis.v        # [k, r]
    kept = float(torch.sum((x.T @ x).double() * (y @ y.T).double()))
    total = float(torch.sum((up.T @ up).double() * (down @ down.T).double()))
    return kept / total if total > 0 else 0.0


def project_subspace(layer: LoraLayer, target: Basis, target_shape) -> LoraLayer:
    """``P_Ut ΔW P_Vt`` as factors of the same rank and alpha."""
    up, down = _factors(layer, target.shape[1])
    return LoraLayer(_left(target.u, up), _right(down, target.v), layer.alpha, tuple(target_shape))


def _complement_left(u, x):
    return x - _left(u, x)


def _complement_right(x, v):
    return x - _right(x, v)


def project_null(layer: LoraLayer, source: Basis, target: Basis, target_shape) -> LoraLayer:
    """``P_Ut ΔW_in P_Vt + (I-P_Ut)(ΔW - ΔW_in)(I-P_Vt)`` with ``ΔW_in = P_Us ΔW P_Vs``, re-compressed."""
    width = target.shape[1]
    up, down = _factors(layer, width)
    b1 = _left(source.u, up)
    a1 = _right(down, _embedded_v(source, width))
    ups = [_left(target.u, b1), _complement_left(target.u, up), -_complement_left(target.u, b1)]
    downs = [_right(a1, target.v), _complement_right(down, target.v), _complement_right(a1, target.v)]
    combined = LoraLayer(layer.scale * torch.cat(ups, dim=1), torch.cat(downs, dim=0), 3 * layer.rank,
                         tuple(target_shape))
    return compress(combined, rtol=NULL_RTOL)[0]


def project_direct(layer: LoraLayer, target_shape) -> LoraLayer:
    """The same ΔW, reshaped to the target weight (a 1x1 conv and a linear layer share the matrix)."""
    return LoraLayer(layer.up.float().reshape(layer.up.shape[0], -1),
                     layer.down.float().reshape(layer.down.shape[0], -1), layer.alpha, tuple(target_shape))


def compress(layer: LoraLayer, max_rank: int | None = None, rtol: float = 0.0) -> tuple[LoraLayer, float]:
    """Truncated SVD of ``ΔW`` computed on the factors: QR of up and of down^T, SVD of the small core.

    Keeps singular values above ``rtol * s_max`` and at most ``max_rank`` of them; the scale is folded
    into up and alpha set to the new rank. Returns the layer and the fraction of energy it keeps.
    """
    up = layer.up.double().reshape(layer.up.shape[0], -1)
    down = layer.down.double().reshape(layer.down.shape[0], -1)
    qb, rb = torch.linalg.qr(up)
    qa, ra = torch.linalg.qr(down.T)
    uc, sc, vch = torch.linalg.svd(layer.scale * (rb @ ra.T))
    keep = int((sc > rtol * sc[0]).sum()) if float(sc[0]) > 0 else 1
    if max_rank is not None:
        keep = min(keep, max_rank)
    keep = max(keep, 1)
    total = float(torch.sum(sc ** 2))
    kept = float(torch.sum(sc[:keep] ** 2)) / total if total > 0 else 1.0
    new_up = (qb @ uc[:, :keep]) * sc[:keep]
    new_down = vch[:keep] @ qa.T
    return LoraLayer(new_up.float(), new_down.float(), float(keep), layer.weight_shape), kept


def combine(parts: list[tuple[LoraLayer, float]], weight_shape) -> LoraLayer:
    """Sum of several updates of one target weight (each with a strength): factors concatenated.

    A single update keeps its alpha (strength multiplies up); several fold their scales into up and take
    alpha = total rank, so ``ΔW = Σ strength_i s_i B_i A_i``.
    """
    if len(parts) == 1:
        layer, strength = parts[0]
        up = layer.up if strength == 1.0 else layer.up * strength
        return LoraLayer(up, layer.down, layer.alpha, tuple(weight_shape))
    ups = [layer.up.float() * (layer.scale * strength) for layer, strength in parts]
    downs = [layer.down.float() for layer, _ in parts]
    up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    return LoraLayer(up, down, float(down.shape[0]), tuple(weight_shape))
