"""A plain reference implementation of the LoRA-X transfer, for the benchmark's naive/cold ratio.

What a straightforward implementation of METHOD.md does: every weight it needs is decomposed with a full
float32 ``torch.linalg.svd``, one layer at a time, with no cache, no screening, no value comparison first and no
Gram-matrix tricks. It computes the default transfer (slot-aware scores of every candidate, the matching decisions,
the soft side-wise ``auto`` operator of METHOD §2c, identical weights passed through) and shares only the layer
matching rules (``lorax_engine.analysis.matching``) and the identity test with the engine, so the benchmark
compares the subspace machinery, not the matching rules. Choices that favour the naive side (so the measured
speed-up is a lower bound): each weight is decomposed once per run (a stage's bases are held until the stage is
done), and similarity/projection are done on factors as in the engine.

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

from lorax_engine.analysis.matching import DEFAULT_POLICY, Evidence, LayerChoice, TargetIndex, decide, parse_key
from lorax_engine.analysis.similarity import identical_after_cast
from lorax_engine.projection.operators import KNEE


def svd(w: torch.Tensor):
    """(U, s, V) of ``w`` by a full float32 SVD."""
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    return u, s, vh.T


def top(decomposition, rank: int):
    """(U_r or None, V_r or None); None = the side spans its whole space."""
    u, _, v = decomposition
    r = min(rank, u.shape[1])
    return (None if r >= u.shape[0] else u[:, :r].contiguous()), (None if r >= v.shape[0] else v[:, :r].contiguous())


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


def _soft(decomposition, rank: int):
    """The soft subspaces of both sides (METHOD §2c): (U, sin theta, 1 - cos theta), (V, ...), knee in log sigma."""
    u, s, v = decomposition
    s = s.double()
    if rank >= s.numel():
        theta = torch.where(s > s[0] * 1e-12, math.pi / 2, 0.0)
    else:
        x = ((torch.log(s.clamp_min(s[0] * 1e-12) / s[rank - 1]) + math.log(KNEE)) / (2 * math.log(KNEE))).clamp(0, 1)
        theta = math.pi / 2 * x * x * (3 - 2 * x)
    sin, omc = torch.sin(theta).float().to(u.device), (1 - torch.cos(theta)).float().to(u.device)
    return (u, sin, omc), (v, sin, omc)


def _apply(side, y, part):
    x, sin, omc = side
    coef = x.T @ y
    return x @ (sin[:, None] * coef) if part == "s" else y - x @ (omc[:, None] * coef)


def _overlap(src, tgt) -> float:
    xs, a, _ = src
    xt, b, _ = tgt
    xt = xt[:xs.shape[0]]
    a, b = a.double() ** 2, b.double() ** 2
    omega = float((a[:, None] * (xs.T @ xt).double() ** 2 * b[None, :]).sum())
    gram = (xt.T @ xt).double()
    trace_t, norm_t = float((b * gram.diagonal()).sum()), float((b[:, None] * gram ** 2 * b[None, :]).sum().sqrt())
    top_, chance = float(a.norm()) * norm_t, float(a.sum()) * trace_t / xs.shape[0]
    return 1.0 if top_ - chance <= 1e-12 * top_ else (omega - chance) / (top_ - chance)


def _soft_transfer(up, down, src, tgt, rank, pad):
    """(B', A') of the auto operator T = S_t S_s + w C_t C_s per side, w = 1 - (1 - clamp(phi^_soft))^2."""
    (su, sv), (tu, tv) = _soft(src, rank), _soft(tgt, rank)
    weight = lambda x: 1.0 - (1.0 - min(max(x, 0.0), 1.0)) ** 2  # noqa: E731
    w_u, w_v = weight(_overlap(su, tu)), weight(_overlap(sv, tv))
    new_up = _apply(tu, _apply(su, up, "s"), "s") + w_u * _apply(tu, _apply(su, up, "c"), "c")
    at = down.T
    n = at.shape[0] - pad
    s_part = torch.cat([_apply(sv, at[:n], "s"), at[n:]])
    c_part = torch.cat([_apply(sv, at[:n], "c"), at[n:]])
    return new_up, (_apply(tv, s_part, "s") + w_v * _apply(tv, c_part, "c")).T


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
            svd(provider.matrix(key).to(device))
            _sync(device)
            times.append(time.perf_counter() - t0)
        seconds[shape] = statistics.median(times)
    return seconds


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def naive_transfer(lora, source, target, rank: int = 320, threshold: float = -math.inf, device: str = "cpu",
                   stages=None):
    """Transfer ``lora`` with the default policy and mode ``auto``. Returns ({target key: dense ΔW},
    {(s, t): score}, seconds). ``stages``: the stage labels to run (default: all of them).
    """
    t_start = time.perf_counter()
    planned = plan(lora, source, target)
    deltas: dict[str, torch.Tensor] = {}
    scores: dict[tuple[str, str], float] = {}
    for stage, items in planned.items():
        if stages is not None and stage not in stages:
            continue
        src = {s: svd(source.matrix(s).to(device)) for s, _ in items}
        tgt = {t: svd(target.matrix(t).to(device)) for t in sorted({t for _, ts in items for t in ts})}
        identical: set[tuple[str, str]] = set()
        layers = {}
        for s, ts in items:
            (ms, ns), (us, vs) = _matrix_shape(source.shape(s)), top(src[s], rank)
            evidence = {}
            for t in ts:
                (mt, nt), (ut, vt) = _matrix_shape(target.shape(t)), top(tgt[t], rank)
                sides = (_side_score(us, ut, ms, mt), _side_score(vs, vt, ns, nt))
                # identical weights (after a cast): checked on the values where the score makes it plausible
                if min(sides) >= 0.5 and source.shape(s) == target.shape(t) and identical_after_cast(
                        source.matrix(s), target.matrix(t)):
                    sides = (1.0, 1.0)
                    identical.add((s, t))
                scores[(s, t)] = min(sides)
                evidence[t] = Evidence(scores[(s, t)], True, (s, t) in identical)
            layers[s] = LayerChoice(parse_key(s), lora.layers[s].energy(), evidence)
        chosen = decide(layers, DEFAULT_POLICY, threshold).chosen
        for s, targets in chosen.items():
            layer = lora.layers[s]
            for t, strength in targets.items():
                nt = _matrix_shape(target.shape(t))[1]
                up = layer.up.float().reshape(layer.up.shape[0], -1).to(device)
                down = layer.down.float().reshape(layer.down.shape[0], -1).to(device)
                pad = nt - down.shape[1]
                down = torch.cat([down, down.new_zeros(down.shape[0], pad)], dim=1)
                if (s, t) not in identical:
                    up, down = _soft_transfer(up, down, src[s], tgt[t], rank, pad)
                delta = strength * float(layer.alpha) / layer.rank * (up @ down)
                deltas[t] = deltas[t] + delta if t in deltas else delta
        del src, tgt
    _sync(device)
    return {k: v.cpu() for k, v in deltas.items()}, scores, time.perf_counter() - t_start
