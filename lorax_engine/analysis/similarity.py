"""Subspace similarity of two layers (METHOD.md §1) with chance normalisation, and its content-keyed cache.

For one side (U or V) of a source layer s and a target layer t, with orthonormal bases ``X_s [d, r_s]``
and ``X_t [d, r_t]``::

    phi    = ||X_s^T X_t||_F^2 / min(r_s, r_t)        mean squared cosine of the principal angles, in [0, 1]
    chance = max(r_s, r_t) / d                       E[phi] for independent random subspaces
    phi^   = (phi - chance) / (1 - chance)           0 = chance, 1 = same subspace

With ``r_s = r_t = r`` these are METHOD's ``||U_s^T U_t||^2 / r`` and ``r / m``; the min/max form covers
bases of different ranks (a 768-wide source side of rank 768 against a 2048-wide target of rank 320).
The layer score is ``min(phi^_U, phi^_V)``.

Full-dimensional side (our definition): when ``max(r_s, r_t) = d`` one basis spans the whole space, so
phi = 1 and chance = 1 whatever the weights are. Such a side cannot tell candidates apart and its
projector is the identity (it loses nothing), so its normalised score is defined as 1.0 and flagged
``informative = False``; the layer score then rests on the other side, and is 1.0 when both are full.

Different input widths (METHOD §3): a source V side of width ``d_s`` smaller than the target's ``d_t``
(SD1.5 cross-attention k/v read 768, SDXL's 2048) is embedded into rows ``0 .. d_s-1`` (the CLIP-L slot)
and normalised within the slot. With ``M`` the slot rows of the target basis (``X_t[:d_s]``), a random
``r_s``-dim source subspace of the slot scores ``r_s ||M||^2 / (d_s k)`` (chance, ``k = min(r_s, r_t)``) and the
best possible one ``(top-r_s energy of M) / k`` (ceiling), so ``phi^ = (phi - chance) / (ceiling - chance)``;
the *slot share* ``||M||^2 / r_t`` says how much of the target's input subspace reads the slot at all. A
target that does not read the slot (share 0) scores 0 there. Caveat: SD1.5 conditions on CLIP-L's last
layer and SDXL on its penultimate one, so the slot matches in meaning only approximately.

A pair is *unscored* when neither side is informative (rank >= both widths): every candidate would score 1,
so the score says nothing and is flagged, never reported as "perfect". A pair is *identical* when the two
weights are equal after casting both to the lower of their precisions (:func:`identical_after_cast`; SD1.5's
fp32 CLIP-L vs SDXL's fp16 copy): both sides then score exactly 1 (METHOD §1's anchor).

Estimates (METHOD §2b). ``estimate`` marks scores computed from screening sketches (subspaces.py), not exact
subspaces; such a score comes with ``hi``, the most the exact score can be, from a measured envelope, per side: a
sketch's normalised score is at least the exact one shrunk toward 0 (chance) by ``SKETCH_SHRINK_MIN``
(``SKETCH_SHRINK_MIN_LOW`` where the exact score is at most ``LOW_SCORE``), less ``SKETCH_NOISE_SDS`` standard
deviations of chance-level scores, ``sqrt(2) / d`` (measured: 0.0022 at d = 640, 0.0011 at 1280; a sketch's score of
an unrelated pair strayed from the exact one by 1.1 of them on average, 2.3 at most). Shrinking is what an
unconverged sketch does on a slow spectrum: its top-r subspace mixes directions around index r, and whatever
relation two weights have is diluted (same-subspace pairs on i^-0.2 spectra scored 0.35-0.5 instead of 1). Only the
upper bound is used, to rule pairs out: a lower bound does not hold (where a pair's relation is built from swapped
directions, as in lorax_zoo.pairs' partial overlaps, a sketch can score it above the exact value), so whatever may
pass a threshold or lead a block is scored exactly. The bound is not a model fitted to a few cases:
tests/test_screening.py checks it on every pair kind of lorax_zoo.pairs (identical, same subspaces, partial overlaps
from anti-correlated to 0.9, fine-tunes at drifts 0.03 .. 1, unrelated), spectra i^-0.2 .. i^-1 at condition numbers
1e2 .. 1e4, 640 and 1280 square, 640 x 2560, 5120 x 640 and the k/v slot, with bfloat16 and float32 sketches (one
power iteration, 96 extra columns). The smallest shrink factor a pair needed was 0.165, for same subspaces whose
target bulk is i^-0.1, flatter than METHOD's slowest (1280 x 1280, cond 1e4); within METHOD's range 0.25 (i^-0.2,
cond 1e4, a 0.9 partial overlap, exact 0.86), and 0.30 among pairs whose exact score is at most 0.35 (the same
spectrum, overlap 0.45, exact 0.26). The low piece's 0.25 keeps a margin below that 0.30, and is what lets the
threshold rule out an unrelated 640-wide pair (bound 0.035 < 0.05) where 0.15 alone would not (0.059).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import write_text_atomic
from .subspaces import Basis, Spectrum

SKETCH_SHRINK_MIN = 0.15    # smallest factor a sketch's normalised score is shrunk toward chance by (see above)
SKETCH_SHRINK_MIN_LOW = 0.25    # ... among pairs whose exact score is at most LOW_SCORE
LOW_SCORE = 0.35
SKETCH_NOISE_SDS = 4.0      # chance-level standard deviations a sketch's score may stray beyond the shrinking


@dataclass(frozen=True)
class SideScore:
    phi: float
    chance: float
    normalised: float
    informative: bool = True
    slot_share: float | None = None       # embedded sides only: share of the target subspace in the slot


@dataclass(frozen=True)
class LayerSimilarity:
    u: SideScore
    v: SideScore
    identical: bool = False               # equal weights after casting to the lower precision
    estimate: bool = False                # from screening sketches that approximate the subspaces
    hi: float | None = None               # estimates: the exact score is at most this (module docstring)
    soft: tuple[float, float] | None = None   # projected pairs: the soft subspaces' overlaps per side (METHOD §2c)

    @property
    def score(self) -> float:
        return min(self.u.normalised, self.v.normalised)

    @property
    def upper(self) -> float:
        """What the exact score is at most: the score itself unless this is an estimate."""
        return self.hi if self.estimate else self.score

    @property
    def unscored(self) -> bool:
        """Neither side can tell candidates apart (rank >= both widths): the score is not evidence."""
        return not (self.u.informative or self.v.informative)

    def as_list(self) -> list:
        return [*_side_list(self.u), *_side_list(self.v), self.identical, self.estimate, self.hi,
                None if self.soft is None else list(self.soft)]

    @classmethod
    def from_list(cls, x) -> LayerSimilarity:
        estimate = bool(x[11])
        soft = None if x[13] is None else (float(x[13][0]), float(x[13][1]))
        return cls(_side(x[0:5]), _side(x[5:10]), bool(x[10]), estimate, float(x[12]) if estimate else None, soft)


def _side_list(side: SideScore) -> list:
    return [side.phi, side.chance, side.normalised, side.informative, side.slot_share]


def _side(x) -> SideScore:
    return SideScore(float(x[0]), float(x[1]), float(x[2]), bool(x[3]), None if x[4] is None else float(x[4]))


FULL_SIDE = SideScore(1.0, 1.0, 1.0, False)
_EMPTY_SLOT = 1e-9        # a target basis with less than this in the source's slot does not read it


def _slot_side(xs: torch.Tensor | None, xt: torch.Tensor | None, dim_s: int, dim_t: int) -> SideScore:
    """phi, chance and phi^ of a source side embedded in the first ``dim_s`` coordinates (METHOD §3)."""
    r_s = dim_s if xs is None else int(xs.shape[1])
    r_t = dim_t if xt is None else int(xt.shape[1])
    k = min(r_s, r_t)
    if xt is None:      # the whole target side: the slot is the first dim_s coordinates, on the source's device
        slot = torch.eye(dim_t, dtype=torch.float64, device=xs.device if xs is not None else "cpu")[:dim_s]
    else:
        slot = xt[:dim_s].double()
    slot_energy = float(torch.sum(slot ** 2))
    share = slot_energy / r_t
    overlap = slot_energy if xs is None else float(torch.sum((xs.double().T @ slot) ** 2))
    phi = min(max(overlap / k, 0.0), 1.0)
    chance = r_s * slot_energy / (dim_s * k)
    if r_s >= min(slot.shape):
        ceiling = slot_energy / k
    else:
        ceiling = float(torch.sum(torch.linalg.svdvals(slot)[:r_s] ** 2)) / k
    if slot_energy < _EMPTY_SLOT:
        return SideScore(phi, chance, 0.0, False, share)
    if ceiling - chance <= 1e-12:       # the source spans the whole slot: every candidate is alike
        return SideScore(phi, chance, 1.0, False, share)
    return SideScore(phi, chance, (phi - chance) / (ceiling - chance), True, share)


def side_similarity(xs: torch.Tensor | None, xt: torch.Tensor | None, dim_s: int, dim_t: int) -> SideScore:
    """phi, chance and phi^ of one side. ``None`` stands for the identity (a basis of the whole space).

    ``dim_s < dim_t`` embeds the source basis into the first ``dim_s`` coordinates of the target space and
    normalises within that slot. The ``r x r`` product runs in the bases' dtype (see :meth:`Basis.to`); its
    squares sum in float64.
    """
    if dim_s > dim_t:
        raise ValueError(f"source side is wider ({dim_s}) than the target side ({dim_t})")
    if xs is not None and xt is not None and xs.device != xt.device:
        xs = xs.to(xt.device)
    if dim_s < dim_t:
        return _slot_side(xs, xt, dim_s, dim_t)
    r_s = dim_s if xs is None else int(xs.shape[1])
    r_t = dim_t if xt is None else int(xt.shape[1])
    chance = max(r_s, r_t) / dim_t
    if chance >= 1.0:
        return FULL_SIDE
    overlap = float(torch.sum((xs.T @ xt).double() ** 2))
    phi = min(max(overlap / min(r_s, r_t), 0.0), 1.0)
    return SideScore(phi, chance, (phi - chance) / (1.0 - chance))


def side_upper_bound(side: SideScore, dim: int) -> float:
    """What the exact normalised score of a side is at most, given a sketch's (module docstring)."""
    if not side.informative:
        return side.normalised
    up = side.normalised + SKETCH_NOISE_SDS * 2 ** 0.5 / dim
    if up <= 0:
        return up
    # Either the exact score is at most LOW_SCORE, and then at most up / SKETCH_SHRINK_MIN_LOW, or it is above it,
    # which the sketch allows only where up / SKETCH_SHRINK_MIN exceeds LOW_SCORE.
    if up / SKETCH_SHRINK_MIN > LOW_SCORE:
        return min(up / SKETCH_SHRINK_MIN, 1.0)
    return min(up / SKETCH_SHRINK_MIN_LOW, LOW_SCORE)


def screening_floor(source_shape: tuple[int, int], rank: int) -> float:
    """The upper bound a screening estimate leaves a pair with an ``[m, n]`` source weight whose sketches score at
    chance (normalised 0 on both sides), by the envelope above: 0.018 at 1280 wide, 0.035 at 640 (r = 320). A
    decision that needs the exact score below this is not to be settled by screening the pair (only a sketch scoring
    4 standard deviations below chance leaves less). A side that r covers whole tells nothing (1)."""
    return min(side_upper_bound(SideScore(0.0, 0.0, 0.0), dim) if rank < dim else 1.0 for dim in source_shape)


def layer_similarity(source: Basis, target: Basis) -> LayerSimilarity:
    """Similarity of a source and a target layer from their top-r bases (output widths must agree); with an
    estimate among them, the upper bound of the exact score too."""
    if isinstance(source, Spectrum) or isinstance(target, Spectrum):
        raise TypeError("layer_similarity compares top-r bases: take Spectrum.top(rank) first")
    (ms, ns), (mt, nt) = source.shape, target.shape
    if ms != mt:
        raise ValueError(f"output widths differ: {ms} vs {mt}")
    u, v = side_similarity(source.u, target.u, ms, mt), side_similarity(source.v, target.v, ns, nt)
    if not (source.estimate or target.estimate):
        return LayerSimilarity(u, v)
    return LayerSimilarity(u, v, estimate=True, hi=min(side_upper_bound(u, ms), side_upper_bound(v, ns)))


def identical_pair_similarity(shape: tuple[int, int], rank: int) -> LayerSimilarity:
    """The similarity of a weight with itself at rank r, without bases: every side scores exactly 1; a side that
    r covers whole is uninformative, as :func:`side_similarity` has it."""
    def side(dim):
        chance = min(rank, min(shape)) / dim
        return FULL_SIDE if chance >= 1.0 else SideScore(1.0, chance, 1.0)

    return LayerSimilarity(side(shape[0]), side(shape[1]), identical=True)


def identical_after_cast(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two weights are equal after casting both to the lower of their precisions.

    Storage dtypes are not reliable once a model is loaded (ComfyUI upcasts fp16 weights to fp32 on a CPU),
    so precision is read from the values: they are compared in float16 or bfloat16 when either weight is exactly
    representable there (SD1.5's fp32 CLIP-L against SDXL's fp16 copy of it), else as they are.
    """
    if a.shape != b.shape:
        return False
    if a.device != b.device:
        b = b.to(a.device)
    for dtype in (torch.float16, torch.bfloat16):
        # a bfloat16 weight may also fit float16 exactly: the copy must round to it in one of them
        if (_exact_in(a, dtype) or _exact_in(b, dtype)) and torch.equal(a.to(dtype), b.to(dtype)):
            return True
    return torch.equal(a.float(), b.float())


def _exact_in(t: torch.Tensor, dtype: torch.dtype) -> bool:
    if t.dtype == dtype:
        return True
    return torch.equal(t.to(dtype).to(t.dtype), t)


def _checksum(pairs: dict) -> str:
    """sha256 of a pair file's scores: altered numbers that still parse are not believed."""
    return hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest()


class PairStore:
    """Layer similarities by content: ``(source fingerprint, target fingerprint, spec)`` -> LayerSimilarity.

    Kept in memory and, with a directory, in one small JSON file per source weight and spec, so a warm
    run skips the ``r x r`` products (about 1 TFLOP for a full SD1.5 -> SDXL map). Files are rewritten
    atomically; an unreadable file is ignored (and replaced on the next write).
    """

    VERSION = 4     # 3: estimates carry the upper bound of the exact score; 4: projected pairs their soft overlaps

    def __init__(self, directory: Path | None):
        self.directory = Path(directory) / "pairs" if directory is not None else None
        self._files: dict[str, dict[str, list]] = {}
        self._dirty: set[str] = set()

    def _file_id(self, source_fp: str, spec: str) -> str:
        return hashlib.sha256(f"v{self.VERSION}|{source_fp}|{spec}".encode()).hexdigest()[:40]

    def _pairs(self, fid: str) -> dict[str, list]:
        pairs = self._files.get(fid)
        if pairs is None:
            pairs = {}
            if self.directory is not None:
                try:
                    data = json.loads((self.directory / fid[:2] / f"{fid}.json").read_text())
                    if (data.get("id") == fid and isinstance(data.get("pairs"), dict)
                            and data.get("checksum") == _checksum(data["pairs"])):
                        pairs = data["pairs"]
                except (OSError, ValueError, AttributeError, RecursionError):
                    pass
            self._files[fid] = pairs
        return pairs

    def get(self, source_fp: str, target_fp: str, spec: str) -> LayerSimilarity | None:
        row = self._pairs(self._file_id(source_fp, spec)).get(target_fp)
        if row is None:
            return None
        try:
            return LayerSimilarity.from_list(row)
        except (TypeError, ValueError, IndexError):
            return None

    def put(self, source_fp: str, target_fp: str, spec: str, sim: LayerSimilarity):
        fid = self._file_id(source_fp, spec)
        self._pairs(fid)[target_fp] = sim.as_list()
        self._dirty.add(fid)

    def flush(self):
        if self.directory is None:
            self._dirty.clear()
            return
        for fid in sorted(self._dirty):
            path = self.directory / fid[:2] / f"{fid}.json"
            pairs = self._files[fid]
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(path, json.dumps({"id": fid, "pairs": pairs, "checksum": _checksum(pairs)}))
            except OSError:
                pass    # the store only saves time
        self._dirty.clear()


def similarity_dict(sim: LayerSimilarity) -> dict:
    """Flat JSON-ready fields of a similarity, as the report shows them."""
    return {"phi_u": sim.u.phi, "phi_v": sim.v.phi, "chance_u": sim.u.chance, "chance_v": sim.v.chance,
            "score_u": sim.u.normalised, "score_v": sim.v.normalised,
            "informative_u": sim.u.informative, "informative_v": sim.v.informative, "score": sim.score,
            "slot_share_v": sim.v.slot_share, "identical": sim.identical, "unscored": sim.unscored,
            "estimate": sim.estimate, "score_upper_bound": sim.upper}
