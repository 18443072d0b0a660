"""Transfer operators on LoRA factors (METHOD.md §2, §2c, §3): never an ``m x n`` matrix, rank and alpha kept.

For ``ΔW = s B A`` (``B`` = up ``[m, k]``, ``A`` = down ``[k, n]``, ``s = alpha / k``), each side of the weight gets
an operator ``T`` and ``B' = T_U B``, ``A' = A T_V^T``.

Modes (:data:`MODES`):

* ``subspace``: the paper's Eq. 3, literally: ``T = P_t``, the projector onto the target's top-r singular
  subspace (hard, :class:`~lorax_engine.analysis.subspaces.Basis`; a full side is the identity).
* ``auto`` (default) and ``subspace+null``: the soft side-wise operator (ours; METHOD §2c)::

      T = S_t S_s + w C_t C_s,   S = X sin(theta) X^T,   C = X cos(theta) X^T + (I - X X^T)

  with ``X`` all singular vectors of a side and ``theta = theta(sigma)`` rising smoothly from 0 to pi/2 across a
  knee around ``sigma_r``. Equal weights and ``w = 1`` give ``S^2 + C^2 = I``: the identity. ``theta`` is Lipschitz
  in ``sigma`` and the singular values are Lipschitz in the weight, so ``T`` moves by O(eps) when the target
  drifts by eps, whatever the gaps of the spectrum; hard top-r projectors move first order in principal angles
  that, on the slow spectra of trained weights (tiny gaps at index r), swing far for a 1% drift (METHOD §2c).
  ``subspace+null`` uses ``w = 1`` on both sides (after ProLoRA, arXiv 2506.04244: the part outside the source's
  principal subspace travels into the target's complement). ``auto`` uses per side
  ``w = 1 - (1 - clamp(phi^_soft, 0, 1))^2`` where ``phi^_soft`` is the soft subspaces' own chance-normalised
  overlap (:func:`soft_overlap`): ``(tr(S_s^2 S_t^2) - chance) / (||S_s^2|| ||S_t^2|| - chance)``, chance
  ``= tr(S_s^2) tr(S_t^2) / dim`` (the mean over random rotations). At chance w ~ 0, so an unrelated target
  keeps only ``S_t S_s``'s share, less than Eq. 3 keeps (no disguised direct copy); for a fine-tune
  ``phi^_soft`` is a cosine of the soft subspaces, 1 - O(eps^2), and the square makes the deficit of w of
  fourth order, so the complement part of an update is not cut by a small drift.
* ``direct`` (baseline, labelled as such): ΔW copied unchanged where the target weight of the same name has the
  same matrix shape, which is what a stock loader does with an SD1.5 LoRA on SDXL.

The knee (:data:`KNEE`): ``theta = pi/2 * smoothstep(x)``, ``x = (log(sigma / sigma_r) + log K) / (2 log K)``,
so 0 at ``sigma_r / K``, pi/4 at ``sigma_r``, pi/2 at ``K sigma_r``; ``K = 5``. r keeps its meaning as the knee's
centre. Why 5, measured against float64 references (640 and 1280 square, 640 x 2560, 5120 x 640, spectra
i^-0.2 .. i^-0.5 with and without four leading directions lifted to 10x, and 1/i; generic rank-16 update; target
``W + E`` with E half rank-8, half dense): a knee in log sigma is scale-free (singular values move
relative to their size), and at K = 5 the largest change at eps = 0.03 was 0.034 on slow spectra (bound 0.095)
and 0.061 on 1/i (bound 0.15), while an unrelated target kept 20-60% of what Eq. 3 keeps; METHOD's linear
knee (0.1..1.9 sigma_r) changed the same updates by up to 0.12 (1/i, 640 wide) and K = 8 bought little more
continuity for more leakage. A LoRA-X adapter (inside the source's top-r) changed by 0.03 at eps = 0.03 where
Eq. 3 changed it by 0.3-0.4.

Side conventions. A side of rank ``r >= dim`` is the whole space: ``S = I``, ``C = 0``, so ``T = I`` there (a
full hard projector loses nothing, nor does this). The longer side of a rectangular weight has ``d < dim``
singular vectors; beyond them sigma = 0: ``S = 0``, ``C = I``. Inputs narrower than the target (cross-attention
k/v, §3) are embedded first: ``A [k, 768]`` becomes ``[A | 0]`` of width 2048 (the CLIP-L slot); the source's
``S`` and ``C`` act on the slot, ``phi^_soft`` is taken within it.

Identity axiom: where the target weight equals the source weight after casting both to the lower precision, the
caller passes the layer through unchanged in ``auto`` and ``subspace+null`` (:func:`passes_through`): the
operators would give the same up to rounding, the pass-through gives it exactly.

Energy kept = ``||ΔW'||_F^2 / ||ΔW||_F^2`` and the change against a direct copy ``||ΔW' - ΔW||_F / ||ΔW||_F``, from
``k x k`` products of the factors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..analysis.subspaces import Basis, Spectrum
from ..errors import TransferOptionError
from ..files.lora import LoraLayer

MODES = ("auto", "subspace", "subspace+null", "direct")
DEFAULT_MODE = "auto"
SIDEWISE_MODES = frozenset({"auto", "subspace+null"})   # the soft side-wise operator's modes
MODE_HELP = {
    "auto": "similarity-weighted (default): the identity on identical layers, nearly so on fine-tunes of the "
            "source, a projection into the target's principal subspaces on unrelated ones",
    "subspace": "the paper's Eq. 3 literally: only the part inside the target's top-r subspaces survives",
    "subspace+null": "soft side-wise with w = 1: the part outside the source's principal subspaces travels into "
                     "the target's complement too",
    "direct": "baseline: copied unchanged where the shapes agree (what a stock loader does), no projection",
}
KNEE = 5.0      # the knee of the soft subspaces spans sigma_r / KNEE .. KNEE * sigma_r (module docstring)


def check_mode(mode: str):
    if mode not in MODES:
        raise TransferOptionError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


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


# --------------------------------------------------------------------------------------------- soft subspaces

def knee_angles(s: torch.Tensor, rank: int) -> torch.Tensor:
    """``theta(sigma)`` of every singular value (descending ``s``) for a knee centred on ``sigma_r``; with
    ``rank >= len(s)`` (or ``sigma_r`` numerically 0) every direction of nonzero sigma is fully inside."""
    s = s.double()
    tiny = float(s[0]) * 1e-12 if s.numel() else 0.0
    if rank >= s.numel() or float(s[rank - 1]) <= tiny:
        return torch.where(s > tiny, math.pi / 2, 0.0).to(torch.float64)
    x = (torch.log(s.clamp_min(tiny) / s[rank - 1]) + math.log(KNEE)) / (2 * math.log(KNEE))
    x = x.clamp(0, 1)
    return (math.pi / 2) * x * x * (3 - 2 * x)


@dataclass
class SoftSide:
    """One side of a weight's soft subspace: ``S y = X (sin theta * X^T y)``, ``C y = y - X ((1 - cos theta) *
    X^T y)``, with ``X [dim, k]`` the singular vectors of that side whose ``theta`` is not 0."""

    x: torch.Tensor
    sin: torch.Tensor
    one_minus_cos: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.x.shape[0])

    def s(self, y: torch.Tensor) -> torch.Tensor:
        return self.x @ (self.sin[:, None] * (self.x.T @ y))

    def c(self, y: torch.Tensor) -> torch.Tensor:
        return y - self.x @ (self.one_minus_cos[:, None] * (self.x.T @ y))


def soft_sides(spectrum: Spectrum, rank: int, device=None) -> tuple[SoftSide, SoftSide]:
    """The soft subspaces ``(U side, V side)`` of a weight at knee centre ``rank``, on ``device``."""
    theta = knee_angles(spectrum.s.cpu(), rank)
    keep = (theta > 0).nonzero().flatten()        # indices picked on the host: no device sync, nothing data-dependent
    sin, omc = torch.sin(theta[keep]).float(), (1 - torch.cos(theta[keep])).float()
    device = device if device is not None else spectrum.u.device

    def side(x):
        return SoftSide(x.index_select(1, keep.to(x.device)).to(device), sin.to(device), omc.to(device))

    return side(spectrum.u), side(spectrum.v)


def soft_overlap(source: SoftSide, target: SoftSide) -> float:
    """``phi^_soft`` of one side (module docstring); a narrower source side is compared within the target's first
    ``source.dim`` coordinates (the slot). 1.0 where no rotation could change it (e.g. a full side)."""
    a, b = source.sin.double() ** 2, target.sin.double() ** 2
    xt = target.x[:source.dim]
    omega = float((a[:, None] * (source.x.T @ xt).double().square() * b[None, :]).sum())
    if target.dim == source.dim:
        trace_t, norm_t = float(b.sum()), float(torch.linalg.vector_norm(b))
    else:                                               # the target's soft subspace cut to the slot
        gram = (xt.T @ xt).double()
        trace_t = float((b * gram.diagonal()).sum())
        norm_t = float((b[:, None] * gram.square() * b[None, :]).sum().sqrt())
    top = float(torch.linalg.vector_norm(a)) * norm_t
    chance = float(a.sum()) * trace_t / source.dim
    if top - chance <= 1e-12 * max(top, 1e-300):
        return 1.0
    return (omega - chance) / (top - chance)


def side_weight(overlap: float) -> float:
    """``w = 1 - (1 - clamp(phi^_soft, 0, 1))^2`` (module docstring)."""
    return 1.0 - (1.0 - min(max(overlap, 0.0), 1.0)) ** 2


def soft_overlaps(source: Spectrum, target: Spectrum, rank: int, device=None) -> tuple[float, float]:
    """``(phi^_soft U, phi^_soft V)`` of a pair (module docstring), computed on ``device`` (default: where the spectra
    are). They depend on the weights and r only: the transfer keeps them with the pair's exact score."""
    (su, sv), (tu, tv) = soft_sides(source, rank, device), soft_sides(target, rank, device)
    return soft_overlap(su, tu), soft_overlap(sv, tv)


def soft_weights(mode: str, overlaps: tuple[float, float]) -> tuple[float, float]:
    """``(w_U, w_V)`` of ``mode``'s soft side-wise operator from the pair's soft overlaps."""
    if mode == "subspace+null":
        return 1.0, 1.0
    return side_weight(overlaps[0]), side_weight(overlaps[1])


def project_soft(layer: LoraLayer, source: Spectrum, target: Spectrum, rank: int, target_shape, w_u: float,
                 w_v: float) -> LoraLayer:
    """``T_U ΔW T_V^T`` with the soft side-wise operator at knee centre ``rank`` and side weights ``w_U, w_V``
    (:func:`soft_weights`), as factors of the same rank and alpha, on the LoRA's device."""
    width = target.shape[1]
    up, down = _factors(layer, width)
    su, sv = soft_sides(source, rank, up.device)
    tu, tv = soft_sides(target, rank, up.device)
    new_up = tu.s(su.s(up)) + w_u * tu.c(su.c(up))
    at = down.T                         # [width, k]; rows past the source's own width are the embedding's zeros
    n = sv.dim
    s_part = torch.cat([sv.s(at[:n]), at[n:]], dim=0)
    c_part = torch.cat([sv.c(at[:n]), at[n:]], dim=0)
    new_down = (tv.s(s_part) + w_v * tv.c(c_part)).T
    return LoraLayer(new_up, new_down.contiguous(), layer.alpha, tuple(target_shape))


# --------------------------------------------------------------------------------------------- measures

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
