"""Transfer operators on LoRA factors (METHOD.md §2, §3): never an ``m x n`` matrix, rank and alpha kept.

For ``ΔW = s B A`` (``B`` = up ``[m, k]``, ``A`` = down ``[k, n]``, ``s = alpha / k``), source projectors
``P_Us, P_Vs`` and target projectors ``P_Ut, P_Vt`` (top-r singular subspaces; a full side is the identity) and
their complements ``P' = I - P``, each side gets the side-wise operator (METHOD §2, ours)::

    T_U = P_Ut P_Us + w_U P_Ut' P_Us'        T_V = P_Vt P_Vs + w_V P_Vt' P_Vs'
    B' = T_U B                               A' = A T_V^T

On factors: ``B1 = P_Us B``, ``B0 = B - B1``, ``B' = P_Ut B1 + w_U (B0 - P_Ut B0)``, and likewise for ``A``.

Modes (:data:`MODES`):

* ``auto`` (default): similarity-weighted, ``w = clamp(phi^, 0, 1)`` per side from the pair's normalised
  scores. Equal to Eq. 3 on LoRA-X adapters (updates inside the source subspace) and near-chance pairs (w ~ 0),
  the identity on identical layers (w = 1, equal projectors), continuous in between.
* ``subspace``: the paper's Eq. 3, literally: ``B' = P_Ut B``, ``A' = A P_Vt`` (no source projector, no w).
* ``subspace+null``: ``w_U = w_V = 1`` (after ProLoRA, arXiv 2506.04244): the update's part outside the source
  subspace travels into the target's complement too.
* ``direct`` (baseline, labelled as such): ΔW copied unchanged where the target weight of the same name has the
  same matrix shape, which is what a stock loader does with an SD1.5 LoRA on SDXL.

Identity axiom: where the target weight equals the source weight after casting both to the lower precision, the
caller passes the layer through unchanged in ``auto`` and ``subspace+null`` (:func:`passes_through`): the
operators would give the same up to rounding, the pass-through gives it exactly.

Inputs narrower than the target (cross-attention k/v, §3) are embedded first: ``A [k, 768]`` becomes ``[A | 0]``
of width 2048 (the CLIP-L slot), and the source V basis likewise. Energy kept = ``||ΔW'||_F^2 / ||ΔW||_F^2``,
from ``k x k`` products of the factors.
"""
from __future__ import annotations

import torch

from ..analysis.similarity import LayerSimilarity
from ..analysis.subspaces import Basis
from ..errors import TransferOptionError
from ..files.lora import LoraLayer

MODES = ("auto", "subspace", "subspace+null", "direct")
DEFAULT_MODE = "auto"
SIDEWISE_MODES = frozenset({"auto", "subspace+null"})   # the modes that use the source subspaces too
MODE_HELP = {
    "auto": "similarity-weighted (default): the paper's Eq. 3 on near-chance pairs, the identity on identical "
            "layers, continuous in between",
    "subspace": "the paper's Eq. 3 literally: only the part inside the target's subspaces survives",
    "subspace+null": "side-wise with w = 1: the part outside the source subspace travels into the target's "
                     "complement too",
    "direct": "baseline: copied unchanged where the shapes agree (what a stock loader does), no projection",
}


def check_mode(mode: str):
    if mode not in MODES:
        raise TransferOptionError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def side_weights(mode: str, sim: LayerSimilarity) -> tuple[float, float]:
    """``(w_U, w_V)`` of the side-wise operator for ``mode`` and the pair's similarity."""
    if mode == "subspace+null":
        return 1.0, 1.0
    clamp = lambda x: min(max(float(x), 0.0), 1.0)  # noqa: E731
    return clamp(sim.u.normalised), clamp(sim.v.normalised)


def passes_through(mode: str, identical: bool) -> bool:
    """Identity axiom (METHOD §2): identical weights keep the update whole in the side-wise modes."""
    return identical and mode in SIDEWISE_MODES


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


def _with(basis_side: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """A basis placed with the factors: bases may live on the CPU (the cache) while the LoRA is on the GPU."""
    return None if basis_side is None else basis_side.to(device=x.device, dtype=x.dtype)


def _left(u: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """P_U x (identity for a full side)."""
    u = _with(u, x)
    return x if u is None else u @ (u.T @ x)


def _right(x: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """x P_V."""
    v = _with(v, x)
    return x if v is None else (x @ v) @ v.T


def _embedded_v(basis: Basis, width: int, device: torch.device) -> torch.Tensor | None:
    """A source V basis in the target's input space (rows 0..n-1); identity stays a slot projector."""
    n = basis.shape[1]
    if n == width:
        return basis.v
    v = basis.v if basis.v is not None else torch.eye(n, device=device)
    return torch.cat([v, v.new_zeros(width - n, v.shape[1])], dim=0)


def energy_fraction(original: LoraLayer, result: LoraLayer) -> float:
    total = original.energy()
    return result.energy() / total if total > 0 else 0.0


def relative_change(original: LoraLayer, result: LoraLayer) -> float:
    """``||ΔW' - ΔW||_F / ||ΔW||_F``: how far the transferred update moved from a direct copy (METHOD §2c, "what
    moved"), the source's input embedded into the target's width first (§3). The difference is itself a low-rank
    product, ``[s' B' | -s B] [A'; A]``, so its norm comes from ``2k x 2k`` products of the factors."""
    up, down = _factors(original, result.down.reshape(result.down.shape[0], -1).shape[1])
    new_up, new_down = _factors(result, down.shape[1])
    diff_up = torch.cat([new_up * result.scale, up.to(new_up.device) * -original.scale], dim=1).double()
    diff_down = torch.cat([new_down, down.to(new_down.device)], dim=0).double()
    moved = float(torch.sum((diff_up.T @ diff_up) * (diff_down @ diff_down.T)).clamp_min(0))
    total = original.energy()
    return (moved / total) ** 0.5 if total > 0 else 0.0


def projected_energy_terms(layer: LoraLayer, basis: Basis) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, total)``: ``||P_U ΔW P_V||^2`` and ``||ΔW||^2`` up to the scale, as 0-d float64 tensors on the
    LoRA's device (the basis is placed there), from k x k products only."""
    up, down = _factors(layer, basis.shape[1])
    u, v = _with(basis.u, up), _with(basis.v, down)
    x = up if u is None else u.T @ up          # [r, k]
    y = down if v is None else down @ v        # [k, r]
    kept = torch.sum((x.T @ x).double() * (y @ y.T).double())
    total = torch.sum((up.T @ up).double() * (down @ down.T).double())
    return kept, total


def projected_energy(layer: LoraLayer, basis: Basis) -> float:
    """Fraction of ``||ΔW||^2`` that ``subspace`` projection onto ``basis`` keeps (only the scalars reach the host)."""
    kept, total = (float(t) for t in projected_energy_terms(layer, basis))
    return kept / total if total > 0 else 0.0


def project_subspace(layer: LoraLayer, target: Basis, target_shape) -> LoraLayer:
    """The paper's Eq. 3: ``P_Ut ΔW P_Vt`` as factors of the same rank and alpha."""
    up, down = _factors(layer, target.shape[1])
    return LoraLayer(_left(target.u, up), _right(down, target.v), layer.alpha, tuple(target_shape))


def project_sidewise(layer: LoraLayer, source: Basis, target: Basis, target_shape, w_u: float,
                     w_v: float) -> LoraLayer:
    """``T_U ΔW T_V^T`` (module docstring) as factors of the same rank and alpha."""
    width = target.shape[1]
    up, down = _factors(layer, width)
    source, target = source.to(up.device), target.to(up.device)   # one copy each, not one per use
    b1 = _left(source.u, up)
    a1 = _right(down, _embedded_v(source, width, up.device))
    new_up, new_down = _left(target.u, b1), _right(a1, target.v)
    if w_u:
        b0 = up - b1
        new_up = new_up + w_u * (b0 - _left(target.u, b0))
    if w_v:
        a0 = down - a1
        new_down = new_down + w_v * (a0 - _right(a0, target.v))
    return LoraLayer(new_up, new_down, layer.alpha, tuple(target_shape))


def pass_through(layer: LoraLayer, target_shape) -> LoraLayer:
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
