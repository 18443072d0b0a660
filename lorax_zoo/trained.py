"""Full-size weights that look trained, fast enough to fill an 860 M - 3.5 B parameter checkpoint on 2 cores.

A 2-D weight (4-D read as ``[m, c*kh*kw]``) is ``R_m Q_m diag(s) Q_n^T R_n^T`` over all ``k = min(m, n)``
directions, with ``s`` from :func:`lorax_zoo.pairs.trained_spectrum`: a bulk ``(i+1)^-e`` with ``e`` in
[0.2, 0.5] per (namespace, shape), under a decaying head that sets the condition number, log-uniform in
[1e2, 1e4] per weight. ``Q_m``, ``Q_n`` are orthonormal bases shared by every weight of a dimension and ``R`` a
per-weight random signed permutation, which keeps each weight's directions in general position relative to
every other weight's.

Speed: the bulk part ``Q_m diag(bulk) Q_n^T`` (the "core") is one product per (shape, exponent); a weight is
its core permuted plus a rank-16 head update, O(16 m n). Bases of dimensions above 1280 are Kronecker products
``Q_a (x) Q_b`` restricted to ``k`` random columns (orthonormal by construction): QR of a tall 23040 x 1280
matrix takes seconds, and these come for free.

Fine-tunes rotate part of each weight's top subspace: with the same ``R`` and spectrum, the bases are
``rotate_top_directions(Q_m, Q_n, rank=k // 2, overlap)`` (a fraction ``1 - overlap`` of the top half swapped
with lower directions, then nudged), ``overlap`` in [0.3, 0.9] per (namespace, shape), so the exact top-r
overlap for any r <= k // 2 is about ``overlap``.
"""
from __future__ import annotations

import functools
import math

import torch

from .pairs import random_orthonormal, rotate_top_directions, spectrum_bulk, trained_spectrum
from .seeds import generator

VERSION = 1               # bump when generated values change: it is part of trained checkpoints' file names
K_MAX = 1280              # the most directions any zoo layout needs (min(m, n) of SDXL's and OpenCLIP-G's widest)
HEAD = 16                 # trained_spectrum's head length: where a weight's spectrum departs from its core's
EXPONENTS = (0.2, 0.5)    # range of the bulk exponent
LOG10_CONDS = (2.0, 4.0)  # range of log10 of the condition number s_1 / s_k
OVERLAPS = (0.3, 0.9)     # range of the fine-tunes' top-subspace overlap with their base


def _uniform(gen: torch.Generator, bounds: tuple[float, float]) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * float(torch.rand((), generator=gen, dtype=torch.float64))


def bulk_exponent(seed_ns: str, m: int, n: int) -> float:
    """The bulk exponent of every [m, n] weight of namespace ``seed_ns`` (``generator(*parts)`` seeds)."""
    return _uniform(generator("trained-exponent", seed_ns, m, n), EXPONENTS)


def finetune_overlap(rotate_ns: str, m: int, n: int) -> float:
    """The top-subspace overlap of every [m, n] weight of fine-tune ``rotate_ns`` with its base."""
    return _uniform(generator("trained-overlap", rotate_ns, m, n), OVERLAPS)


def _kron_factors(dim: int) -> tuple[int, int]:
    a = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    return a, dim // a


@functools.lru_cache(maxsize=8)
def _basis(dim: int) -> torch.Tensor:
    """A float32 [dim, min(dim, K_MAX)] matrix with orthonormal columns, the same for every weight."""
    gen = generator("trained-basis", dim)
    k = min(dim, K_MAX)
    a, b = _kron_factors(dim)
    if dim <= K_MAX or a == 1:
        return random_orthonormal(dim, k, gen).float()
    qa, qb = random_orthonormal(a, a, gen), random_orthonormal(b, b, gen)
    pick = torch.randperm(dim, generator=gen)[:k]
    return (qa[:, pick // b].unsqueeze(1) * qb[:, pick % b].unsqueeze(0)).reshape(dim, k).float()


@functools.lru_cache(maxsize=3)
def _core(m: int, n: int, exponent: float,
          rotate_ns: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q_m diag(bulk) Q_n^T, Q_m, Q_n) for [m, n] weights, fine-tune ``rotate_ns``'s rotated bases if given."""
    k = min(m, n)
    qm, qn = _basis(m)[:, :k], _basis(n)[:, :k]
    if rotate_ns is not None:
        overlap = finetune_overlap(rotate_ns, m, n)
        qm, qn = rotate_top_directions(qm, qn, k // 2, overlap, generator("trained-rotation", rotate_ns, m, n))
    return (qm * spectrum_bulk(k, exponent).float()) @ qn.T, qm, qn


def trained_matrix(seed_ns: str, key: str, m: int, n: int, rotate_ns: str | None = None) -> torch.Tensor:
    """The float32 [m, n] weight ``key`` of namespace ``seed_ns`` (see module docstring); with ``rotate_ns``,
    the same weight in that fine-tune. Entry std is 0.02-0.05."""
    gen = generator(seed_ns, key)
    std = _uniform(gen, (0.02, 0.05))
    cond = 10 ** _uniform(gen, LOG10_CONDS)
    rows, cols = torch.randperm(m, generator=gen), torch.randperm(n, generator=gen)
    row_sign = torch.randint(0, 2, (m, 1), generator=gen).float().mul_(2).sub_(1)
    col_sign = torch.randint(0, 2, (n,), generator=gen).float().mul_(2).sub_(1)
    k = min(m, n)
    exponent = bulk_exponent(seed_ns, m, n)
    s = trained_spectrum(k, exponent=exponent, cond=cond, head=HEAD)
    head = min(HEAD, k - 1)                      # trained_spectrum equals the bulk from index `head` on
    lift = (s - spectrum_bulk(k, exponent))[:head].float()
    core, qm, qn = _core(m, n, exponent, rotate_ns)
    w = core.index_select(0, rows).index_select(1, cols).mul_(row_sign).mul_(col_sign)
    u_head = qm[:, :head].index_select(0, rows).mul_(row_sign)
    v_head = qn[:, :head].index_select(0, cols).mul_(col_sign.unsqueeze(1))
    w.addmm_(u_head * lift, v_head.T)
    return w.mul_(std * math.sqrt(m * n) / float(torch.linalg.vector_norm(s)))     # ||W||_F = ||s||
