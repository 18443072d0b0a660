"""Independent float64 reference of the transfer (METHOD §1-§3, §2c), for tests and the bench: exact SVDs of both
weights, the chance-normalised scores written out, and the transfer operators formed as dense matrices. Nothing
here calls the engine; the soft operator's knee and side weights follow their specification in
lorax_engine/projection/operators.py (a knee in log sigma from sigma_r / 5 to 5 sigma_r, smoothstep;
w = 1 - (1 - clamp(phi^_soft))^2), written out again here."""
from __future__ import annotations

import hashlib
import math

import torch

KNEE = 5.0
_SVDS: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def svd64(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, s, V)`` of a float64 thin SVD (memoised by content: callers reuse weights)."""
    w = w.detach().double().contiguous()
    key = hashlib.sha256(w.numpy().tobytes()).hexdigest() + f"|{tuple(w.shape)}"
    if key not in _SVDS:
        if len(_SVDS) > 16:
            _SVDS.clear()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        _SVDS[key] = (u, s, vh.T)
    return _SVDS[key]


def top_subspaces(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float64 top-r singular subspaces ``(U_r, V_r)``."""
    u, _, v = svd64(w)
    return u[:, :r], v[:, :r]


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


def soft_sides(w: torch.Tensor, r: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Dense ``(S_U, C_U), (S_V, C_V)`` of a weight's soft subspaces at knee centre ``r`` (METHOD §2c)."""
    u, s, v = svd64(w)
    if r >= s.numel():
        theta = torch.where(s > s[0] * 1e-12, math.pi / 2, 0.0).double()
    else:
        x = ((torch.log(s.clamp_min(s[0] * 1e-12) / s[r - 1]) + math.log(KNEE)) / (2 * math.log(KNEE))).clamp(0, 1)
        theta = math.pi / 2 * x * x * (3 - 2 * x)

    def side(x):
        dim = x.shape[0]
        return (x * torch.sin(theta)) @ x.T, torch.eye(dim, dtype=torch.float64) - (x * (1 - torch.cos(theta))) @ x.T

    return side(u), side(v)


def soft_overlap(s_source: torch.Tensor, s_target: torch.Tensor) -> float:
    """phi^_soft of one side: tr(S_s^2 S_t^2) against its mean over random rotations and its Cauchy-Schwarz
    ceiling; a narrower source side compares with the target's slot block."""
    d = s_source.shape[0]
    a, b = s_source @ s_source, (s_target @ s_target)[:d, :d]
    omega, chance = float((a * b).sum()), float(a.trace() * b.trace()) / d
    top = float(a.norm() * b.norm())
    return 1.0 if top - chance <= 1e-12 * top else (omega - chance) / (top - chance)


def soft_transfer(mode: str, ws: torch.Tensor, wt: torch.Tensor, delta: torch.Tensor, r: int
                  ) -> tuple[torch.Tensor, float, float]:
    """``(ΔW', w_U, w_V)`` of the soft side-wise operator, ``T = S_t S_s + w C_t C_s`` per side, dense."""
    (sus, cus), (svs, cvs) = soft_sides(ws, r)
    (sut, cut), (svt, cvt) = soft_sides(wt, r)
    d_s, d_t = ws.shape[1], wt.shape[1]
    emb = torch.zeros(delta.shape[0], d_t, dtype=torch.float64)
    emb[:, :d_s] = delta
    svs_e, cvs_e = torch.zeros(d_t, d_t, dtype=torch.float64), torch.eye(d_t, dtype=torch.float64)
    svs_e[:d_s, :d_s], cvs_e[:d_s, :d_s] = svs, cvs
    if mode == "subspace+null":
        w_u = w_v = 1.0
    else:
        weight = lambda x: 1.0 - (1.0 - min(max(x, 0.0), 1.0)) ** 2  # noqa: E731
        w_u, w_v = weight(soft_overlap(sus, sut)), weight(soft_overlap(svs, svt))
    t_u = sut @ sus + w_u * cut @ cus
    t_v = svt @ svs_e + w_v * cvt @ cvs_e
    return t_u @ emb @ t_v.T, w_u, w_v


def reference_transfer(mode: str, ws: torch.Tensor, wt: torch.Tensor, delta: torch.Tensor, identical: bool,
                       r: int) -> tuple[float, torch.Tensor]:
    """(layer score, ΔW') of one pair in ``mode`` ("auto", "subspace", "subspace+null"), dense float64."""
    us, vs = top_subspaces(ws, r)
    ut, vt = top_subspaces(wt, r)
    score_u, score_v = normalised_score(us, ut), normalised_score(vs, vt)
    if identical:
        score_u = score_v = 1.0
    d_s, d_t = ws.shape[1], wt.shape[1]
    emb = torch.zeros(delta.shape[0], d_t, dtype=torch.float64)
    emb[:, :d_s] = delta
    if mode == "subspace":
        return min(score_u, score_v), ut @ ut.T @ emb @ vt @ vt.T
    if identical:
        return 1.0, emb
    return min(score_u, score_v), soft_transfer(mode, ws, wt, delta, r)[0]


def hard_transfer(ws: torch.Tensor, wt: torch.Tensor, delta: torch.Tensor, r: int) -> torch.Tensor:
    """The side-wise operator with hard top-r projectors and w = clamp(phi^) (the default before METHOD §2c), for
    comparison: ``T = P_t P_s + w (I - P_t)(I - P_s)``."""
    us, vs = top_subspaces(ws, r)
    ut, vt = top_subspaces(wt, r)
    w_u, w_v = (min(max(normalised_score(a, b), 0.0), 1.0) for a, b in ((us, ut), (vs, vt)))
    m, n = delta.shape
    pus, pvs, put, pvt = us @ us.T, vs @ vs.T, ut @ ut.T, vt @ vt.T
    eye_m, eye_n = torch.eye(m, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
    t_u = put @ pus + w_u * (eye_m - put) @ (eye_m - pus)
    t_v = pvt @ pvs + w_v * (eye_n - pvt) @ (eye_n - pvs)
    return t_u @ delta @ t_v.T


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm()) if float(b.norm()) > 0 else float(a.norm())
