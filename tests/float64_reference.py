"""Independent float64 reference of the transfer (METHOD §1-§3), for tests and the bench: exact SVDs of both
weights, the chance-normalised scores written out, and the side-wise operator formed as dense matrices. Nothing
here calls the engine."""
from __future__ import annotations

import hashlib

import torch

_TOPS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def top_subspaces(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float64 top-r singular subspaces ``(U_r, V_r)`` (memoised by content: callers reuse weights)."""
    w = w.detach().double().contiguous()
    key = hashlib.sha256(w.numpy().tobytes()).hexdigest() + f"|{tuple(w.shape)}|{r}"
    if key not in _TOPS:
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        _TOPS[key] = (u[:, :r], vh[:r].T)
    return _TOPS[key]


def normalised_score(xs: torch.Tensor, xt: torch.Tensor) -> float:
    """phi^ of one side; a narrower source side sits in the first rows and is normalised in that slot (§3)."""
    d_s, r = xs.shape
    if d_s == xt.shape[0]:
        phi, chance = float((xs.T @ xt).norm() ** 2) / r, r / d_s
        return (phi - chance) / (1 - chance)
    slot = xt[:d_s]
    phi = float((xs.T @ slot).norm() ** 2) / r
    chance = float(slot.norm() ** 2) / d_s
    ceiling = float((torch.linalg.svdvals(slot)[:r] ** 2).sum()) / r
    return (phi - chance) / (ceiling - chance)


def reference_transfer(mode: str, ws: torch.Tensor, wt: torch.Tensor, delta: torch.Tensor, identical: bool,
                       r: int) -> tuple[float, torch.Tensor]:
    """(layer score, ΔW') of one pair in ``mode`` ("auto", "subspace", "subspace+null"), dense float64."""
    us, vs = top_subspaces(ws, r)
    ut, vt = top_subspaces(wt, r)
    d_s, d_t = ws.shape[1], wt.shape[1]
    score_u, score_v = normalised_score(us, ut), normalised_score(vs, vt)
    if identical:
        score_u = score_v = 1.0
    emb = torch.zeros(delta.shape[0], d_t, dtype=torch.float64)
    emb[:, :d_s] = delta
    vs_emb = torch.zeros(d_t, vs.shape[1], dtype=torch.float64)
    vs_emb[:d_s] = vs
    pus, pvs, put, pvt = us @ us.T, vs_emb @ vs_emb.T, ut @ ut.T, vt @ vt.T
    if mode == "subspace":
        return min(score_u, score_v), put @ emb @ pvt
    if identical:
        return 1.0, emb
    w_u, w_v = (1.0, 1.0) if mode == "subspace+null" else (min(max(score_u, 0), 1), min(max(score_v, 0), 1))
    eye_m, eye_n = torch.eye(delta.shape[0], dtype=torch.float64), torch.eye(d_t, dtype=torch.float64)
    t_u = put @ pus + w_u * (eye_m - put) @ (eye_m - pus)
    t_v = pvt @ pvs + w_v * (eye_n - pvt) @ (eye_n - pvs)
    return min(score_u, score_v), t_u @ emb @ t_v.T


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm()) if float(b.norm()) > 0 else float(a.norm())
