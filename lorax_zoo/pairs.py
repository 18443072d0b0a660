"""Layer-level weight pairs that look trained, for accuracy tests of the engine's fast paths (METHOD.md §2b).

Trained transformer weights decay far slower than ``1/i``: a few large singular values (a decaying head) on a
slow bulk ``~ i^-0.2..0.5`` over all ``min(m, n)`` directions, with condition numbers ``s_1 / s_r`` up to 1e4.
A slow bulk means small gaps at any cut ``r``, so a top-``r`` subspace is hard to estimate, and a large
condition number loses the small values in a float32 Gram matrix: exactly where cheap estimates go wrong.

Pairs cover every degree of similarity between a source and a target layer:

- ``identical``: the target is a copy of the source (score 1).
- ``identical_fp32_fp16``: source float32, target its float16 cast (SD1.5's fp32 CLIP-L against SDXL's fp16
  one); the score must still be 1 to within fp16 rounding.
- ``same_subspace``: same singular vectors, different spectrum (exact top-``rank`` subspaces coincide, score 1).
- ``partial_overlap``: a fine-tune: a fraction ``1 - overlap`` of the top-``rank`` left and right directions
  swapped with complement directions, then every direction slightly perturbed, so the exact top-``rank``
  overlap ``||U_s^T U_t||_F^2 / rank`` is about ``overlap``.
- ``unrelated``: independent weights (overlap about ``rank / m``, chance).
- ``finetune``: the source after a training-like drift of relative size ``drift`` (``||E|| = drift ||W||``, see
  :func:`finetune_drift`): the continuity case of METHOD §2c, a LoRA carried to a fine-tune of its own base.

Everything is float64 (but ``identical_fp32_fp16``) and depends only on the arguments.
:func:`leading_spectrum` is the other spectrum METHOD §2c names: a slow bulk with a few strong leading directions.
"""
from __future__ import annotations

import hashlib
import math

import torch

PAIR_KINDS = ("identical", "identical_fp32_fp16", "same_subspace", "partial_overlap", "unrelated", "finetune")

PERTURBATION = 0.1            # partial_overlap: rms angle (radians) of the random plane rotations of the vectors


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def spectrum_bulk(d: int, exponent: float) -> torch.Tensor:
    """The slow bulk ``(i+1)^-exponent``, float64, length ``d``."""
    _check_dims(d=d)
    if exponent <= 0:
        raise ValueError(f"exponent must be > 0 (a decaying bulk), got {exponent}")
    return (torch.arange(d, dtype=torch.float64) + 1) ** -exponent


def trained_spectrum(d: int, *, exponent: float = 0.2, cond: float = 1e3, head: int = 16) -> torch.Tensor:
    """``d`` (>= 2) strictly descending float64 singular values with ``s[0] / s[-1] == cond``.

    The bulk is :func:`spectrum_bulk`; the first ``h = min(head, d - 1)`` values are lifted by a factor
    decaying geometrically from ``A`` to exactly 1 at index ``h``, with ``A = cond / d^exponent`` so the whole
    spectrum has condition number ``cond``. Scale is arbitrary (``s[-1]`` is ``d^-exponent``).
    """
    _check_dims(d=d, head=head)
    if d < 2:
        raise ValueError(f"d must be >= 2 (one singular value has condition number 1), got {d}")
    bulk = spectrum_bulk(d, exponent)
    lift = cond / float(bulk[0] / bulk[-1])
    if lift < 1:
        raise ValueError(f"cond {cond:g} is below the bulk's own condition number {d ** exponent:.4g} "
                         f"(d={d}, exponent={exponent}): raise cond or lower exponent")
    h = min(head, d - 1)
    factor = lift ** (1 - torch.arange(d, dtype=torch.float64) / h).clamp(min=0)
    return bulk * factor


def leading_spectrum(d: int, exponent: float, strong: int = 4, lift: float = 10.0) -> torch.Tensor:
    """The bulk ``(i+1)^-exponent`` with its first ``strong`` values lifted geometrically from ``lift`` times down to
    1: a slow spectrum with a few strong leading directions (METHOD §2c), whose Frobenius norm the bulk still
    dominates, as in trained weights (a head that dominated it would make a 1% drift of the whole a large drift of
    the bulk)."""
    s = spectrum_bulk(d, exponent).clone()
    k = min(strong, d)
    s[:k] *= torch.logspace(math.log10(lift), 0.0, k, dtype=torch.float64) if k > 1 else lift
    return s


def finetune_drift(w: torch.Tensor, drift: float, seed: int) -> torch.Tensor:
    """``W + E`` with ``||E||_F = drift ||W||_F``, E shaped as training moves a weight, in three equal parts:
    its singular values rescaled by a few percent each, its singular vectors turned by small random rotations on
    both sides (``K_u W + W K_v`` with skew-symmetric K), and a rank-4 update reading the weight's strongest input
    directions (learned features use what the layer already reads)."""
    w = w.double()
    m, n = w.shape
    gen = torch.Generator().manual_seed(_derived_seed(seed, "finetune"))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    rescale = (u * (s * torch.randn(s.shape[0], generator=gen, dtype=torch.float64))) @ vh

    def skew(d):
        a = torch.randn(d, d, generator=gen, dtype=torch.float64)
        return a - a.T

    turn = skew(m) @ w + w @ skew(n)
    reads = vh[:min(8, vh.shape[0])].T @ torch.randn(min(8, vh.shape[0]), 4, generator=gen, dtype=torch.float64)
    feature = torch.randn(m, 4, generator=gen, dtype=torch.float64) @ reads.T
    e = sum(part / part.norm() for part in (rescale, turn, feature))
    return w + e * (drift * float(w.norm()) / float(e.norm()))


def random_orthonormal(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random float64 ``[n, k]`` matrix with orthonormal columns (``k <= n``)."""
    _check_dims(n=n, k=k)
    if k > n:
        raise ValueError(f"cannot have k={k} orthonormal columns in dimension n={n}")
    q, r = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))     # the sign fix makes QR's output Haar-distributed


def _derived_seed(seed: int, salt: str) -> int:
    """An independent seed for another generator: torch's CPU generator keeps only 32 bits of a seed, so
    offsets like ``seed + 2**40`` would silently repeat the source's values."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{salt}".encode()).digest()[:4], "little")


def _factors(m: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    r = min(m, n)
    return random_orthonormal(m, r, gen), random_orthonormal(n, r, gen)


def _compose(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    m, n = u.shape[0], v.shape[0]
    s = s * (scale * math.sqrt(m * n) / float(torch.linalg.vector_norm(s)))   # entry std = scale
    return (u * s) @ v.T


def trained_weight(m: int, n: int, *, exponent: float = 0.2, cond: float = 1e3, seed: int = 0,
                   scale: float = 0.03) -> torch.Tensor:
    """A float64 ``[m, n]`` weight ``U diag(s) V^T``: all ``min(m, n)`` directions Haar-random, ``s`` from
    :func:`trained_spectrum`, entries of root-mean-square ``scale``."""
    _check_dims(m=m, n=n)
    u, v = _factors(m, n, seed)
    return _compose(u, trained_spectrum(min(m, n), exponent=exponent, cond=cond), v, scale)


def rotate_top_directions(u: torch.Tensor, v: torch.Tensor, rank: int, overlap: float,
                          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap a fraction ``1 - overlap`` of the first ``rank`` columns of ``u`` and ``v`` with random later
    columns (the same positions in both, so a rotated direction is a whole new singular pair), then nudge every
    column by a small plane rotation with a random partner column (orthonormal by construction, O(m r) instead
    of a QR)."""
    r = u.shape[1]
    moved = round((1 - overlap) * rank)
    if moved > r - rank:
        raise ValueError(f"partial_overlap: rotating {moved} of the top {rank} directions needs {moved} "
                         f"complement directions, but min(m, n) - rank = {r - rank}: lower rank or raise overlap")
    top = torch.randperm(rank, generator=gen)[:moved]
    rest = rank + torch.randperm(r - rank, generator=gen)[:moved]
    perm = torch.arange(r)
    perm[top], perm[rest] = rest, top
    return _nudge(u, perm, gen), _nudge(v, perm, gen)


def _nudge(basis: torch.Tensor, perm: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``basis[:, perm]`` with disjoint random pairs of columns rotated by small random angles."""
    rows = basis.T.contiguous()[perm]            # columns as rows: gathers on a tall basis are 5x faster
    r = rows.shape[0]
    order = torch.randperm(r, generator=gen)[:r - r % 2]
    a, b = order[0::2], order[1::2]
    theta = PERTURBATION * torch.randn(len(a), generator=gen, dtype=torch.float64).to(basis.dtype)
    cos, sin = torch.cos(theta).unsqueeze(1), torch.sin(theta).unsqueeze(1)
    out = rows.clone()
    out[a] = rows[a] * cos + rows[b] * sin
    out[b] = rows[b] * cos - rows[a] * sin
    return out.T


def weight_pair(kind: str, m: int, n: int, *, exponent: float = 0.2, cond: float = 1e3, seed: int = 0,
                rank: int = 320, overlap: float = 0.5, target_exponent: float | None = None,
                drift: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(source, target)`` ``[m, n]`` weights of one layer, related as ``kind`` says (see module docstring).

    The source is always ``trained_weight(m, n, exponent=exponent, cond=cond, seed=seed)`` (float32 for
    ``identical_fp32_fp16``). ``rank`` and ``overlap`` only matter to ``partial_overlap``; ``target_exponent``
    (default ``exponent + 0.3``) only to ``same_subspace``; ``drift`` only to ``finetune``.
    """
    if kind not in PAIR_KINDS:
        raise ValueError(f"kind must be one of {PAIR_KINDS}, got {kind!r}")
    _check_dims(m=m, n=n, rank=rank)
    if not 0 <= overlap <= 1:
        raise ValueError(f"overlap must be in [0, 1], got {overlap}")
    r = min(m, n)
    if rank > r:
        raise ValueError(f"rank {rank} exceeds min(m, n) = {r}")
    u, v = _factors(m, n, seed)
    s = trained_spectrum(r, exponent=exponent, cond=cond)
    source = _compose(u, s, v, 0.03)
    if kind == "identical":
        return source, source.clone()
    if kind == "identical_fp32_fp16":
        source = source.float()
        return source, source.half()
    if kind == "same_subspace":
        t_exp = exponent + 0.3 if target_exponent is None else target_exponent
        return source, _compose(u, trained_spectrum(r, exponent=t_exp, cond=cond), v, 0.03)
    if kind == "finetune":
        return source, finetune_drift(source, drift, seed)
    if kind == "partial_overlap":
        gen = torch.Generator().manual_seed(_derived_seed(seed, "partial_overlap"))
        u_t, v_t = rotate_top_directions(u, v, rank, overlap, gen)
        return source, _compose(u_t, s, v_t, 0.03)
    return source, trained_weight(m, n, exponent=exponent, cond=cond, seed=_derived_seed(seed, "unrelated"))


def slot_pair(kind: str, m: int, n_source: int = 768, n_target: int = 2048,
              **same_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention k/v: source ``[m, n_source]``, target ``[m, n_target]`` = ``[slot | other columns]``.

    The slot (first ``n_source`` columns) relates to the source as ``weight_pair(kind, ...)``; the other columns
    are an independent trained weight (SDXL's OpenCLIP-G part), in the slot's dtype.
    """
    _check_dims(m=m, n_source=n_source, n_target=n_target)
    if n_target <= n_source:
        raise ValueError(f"n_target ({n_target}) must exceed n_source ({n_source}): the slot is part of the input")
    source, slot = weight_pair(kind, m, n_source, **same_kwargs)
    seed = _derived_seed(same_kwargs.get("seed", 0), "other columns")
    kwargs = {k: same_kwargs[k] for k in ("exponent", "cond") if k in same_kwargs}
    other = trained_weight(m, n_target - n_source, seed=seed, **kwargs)
    return source, torch.cat([slot, other.to(slot.dtype)], dim=1)
