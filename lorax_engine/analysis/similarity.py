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
with zeros elsewhere, and compared in the target's space. Caveat: SD1.5 conditions on CLIP-L's last layer
and SDXL on its penultimate one, so the slot matches in meaning only approximately.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import write_text_atomic
from .subspaces import Basis


@dataclass(frozen=True)
class SideScore:
    phi: float
    chance: float
    normalised: float
    informative: bool = True


@dataclass(frozen=True)
class LayerSimilarity:
    u: SideScore
    v: SideScore

    @property
    def score(self) -> float:
        return min(self.u.normalised, self.v.normalised)

    def as_list(self) -> list:
        return [self.u.phi, self.u.chance, self.u.normalised, self.u.informative,
                self.v.phi, self.v.chance, self.v.normalised, self.v.informative]

    @classmethod
    def from_list(cls, x) -> LayerSimilarity:
        return cls(SideScore(float(x[0]), float(x[1]), float(x[2]), bool(x[3])),
                   SideScore(float(x[4]), float(x[5]), float(x[6]), bool(x[7])))


FULL_SIDE = SideScore(1.0, 1.0, 1.0, False)


def side_similarity(xs: torch.Tensor | None, xt: torch.Tensor | None, dim_s: int, dim_t: int) -> SideScore:
    """phi, chance and phi^ of one side. ``None`` stands for the identity (a basis of the whole space).

    ``dim_s < dim_t`` embeds the source basis into the first ``dim_s`` coordinates of the target space.
    The ``r x r`` product runs in the bases' dtype (see :meth:`Basis.to`); its squares sum in float64.
    """
    if dim_s > dim_t:
        raise ValueError(f"source side is wider ({dim_s}) than the target side ({dim_t})")
    r_s = dim_s if xs is None else int(xs.shape[1])
    r_t = dim_t if xt is None else int(xt.shape[1])
    chance = max(r_s, r_t) / dim_t
    if chance >= 1.0:
        return FULL_SIDE
    xt_slot = xt[:dim_s]                      # target coordinates inside the source's slot
    if xs is None:
        overlap = float(torch.sum(xt_slot.double() ** 2))
    else:
        overlap = float(torch.sum((xs.T @ xt_slot).double() ** 2))
    phi = min(max(overlap / min(r_s, r_t), 0.0), 1.0)
    return SideScore(phi, chance, (phi - chance) / (1.0 - chance))


def layer_similarity(source: Basis, target: Basis) -> LayerSimilarity:
    """Similarity of a source and a target layer from their bases (output widths must agree)."""
    (ms, ns), (mt, nt) = source.shape, target.shape
    if ms != mt:
        raise ValueError(f"output widths differ: {ms} vs {mt}")
    return LayerSimilarity(side_similarity(source.u, target.u, ms, mt), side_similarity(source.v, target.v, ns, nt))


def _checksum(pairs: dict) -> str:
    """sha256 of a pair file's scores: altered numbers that still parse are not believed."""
    return hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest()


class PairStore:
    """Layer similarities by content: ``(source fingerprint, target fingerprint, spec)`` -> LayerSimilarity.

    Kept in memory and, with a directory, in one small JSON file per source weight and spec, so a warm
    run skips the ``r x r`` products (about 1 TFLOP for a full SD1.5 -> SDXL map). Files are rewritten
    atomically; an unreadable file is ignored (and replaced on the next write).
    """

    VERSION = 1

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
            "informative_u": sim.u.informative, "informative_v": sim.v.informative, "score": sim.score}
