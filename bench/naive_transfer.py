"""A plain reference implementation of the LoRA-X transfer, for the benchmark's naive/cold ratio.

What a straightforward implementation of METHOD.md does: every weight it needs is decomposed with a full
float32 ``torch.linalg.svd``, one layer at a time, with no cache, no randomised screening and no Gram-matrix
tricks. It computes the default transfer (slot-aware scores, block-level "best", the similarity-weighted ``auto``
operator, identical weights passed through) and shares only the layer matching rules
(``lorax_engine.analysis.matching``) and the identity test with the engine, so the benchmark compares the subspace
machinery, not the matching rules. Choices that favour the naive side (so the measured speed-up is a lower
bound): each weight is decomposed once per run (a stage's bases are held until the stage is done), and
similarity/projection are done on factors as in the engine.

A full naive run on the full-size models takes hours on 2 CPU cores, so :func:`naive_transfer` can run a
subset of stages, and :func:`plan_svds` + :func:`time_svds` extrapolate the whole run from a timed SVD per
distinct weight shape (median of three timings; the SVDs are > 99% of the naive run's time).
"""
from __future__ import annotations

import math
import statistics
import time
from collections import Counter

import torch

from lorax_engine.analysis.matching import TargetIndex, parse_key, select_units, unit_of
from lorax_engine.analysis.similarity import identical_after_cast


def top_subspaces(w: torch.Tensor, rank: int):
    """(U_r or None, V_r or None) of ``w`` by a full float32 SVD; None = the side spans its whole space."""
    u, _, vh = torch.linalg.svd(w.float(), full_matrices=False)
    m, n = w.shape
    r = min(rank, m, n)
    return (None if r >= m else u[:, :r].contiguous()), (None if r >= n else vh[:r].T.contiguous())


def _side_score(xs, xt, dim_s: int, dim_t: int) -> float:
    """Chance-normalised mean squared cosine of one side (METHOD §1; a narrower source side is embedded and
    normalised within its slot, §3); 1.0 for a side that spans its whole space."""
    r_s = dim_s if xs is None else xs.shape[1]
    r_t = dim_t if xt is None else xt.shape[1]
    if dim_s == dim_t:
        chance = max(r_s, r_t) / dim_t
        if chance >= 1.0:
            return 1.0
        phi = float(((xs.T @ xt).double() ** 2).sum()) / min(r_s, r_t)
        return (phi - chance) / (1.0 - chance)
    slot = (torch.eye(dim_t)[:dim_s] if xt is None else xt[:dim_s]).double()
    k = min(r_s, r_t)
    energy = float((slot ** 2).sum())
    phi = energy / k if xs is None else float(((xs.double().T @ slot) ** 2).sum()) / k
    chance = r_s * energy / (dim_s * k)
    ceiling = float((torch.linalg.svdvals(slot)[:r_s] ** 2).sum()) / k
    if energy < 1e-9:
        return 0.0
    return 1.0 if ceiling - chance <= 1e-12 else (phi - chance) / (ceiling - chance)


def _sidewise(x, p_s, p_t, w):
    """T x for T = P_t P_s + w (I - P_t)(I - P_s), projectors given by their bases (None = identity)."""
    proj = lambda b, y: y if b is None else b @ (b.T @ y)  # noqa: E731
    inside = proj(p_s, x)
    rest = x - inside
    return proj(p_t, inside) + w * (rest - proj(p_t, rest))


def plan(lora, source, target):
    """{stage: [(source key, [candidate target keys])]} for the LoRA's layers that have candidates."""
    index = TargetIndex(target)
    stages: dict[str, list] = {}
    for key in sorted(lora.layers):
        if key not in source:
            continue
        layer = lora.layers[key]
        shape = source.shape(key)
        if (shape[0], math.prod(shape[1:])) != (layer.up.shape[0], math.prod(layer.down.shape[1:])):
            continue
        cands = index.candidates(key, shape)
        if cands.targets:
            stages.setdefault(cands.stage, []).append((key, [t for t, _ in cands.targets]))
    return stages


def _matrix_shape(shape) -> tuple[int, int]:
    return int(shape[0]), math.prod(int(s) for s in shape[1:])


def plan_svds(stages, source, target) -> Counter:
    """{matrix shape: number of SVDs} a full naive run performs."""
    counts: Counter = Counter()
    for items in stages.values():
        for s, _ in items:
            counts[_matrix_shape(source.shape(s))] += 1
        for t in {t for _, ts in items for t in ts}:
            counts[_matrix_shape(target.shape(t))] += 1
    return counts


def time_svds(counts: Counter, source, target, device: str = "cpu", repeats: int = 3
              ) -> dict[tuple[int, int], float]:
    """Seconds of one read + float32 SVD of a real weight of each shape (first weight found of that shape):
    the median of ``repeats`` timings, as one timing moved by 20-60 % between runs on a 2-core VM."""
    seconds = {}
    for shape in counts:
        provider, key = next((p, k) for p in (target, source) for k in p.keys()
                             if _matrix_shape(p.shape(k)) == shape)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            top_subspaces(provider.matrix(key).to(device), 1)
            _sync(device)
            times.append(time.perf_counter() - t0)
        seconds[shape] = statistics.median(times)
    return seconds


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def naive_transfer(lora, source, target, rank: int = 320, threshold: float = -math.inf, device: str = "cpu",
                   stages=None):
    """Transfer ``lora`` with block-level "best" and mode ``auto``. Returns ({target key: dense ΔW},
    {(s, t): score}, seconds). ``stages``: the stage labels to run (default: all of them).
    """
    t_start = time.perf_counter()
    planned = plan(lora, source, target)
    deltas: dict[str, torch.Tensor] = {}
    scores: dict[tuple[str, str], float] = {}
    for stage, items in planned.items():
        if stages is not None and stage not in stages:
            continue
        src = {s: top_subspaces(source.matrix(s).to(device), rank) for s, _ in items}
        tgt = {t: top_subspaces(target.matrix(t).to(device), rank) for t in sorted({t for _, ts in items for t in ts})}
        sides: dict[tuple[str, str], tuple[float, float]] = {}
        identical: set[tuple[str, str]] = set()
        units: dict[str, list] = {}
        for s, ts in items:
            (ms, ns), us_vs = _matrix_shape(source.shape(s)), src[s]
            for t in ts:
                mt, nt = _matrix_shape(target.shape(t))
                sides[(s, t)] = (_side_score(us_vs[0], tgt[t][0], ms, mt), _side_score(us_vs[1], tgt[t][1], ns, nt))
                # identical weights (after a cast): checked on the values where the score makes it plausible
                if min(sides[(s, t)]) >= 0.5 and source.shape(s) == target.shape(t) and identical_after_cast(
                        source.matrix(s), target.matrix(t)):
                    sides[(s, t)] = (1.0, 1.0)
                    identical.add((s, t))
                scores[(s, t)] = min(sides[(s, t)])
            units.setdefault(unit_of(parse_key(s)), []).append(
                (lora.layers[s].energy(), {t: (scores[(s, t)], False) for t in ts}))
        best = select_units(units)
        for s, ts in items:
            layer = lora.layers[s]
            for t in ts:
                if unit_of(parse_key(t)) != best[unit_of(parse_key(s))][0] or scores[(s, t)] < threshold:
                    continue
                (ut, vt), (us, vs) = tgt[t], src[s]
                nt = _matrix_shape(target.shape(t))[1]
                up = layer.up.float().reshape(layer.up.shape[0], -1).to(device)
                down = layer.down.float().reshape(layer.down.shape[0], -1).to(device)
                pad = nt - down.shape[1]
                down = torch.cat([down, down.new_zeros(down.shape[0], pad)], dim=1)
                if (s, t) not in identical:
                    w_u, w_v = (min(max(x, 0.0), 1.0) for x in sides[(s, t)])
                    if pad:      # the source's input subspace, embedded in the CLIP-L slot
                        vs = torch.eye(down.shape[1] - pad, device=down.device) if vs is None else vs
                        vs = torch.cat([vs, vs.new_zeros(pad, vs.shape[1])], dim=0)
                    up = _sidewise(up, us, ut, w_u)
                    down = _sidewise(down.T, vs, vt, w_v).T
                delta = float(layer.alpha) / layer.rank * (up @ down)
                deltas[t] = deltas[t] + delta if t in deltas else delta
        del src, tgt
    _sync(device)
    return {k: v.cpu() for k, v in deltas.items()}, scores, time.perf_counter() - t_start
