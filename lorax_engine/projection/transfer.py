"""LoRA-X transfer: similarity map of two base models, then projection of a LoRA through it (METHOD.md).

Two steps, callable separately (the ComfyUI nodes do) or together (:func:`transfer`):

1. :func:`compute_similarity_map` finds every source layer's candidate target layers (matching.py) and
   scores each pair (similarity.py) from the top-r subspaces of both weights. Work runs stage by stage
   (side, width): the stage's source bases are held, the target candidates stream through one at a
   time, so memory stays at one stage plus the cache's LRU budget.
2. :func:`project` applies the matching policy and threshold and projects each chosen pair on the
   factors (projection.py), combining several updates of one target weight.

``method="fast"`` (default) scores candidates with randomised bases (bfloat16 sketch products where the
hardware has them) and projects with "gram" bases (float32 Gram, float64 eigendecomposition): the
randomised bases are accurate to < 0.01 on similarities but not on projections (see subspaces.py), the
Gram ones to ~5e-4 on projections, and only the chosen targets need them. ``method="exact"`` uses exact
bases for both.

Long loops call ``progress(done, total)`` and ``should_stop()`` (which may raise, or return True to
cancel with :class:`TransferCancelled`).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace

import torch

from ..analysis.matching import (
    DEFAULT_POLICY,
    DEFAULT_THRESHOLD,
    DROP_BELOW_THRESHOLD,
    DROP_NOT_IN_SOURCE,
    DROP_NOT_IN_UNIT,
    DROP_UNUSED_BY_TARGET,
    KNOWN_ROLES,
    NOT_BEST_UNIT,
    Candidates,
    LayerRef,
    TargetIndex,
    check_policy,
    parse_key,
    select,
    select_units,
    unit_of,
)
from ..analysis.similarity import (
    LayerSimilarity,
    PairStore,
    identical_after_cast,
    identical_similarity,
    layer_similarity,
    similarity_dict,
)
from ..analysis.subspaces import (
    ALGORITHM_VERSION,
    DEFAULT_RANK,
    CacheStats,
    SubspaceCache,
    SubspaceSpec,
    fast_sketch_dtype,
)
from ..errors import LoraXError, TransferOptionError
from ..files.base_weights import prefetch_fingerprints, tensor_fingerprint
from ..files.compatibility import check_transfer_inputs, layer_fits
from ..files.lora import LoraLayer, LoraModel
from ..reports.report import IDENTITY_OPERATOR, CandidateRecord, LayerRecord, Report, TargetRecord
from .operators import (
    DEFAULT_MODE,
    check_mode,
    combine,
    compress,
    energy_fraction,
    pass_through,
    passes_through,
    project_sidewise,
    project_subspace,
    projected_energy,
    relative_change,
    side_weights,
)

TRANSFER_METHODS = ("fast", "exact")
# a screening score above this on equal shapes is checked for identity on the values (METHOD §2's axiom): low,
# because screening estimates of a weight and its fp16 copy can differ where the spectrum is flat (0.95 measured on
# an i^-0.2 spectrum), while unrelated weights score ~0 and a value check costs one read of each weight
IDENTITY_CHECK_SCORE = 0.5
# an applied pair whose exact score is further than this from its screening estimate is noted in the report
ESTIMATE_TOLERANCE = 0.01

Progress = Callable[[int, int], None] | None
ShouldStop = Callable[[], bool] | None


class TransferCancelled(LoraXError):
    """The caller's ``should_stop`` hook asked to stop."""


@dataclass(frozen=True)
class TransferOptions:
    """Every choice of the method, with its default. See METHOD.md and the module docstrings."""

    rank: int = DEFAULT_RANK             # r of the subspaces (the paper's 320)
    method: str = "fast"                 # "fast": randomised bases to score, Gram to project; "exact"
    threshold: float = DEFAULT_THRESHOLD  # on the normalised score; -inf applies every candidate
    policy: str = DEFAULT_POLICY         # "best" | "all-above-threshold" | "spread"
    mode: str = DEFAULT_MODE             # "auto" | "subspace" | "subspace+null" | "direct" (baseline)
    output_rank: int | None = None       # cap: truncated SVD of each output layer on its factors
    device: str = "cpu"                  # where bases are computed ("cuda" when available)
    oversample: int = 96                 # randomised bases: extra sketch columns
    power_iters: int = 1                 # randomised bases: subspace iterations
    seed: int = 0                        # randomised bases: sketch seed

    def __post_init__(self):
        if self.method not in TRANSFER_METHODS:
            raise TransferOptionError(f"method must be one of {', '.join(TRANSFER_METHODS)}, got {self.method!r}")
        check_policy(self.policy, self.threshold)
        check_mode(self.mode)
        if self.output_rank is not None and (not isinstance(self.output_rank, int) or self.output_rank < 1):
            raise TransferOptionError(f"output rank must be a positive integer or None, got {self.output_rank!r}")
        if not str(self.device).startswith(("cpu", "cuda")):
            raise TransferOptionError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise TransferOptionError("device 'cuda' was asked for but torch sees no CUDA device")
        self.screening_spec()   # validates rank and sketch parameters

    def screening_spec(self) -> SubspaceSpec:
        if self.method == "exact":
            return SubspaceSpec(self.rank, "exact")
        return SubspaceSpec(self.rank, "randomized", self.oversample, self.power_iters, self.seed,
                            fast_sketch_dtype(self.device))

    def projection_spec(self) -> SubspaceSpec:
        return SubspaceSpec(self.rank, "exact" if self.method == "exact" else "gram")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["threshold"] = self.threshold if math.isfinite(self.threshold) else str(self.threshold)
        return d


def _ticker(progress: Progress, should_stop: ShouldStop, total: int, offset: int = 0, grand_total: int | None = None):
    """A callable advancing progress by one step and honouring the stop hook."""
    state = {"done": 0}
    grand = grand_total if grand_total is not None else total

    def tick(step: int = 1):
        if should_stop is not None and should_stop():
            raise TransferCancelled("transfer cancelled")
        state["done"] += step
        if progress is not None:
            progress(min(offset + state["done"], grand), grand)

    if progress is not None:
        progress(offset, grand)
    return tick


# --------------------------------------------------------------------------------------------- the map

@dataclass
class MapEntry:
    candidates: Candidates
    similarities: dict[str, LayerSimilarity] = field(default_factory=dict)   # target key -> similarity
    energy_layer: str | None = None                                         # fingerprint of the LoRA layer
    energies: dict[str, float] = field(default_factory=dict)                # target key -> energy kept


def layer_fingerprint(layer: LoraLayer) -> str:
    return f"{tensor_fingerprint(layer.up)}|{tensor_fingerprint(layer.down)}|{float(layer.alpha)!r}"


@dataclass
class SubspaceMap:
    """Scores of every (source layer, candidate target layer) pair, plus what is needed to project.

    Holds the two weight providers and the cache, so :func:`project` can fetch projection bases later.
    """

    source: object
    target: object
    cache: SubspaceCache
    options: TransferOptions
    index: TargetIndex
    entries: dict[str, MapEntry] = field(default_factory=dict)
    seconds: float = 0.0
    cache_stats: dict = field(default_factory=dict)
    steps: int = 0                 # progress steps reported while scoring

    def refs(self) -> list[LayerRef]:
        return sorted((e.candidates.source for e in self.entries.values()), key=lambda r: (r.order, r.key))

    def plot_rows(self) -> list[dict]:
        """Per source layer: block grouping and candidate scores (for plot.py)."""
        rows = []
        for ref in self.refs():
            entry = self.entries[ref.key]
            scores = [s.score for s in entry.similarities.values()]
            rows.append({"key": ref.key, "side": ref.side, "block": ref.block, "stage": entry.candidates.stage,
                         "scores": scores, "best": max(scores) if scores else None, "applied": None})
        return rows

    def to_dict(self) -> dict:
        layers = []
        for ref in self.refs():
            entry = self.entries[ref.key]
            cands = []
            for tkey, compat in entry.candidates.targets:
                sim = entry.similarities.get(tkey)
                cands.append({"target_key": tkey, "compat": compat,
                              "similarity": similarity_dict(sim) if sim else None})
            layers.append({"source_key": ref.key, "stage": entry.candidates.stage, "block": ref.block,
                           "role": ref.role, "reason": entry.candidates.reason, "candidates": cands})
        return {"source_model": self.source.name, "target_model": self.target.name,
                "source_architecture": self.source.architecture, "target_architecture": self.target.architecture,
                "options": self.options.as_dict(), "seconds": self.seconds, "cache": self.cache_stats,
                "layers": layers}


def default_source_keys(source) -> list[str]:
    """Every source weight of a role the method is specified for (METHOD §4): what a LoRA may touch."""
    keys = []
    for key in source.keys():
        ref = parse_key(key)
        if ref is not None and ref.role in KNOWN_ROLES and len(source.shape(key)) in (2, 4):
            keys.append(key)
    return keys


def _stats_delta(before: CacheStats, after: CacheStats) -> dict:
    a, b = after.as_dict(), before.as_dict()
    return {k: round(a[k] - b[k], 3) if isinstance(a[k], float) else a[k] - b[k] for k in a}


def _plan_entries(smap: SubspaceMap, keys, lora: LoraModel | None):
    direct = smap.options.mode == "direct"
    for key in keys:
        fits = key in smap.source
        if fits and lora is not None:
            fits = layer_fits(lora.layers[key], smap.source.shape(key))
        if not fits:
            ref = parse_key(key) or LayerRef(key, "other", "other", (99,), None, key)
            smap.entries[key] = MapEntry(Candidates(ref, tuple(lora.layers[key].weight_shape) if lora else (),
                                                    "other", reason=DROP_NOT_IN_SOURCE))
            continue
        shape = smap.source.shape(key)
        cands = smap.index.direct(key, shape) if direct else smap.index.candidates(key, shape)
        smap.entries[key] = MapEntry(cands)


def _score(smap: SubspaceMap, keys: list[str], lora: LoraModel | None, progress: Progress,
           should_stop: ShouldStop, offset: int = 0, extra_total: int = 0):
    """Similarities (and, with a LoRA, screening energies) for ``keys``, stage by stage."""
    spec = smap.options.screening_spec()
    spec_id = f"v{ALGORITHM_VERSION}|{spec.describe()}"
    # fast screening computes its r x r overlaps on the transfer's device, in bfloat16 where it multiplies that
    # natively (the cache hands bases out on the CPU: they are placed once per stage and target)
    device = smap.options.device
    product_dtype = getattr(torch, fast_sketch_dtype(device)) if spec.method == "randomized" else torch.float32
    if smap.cache.pairs is None:
        smap.cache.pairs = PairStore(smap.cache.directory)
    store = smap.cache.pairs
    source, target, cache = smap.source, smap.target, smap.cache

    stages: dict[tuple, list[str]] = {}
    for key in keys:
        entry = smap.entries[key]
        if entry.candidates.targets:
            ref = entry.candidates.source
            stages.setdefault((ref.order[0], entry.candidates.stage), []).append(key)

    # every weight is fingerprinted before its pairs are looked up: all at once, in parallel threads
    prefetch_fingerprints(source, [k for keys_ in stages.values() for k in keys_])
    prefetch_fingerprints(target, [t for keys_ in stages.values() for s in keys_
                                   for t, _ in smap.entries[s].candidates.targets])
    plans = []     # (source keys needing bases, {target: [sources needing the pair]}, {target: [sources]})
    total = 0
    for stage in sorted(stages):
        need_pair: dict[str, list[str]] = {}
        by_target: dict[str, list[str]] = {}
        for s in stages[stage]:
            if should_stop is not None and should_stop():      # hashing a stage's weights takes seconds
                raise TransferCancelled("transfer cancelled")
            entry = smap.entries[s]
            fp_s = source.fingerprint(s)
            if lora is not None:
                lfp = layer_fingerprint(lora.layers[s])
                if entry.energy_layer != lfp:
                    entry.energy_layer, entry.energies = lfp, {}
            for t, _ in entry.candidates.targets:
                if t not in entry.similarities:
                    sim = store.get(fp_s, target.fingerprint(t), spec_id)
                    if sim is None:
                        need_pair.setdefault(t, []).append(s)
                    else:
                        entry.similarities[t] = sim
        # a target basis is fetched only to score a pair; while it is at hand, the energy every LoRA layer
        # of the stage would keep on it is recorded too (warm runs do not read every basis just for that)
        for s in stages[stage]:
            for t, _ in smap.entries[s].candidates.targets:
                if t in need_pair:
                    by_target.setdefault(t, []).append(s)
        sources_needed = sorted({s for ss in need_pair.values() for s in ss})
        plans.append((sources_needed, need_pair, by_target))
        total += len(sources_needed) + len(by_target)

    tick = _ticker(progress, should_stop, total, offset, offset + total + extra_total)
    maybe_identical: list[tuple[str, str]] = []
    for sources_needed, need_pair, by_target in plans:
        src_screen = {}
        with closing(cache.get_many(source, sources_needed, spec, device)) as fetched:
            for s, basis_s in fetched:
                src_screen[s] = basis_s.to(device).to(product_dtype)
                tick()
        order = sorted(by_target, key=lambda k: parse_key(k).order)
        with closing(cache.get_many(target, order, spec, device)) as fetched:
            for t, basis_t in fetched:
                on_device = basis_t.to(device)
                screen_t = on_device.to(product_dtype)
                fp_t = target.fingerprint(t)        # memoised: get_many has hashed it
                energy_basis = None                 # basis_t on the LoRA's device, placed once for all its sources
                for s in by_target[t]:
                    entry = smap.entries[s]
                    if s in need_pair.get(t, ()):
                        fp_s = source.fingerprint(s)
                        sim = layer_similarity(src_screen[s], screen_t)
                        if fp_s == fp_t:
                            sim = identical_similarity(sim)       # the same bytes: METHOD §1's anchor
                        elif sim.score >= IDENTITY_CHECK_SCORE and source.shape(s) == target.shape(t):
                            maybe_identical.append((s, t))        # equal after a cast? checked below
                        entry.similarities[t] = sim
                        store.put(fp_s, fp_t, spec_id, sim)
                    if lora is not None and t not in entry.energies:
                        if energy_basis is None:     # a GPU LoRA takes the copy already made for the products
                            lora_device = lora.layers[s].up.device
                            energy_basis = (on_device if lora_device.type != "cpu" else basis_t).to(lora_device)
                        entry.energies[t] = projected_energy(lora.layers[s], energy_basis)
                del basis_t, on_device, screen_t, energy_basis
                tick()
        del src_screen
    # identity across storage precisions (SD1.5's fp32 CLIP-L vs SDXL's fp16 copy): compared on values, only for
    # pairs that already score near 1, after the basis threads are done with the weight providers
    for s, t in maybe_identical:
        if identical_after_cast(source.matrix(s), target.matrix(t)):
            sim = identical_similarity(smap.entries[s].similarities[t])
            smap.entries[s].similarities[t] = sim
            store.put(source.fingerprint(s), target.fingerprint(t), spec_id, sim)
    store.flush()
    for provider in (source, target):
        flush = getattr(provider, "flush", None)
        if flush is not None:
            flush()
    return total


def compute_similarity_map(source, target, options: TransferOptions | None = None, *, lora: LoraModel | None = None,
                           source_keys=None, cache: SubspaceCache | None = None, progress: Progress = None,
                           should_stop: ShouldStop = None, _extra_total: int = 0) -> SubspaceMap:
    """Score every candidate pair for the LoRA's layers (``lora``), the given ``source_keys``, or every
    source layer of a known role. With ``lora``, each candidate's energy kept is recorded too; a LoRA, source or
    target the transfer does not expect is refused first (files/compatibility.py)."""
    if lora is not None:
        check_transfer_inputs(lora, source, target)
    options = options or TransferOptions()
    t0 = time.perf_counter()
    cache = cache if cache is not None else SubspaceCache()
    before = replace(cache.stats)
    smap = SubspaceMap(source, target, cache, options, TargetIndex(target))
    if lora is not None:
        keys = sorted(lora.layers)
    else:
        keys = list(source_keys) if source_keys is not None else default_source_keys(source)
    _plan_entries(smap, keys, lora)
    if options.mode != "direct":
        smap.steps = _score(smap, keys, lora, progress, should_stop, extra_total=_extra_total)
    smap.seconds = time.perf_counter() - t0
    smap.cache_stats = _stats_delta(before, cache.stats)
    return smap


# --------------------------------------------------------------------------------------------- projection

def _output_architecture(arch: str) -> str:
    # SSD-1B and Vega load SDXL LoRAs (their blocks are a subset of SDXL's)
    return "sdxl" if arch in ("sdxl", "ssd1b", "vega") else ("sd1" if arch == "sd1" else "unknown")


_STALE_METADATA = ("ss_base_model_version", "ss_network_dim", "ss_network_alpha", "ss_network_module",
                   "ss_network_args", "modelspec.", "lorax.")


def _choose(smap: SubspaceMap, opts: TransferOptions, lora: LoraModel, keys: list[str]
            ) -> dict[str, tuple[dict[str, float], dict[str, str]]]:
    """{source key: ({chosen target: strength}, {other target: reason})} for every layer with candidates."""
    out = {}
    live = [k for k in keys if not smap.entries[k].candidates.reason
            and layer_fits(lora.layers[k], smap.entries[k].candidates.source_shape)]
    if opts.mode == "direct":
        return {k: ({smap.entries[k].candidates.targets[0][0]: 1.0}, {}) for k in live}
    if opts.policy != "best":
        for k in live:
            entry = smap.entries[k]
            out[k] = select(k, [(t, entry.similarities[t].score) for t, _ in entry.candidates.targets],
                            opts.policy, opts.threshold)
        return out
    units: dict[str, list] = {}
    for k in live:
        entry = smap.entries[k]
        sims = {t: (entry.similarities[t].score, entry.similarities[t].unscored) for t, _ in entry.candidates.targets}
        units.setdefault(unit_of(entry.candidates.source), []).append((lora.layers[k].energy(), sims))
    chosen_units = select_units(units)
    for k in live:
        entry = smap.entries[k]
        best_unit, _ = chosen_units[unit_of(entry.candidates.source)]
        chosen, reasons = {}, {}
        for t, _ in entry.candidates.targets:
            score = entry.similarities[t].score
            if unit_of(parse_key(t)) != best_unit:
                reasons[t] = NOT_BEST_UNIT
            elif score < opts.threshold:
                reasons[t] = DROP_BELOW_THRESHOLD
            else:
                chosen[t] = 1.0
        out[k] = (chosen, reasons)
    return out


def _shared_blocks(assignments: dict[str, list[tuple[str, float]]]) -> dict[str, list[str]]:
    """{target unit: source units} for every target unit that receives several source units (updates add)."""
    landed: dict[str, set[str]] = {}
    for t, parts in assignments.items():
        for s, _ in parts:
            landed.setdefault(unit_of(parse_key(t)), set()).add(unit_of(parse_key(s)))
    return {tunit: sorted(srcs) for tunit, srcs in sorted(landed.items()) if len(srcs) > 1}


def _project_pair(layer: LoraLayer, mode: str, sim: LayerSimilarity | None, source_basis, target_basis,
                  shape) -> tuple[LoraLayer, str, float | None, float | None]:
    """One source layer on one target weight: (projected layer, operator used, w_U, w_V)."""
    if mode == "direct":
        return pass_through(layer, shape), "direct", None, None
    if passes_through(mode, sim.identical):
        return pass_through(layer, shape), IDENTITY_OPERATOR, 1.0, 1.0
    if mode == "subspace":
        return project_subspace(layer, target_basis, shape), "subspace", None, None
    w_u, w_v = side_weights(mode, sim)
    return project_sidewise(layer, source_basis, target_basis, shape, w_u, w_v), mode, w_u, w_v


def project(lora: LoraModel, subspace_map: SubspaceMap, options: TransferOptions | None = None, *,
            progress: Progress = None, should_stop: ShouldStop = None, _offset: int = 0) -> tuple[LoraModel, Report]:
    """Select targets (policy, threshold) and project ``lora`` through ``subspace_map``.

    ``options`` may change policy, threshold, mode and output rank; rank, method and device are the map's.
    Layers of the LoRA the map has not scored yet are scored now. Every applied pair is scored again on the
    projection bases (exact, or float32-Gram within METHOD §2b's bounds): that score is the one reported and the
    one ``auto`` weights with; a screening estimate that was off by more than :data:`ESTIMATE_TOLERANCE` is noted.
    """
    smap = subspace_map
    check_transfer_inputs(lora, smap.source, smap.target)
    opts = smap.options if options is None else replace(
        options, rank=smap.options.rank, method=smap.options.method, device=smap.options.device,
        oversample=smap.options.oversample, power_iters=smap.options.power_iters, seed=smap.options.seed)
    t0 = time.perf_counter()
    before = replace(smap.cache.stats)
    source, target, cache = smap.source, smap.target, smap.cache
    if opts.mode != smap.options.mode and "direct" in (opts.mode, smap.options.mode):
        # direct matches by name, the others by similarity: re-plan every layer for the new mode
        smap = replace(smap, options=opts, entries={})
    missing = [k for k in lora.layers if k not in smap.entries]
    if missing:
        _plan_entries(smap, missing, lora)
    if opts.mode != "direct":
        rescore = [k for k in lora.layers if smap.entries[k].candidates.targets and (
            k in missing or len(smap.entries[k].similarities) < len(smap.entries[k].candidates.targets))]
        if rescore:
            _score(smap, rescore, None, None, should_stop)

    keys = sorted(lora.layers, key=lambda k: (smap.entries[k].candidates.source.order, k))
    decisions = _choose(smap, opts, lora, keys)
    records: dict[str, LayerRecord] = {}
    cand_records: dict[tuple[str, str], CandidateRecord] = {}
    assignments: dict[str, list[tuple[str, float]]] = {}
    for key in keys:
        entry, layer = smap.entries[key], lora.layers[key]
        cands = entry.candidates
        rec = LayerRecord(key, cands.stage, cands.source.block, cands.source.role, list(layer.weight_shape),
                          layer.rank, layer.energy())
        records[key] = rec
        if key not in decisions:
            # a map scored without this LoRA knows the source's shapes, not the LoRA's
            rec.reason = cands.reason or DROP_NOT_IN_SOURCE
            continue
        chosen, reasons = decisions[key]
        lfp = entry.energy_layer
        known = entry.energies if lfp is not None and lfp == layer_fingerprint(layer) else {}
        for t, compat in cands.targets:
            sim = entry.similarities.get(t)
            c = CandidateRecord(t, compat, similarity_dict(sim) if sim else None, known.get(t),
                                t in chosen, chosen.get(t, 0.0), reasons.get(t),
                                energy_from_screening=t in known)
            rec.candidates.append(c)
            cand_records[(key, t)] = c
        if chosen:
            rec.applied = True
            for t, strength in chosen.items():
                assignments.setdefault(t, []).append((key, strength))
        else:
            rec.reason = (DROP_NOT_IN_UNIT if reasons and all(r == NOT_BEST_UNIT for r in reasons.values())
                          else DROP_BELOW_THRESHOLD)

    proj_spec = opts.projection_spec()
    out_layers: dict[str, LoraLayer] = {}
    targets: list[TargetRecord] = []
    tick = _ticker(progress, should_stop, len(assignments), _offset, _offset + len(assignments))
    order = sorted(assignments, key=lambda k: (parse_key(k).order, k))
    bases = (cache.get_many(target, order, proj_spec, opts.device) if opts.mode != "direct"
             else ((t, None) for t in order))
    off_estimates = 0
    # applied pairs are scored on the projection bases; those scores are kept with the screening ones, so a warm
    # or batch run computes neither again
    if cache.pairs is None:
        cache.pairs = PairStore(cache.directory)
    store, proj_id = cache.pairs, f"v{ALGORITHM_VERSION}|{proj_spec.describe()}"
    with closing(bases):
        for t, basis_t in bases:
            shape = tuple(target.shape(t))
            parts = []
            for s, strength in assignments[t]:
                layer, c = lora.layers[s], cand_records[(s, t)]
                sim, basis_s = smap.entries[s].similarities.get(t), None
                if opts.mode != "direct" and not sim.identical:
                    if opts.mode != "subspace":        # the side-wise operator needs the source's subspaces
                        basis_s = cache.get(source, s, proj_spec, opts.device)
                    fp_s, fp_t = source.fingerprint(s), target.fingerprint(t)
                    exact = store.get(fp_s, fp_t, proj_id)
                    if exact is None:
                        basis_s = basis_s or cache.get(source, s, proj_spec, opts.device)
                        exact = layer_similarity(basis_s, basis_t)
                        store.put(fp_s, fp_t, proj_id, exact)
                    if sim.estimate and abs(exact.score - sim.score) > ESTIMATE_TOLERANCE:
                        off_estimates += 1
                        c.estimate_error = exact.score - sim.score
                    sim = exact
                    c.similarity = similarity_dict(sim)
                out, c.operator, c.w_u, c.w_v = _project_pair(layer, opts.mode, sim, basis_s, basis_t, shape)
                c.energy_kept, c.energy_from_screening = energy_fraction(layer, out), False
                c.change = relative_change(layer, out)
                parts.append((out, strength))
            combined = combine(parts, shape)
            cap_kept = 1.0
            if opts.output_rank is not None and combined.rank > opts.output_rank:
                combined, cap_kept = compress(combined, max_rank=opts.output_rank)
            out_layers[t] = combined
            targets.append(TargetRecord(t, combined.rank, [s for s, _ in assignments[t]], cap_kept,
                                        combined.energy()))
            tick()

    store.flush()
    for rec in records.values():
        applied = [c for c in rec.candidates if c.applied]
        kept = [c.energy_kept for c in applied if c.energy_kept is not None]
        rec.energy_kept = sum(kept) / len(kept) if kept else 0.0
        rec.targets_received = len(applied)
        rec.total_strength = sum(c.strength for c in applied)

    seconds = {"similarity": round(smap.seconds, 3), "projection": round(time.perf_counter() - t0, 3)}
    cache_stats = {"similarity": smap.cache_stats, "projection": _stats_delta(before, cache.stats)}
    mode_label = opts.mode if opts.mode != "direct" else "direct (baseline: name match, no projection)"
    report = Report(source.name, target.name, source.architecture, target.architecture, mode_label,
                    opts.as_dict(), list(records.values()), targets, seconds, cache_stats)
    if any(c.compat == "embed" and c.applied for r in report.layers for c in r.candidates):
        report.notes.append("note: cross-attention k/v were embedded into the CLIP-L slot of the wider context "
                            "(METHOD §3); SD1.5 conditions on CLIP-L's last layer, SDXL on its penultimate one.")
    if any(r.reason == DROP_UNUSED_BY_TARGET for r in report.layers):
        report.notes.append("note: layers of the text encoders' last layer are not applied: the target conditions "
                            "on the penultimate layer, so they would have no effect (METHOD §3).")
    report.shared_blocks = _shared_blocks(assignments)
    report.notes.extend(f"note: {len(srcs)} source blocks land on target block {tunit} and their updates add: "
                        f"{', '.join(srcs)}" for tunit, srcs in report.shared_blocks.items())
    if off_estimates:
        report.notes.append(f"note: {off_estimates} applied pair(s) scored more than {ESTIMATE_TOLERANCE} away from "
                            "their screening estimate; the choice among candidates may differ from --exact.")
    if opts.mode == "direct":
        report.notes.append("note: direct mode is the baseline a stock loader applies; it does not project.")

    metadata = {k: v for k, v in lora.metadata.items() if not k.startswith(_STALE_METADATA)}
    metadata.update(report.metadata())
    result = LoraModel(out_layers, _output_architecture(target.architecture), "lorax-transfer", metadata,
                       None, (), [*lora.notes, *report.notes])
    return result, report


def transfer(lora: LoraModel, source, target, options: TransferOptions | None = None, *,
             cache: SubspaceCache | None = None, progress: Progress = None,
             should_stop: ShouldStop = None) -> tuple[LoraModel, Report]:
    """Carry ``lora`` (trained on ``source``) over to ``target``: similarity map, then projection."""
    options = options or TransferOptions()
    n = len(lora.layers)
    smap = compute_similarity_map(source, target, options, lora=lora, cache=cache, progress=progress,
                                  should_stop=should_stop, _extra_total=n)
    return project(lora, smap, options, progress=progress, should_stop=should_stop, _offset=smap.steps)
