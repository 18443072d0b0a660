"""LoRA-X transfer: similarity map of two base models, then projection of a LoRA through it (METHOD.md).

Two steps, callable separately (the ComfyUI nodes do) or together (:func:`transfer`):

1. :func:`compute_similarity_map` finds every source layer's candidate target layers (matching.py) and what is
   known of each pair's score (similarity.py): from the pair store of earlier runs; from the values (a same-shape
   pair whose weights are equal after casting both to the lower precision is identical, METHOD §2: score 1, no
   basis); and, unless the caller asks for only what decisions need (``complete=False``, as :func:`transfer`
   does), from a screening sketch of every other pair.
2. :func:`project` makes the matching decisions (:func:`~lorax_engine.analysis.matching.decide`) on that
   evidence (METHOD §2b): an estimate only rules a pair out, by its upper bound; whatever may pass the threshold or
   lead a block is scored exactly (whole spectra, subspaces.py; its spectra are needed to project it anyway), and
   the decision made again, until every decision stands on evidence that settles it. Candidates whose upper bound
   is below the threshold, or below the leading block's exact score, never get an exact score; candidates whose
   screening could settle nothing (the threshold off, and a leader scoring below the bound a sketch at chance
   leaves, as unrelated SD1.5 and SDXL weights do) are scored exactly without a sketch first. Applied pairs are
   then projected on the factors (operators.py) with the spectra of both weights, several updates of one target
   weight combined.

``method="fast"`` (default) screens with sketches (bfloat16 products where the hardware has them), and scores
exactly and projects with whole spectra (float64 throughout; subspaces.py). ``method="exact"`` has no estimates:
every candidate a decision needs is scored from such spectra.

Work runs stage by stage (side, width): a stage's source bases are held, its target candidates stream through
one at a time, so memory stays at one stage plus the cache's LRU budget. Long loops call ``progress(done, total)``
and ``should_stop()`` (which may raise, or return True to cancel with :class:`TransferCancelled`). A step is one
basis or spectrum to fetch or compute, or one target weight to write; the total grows when decisions turn out to
need more, and a decision settled without a basis costs no step.
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
    UNKNOWN,
    Candidates,
    Evidence,
    LayerChoice,
    LayerRef,
    TargetIndex,
    check_policy,
    decide,
    parse_key,
    unit_of,
)
from ..analysis.similarity import (
    LayerSimilarity,
    PairStore,
    identical_after_cast,
    identical_pair_similarity,
    layer_similarity,
    screening_floor,
    similarity_dict,
)
from ..analysis.subspaces import (
    ALGORITHM_VERSION,
    DEFAULT_RANK,
    CacheStats,
    SubspaceCache,
    SubspaceSpec,
    fast_sketch_dtype,
    matrix_shape,
)
from ..errors import LoraXError, TransferOptionError
from ..files.base_weights import prefetch_fingerprints, tensor_fingerprint
from ..files.compatibility import check_transfer_inputs, layer_fits
from ..files.lora import LoraLayer, LoraModel
from ..reports.report import IDENTITY_OPERATOR, CandidateRecord, LayerRecord, Report, TargetRecord
from .operators import (
    DEFAULT_MODE,
    SIDEWISE_MODES,
    check_mode,
    combine,
    compress,
    energy_fraction,
    pass_through,
    passes_through,
    project_soft,
    project_subspace,
    projected_energy,
    relative_change,
    soft_overlaps,
    soft_weights,
)

TRANSFER_METHODS = ("fast", "exact")

Progress = Callable[[int, int], None] | None
ShouldStop = Callable[[], bool] | None


class TransferCancelled(LoraXError):
    """The caller's ``should_stop`` hook asked to stop."""


@dataclass(frozen=True)
class TransferOptions:
    """Every choice of the method, with its default. See METHOD.md and the module docstrings."""

    rank: int = DEFAULT_RANK             # r of the subspaces (the paper's 320) and the soft knee's centre
    method: str = "fast"                 # "fast": sketches to screen, spectra to decide and project; "exact"
    threshold: float = DEFAULT_THRESHOLD  # on the normalised score; -inf applies every candidate
    policy: str = DEFAULT_POLICY         # "best" | "all-above-threshold" | "spread"
    mode: str = DEFAULT_MODE             # "auto" | "subspace" | "subspace+null" | "direct" (baseline)
    output_rank: int | None = None       # cap: truncated SVD of each output layer on its factors
    device: str = "cpu"                  # where bases are computed ("cuda" when available)
    oversample: int = 96                 # screening sketches: extra columns
    power_iters: int = 1                 # screening sketches: subspace iterations
    seed: int = 0                        # screening sketches: seed

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
            return self.exact_spec()
        return SubspaceSpec(self.rank, "randomized", self.oversample, self.power_iters, self.seed,
                            fast_sketch_dtype(self.device))

    def exact_spec(self) -> SubspaceSpec:
        """The spectra that exact scores and the projection use."""
        return SubspaceSpec(self.rank, "exact" if self.method == "exact" else "gram")

    def pair_id(self, spec: SubspaceSpec) -> str:
        """What a stored pair score depends on: the algorithm, how its bases were computed, and r."""
        return f"v{ALGORITHM_VERSION}|{spec.describe()}|r={self.rank}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["threshold"] = self.threshold if math.isfinite(self.threshold) else str(self.threshold)
        return d


class _Steps:
    """Progress over work whose total grows as decisions find they need more, and the stop hook."""

    def __init__(self, progress: Progress, should_stop: ShouldStop):
        self.progress, self.should_stop = progress, should_stop
        self.done = self.total = 0

    def add(self, n: int):
        self.total += n
        if self.progress is not None and n:
            self.progress(self.done, self.total)

    def check(self):
        if self.should_stop is not None and self.should_stop():
            raise TransferCancelled("transfer cancelled")

    def tick(self):
        self.check()
        self.done = min(self.done + 1, self.total)
        if self.progress is not None:
            self.progress(self.done, self.total)


# --------------------------------------------------------------------------------------------- the map

@dataclass
class MapEntry:
    candidates: Candidates
    similarities: dict[str, LayerSimilarity] = field(default_factory=dict)   # target key -> what is known
    energy_layer: str | None = None                                         # fingerprint of the LoRA layer
    # target key -> (share of the LoRA layer's energy inside the target's top-r subspaces, from a sketch?)
    energies: dict[str, tuple[float, bool]] = field(default_factory=dict)


def layer_fingerprint(layer: LoraLayer) -> str:
    return f"{tensor_fingerprint(layer.up)}|{tensor_fingerprint(layer.down)}|{float(layer.alpha)!r}"


@dataclass
class SubspaceMap:
    """What is known of every (source layer, candidate target layer) pair, plus what is needed to project.

    Holds the two weight providers and the cache, so :func:`project` can refine scores and fetch spectra later.
    ``work`` counts candidate pairs by how they were settled (see :func:`work_counts`).
    """

    source: object
    target: object
    cache: SubspaceCache
    options: TransferOptions
    index: TargetIndex
    entries: dict[str, MapEntry] = field(default_factory=dict)
    seconds: float = 0.0
    cache_stats: dict = field(default_factory=dict)
    identical_by_value: set = field(default_factory=set)    # (source, target) pairs found equal on their values

    def refs(self) -> list[LayerRef]:
        return sorted((e.candidates.source for e in self.entries.values()), key=lambda r: (r.order, r.key))

    def plot_rows(self) -> list[dict]:
        """Per source layer: block grouping and candidate scores (for plot.py)."""
        rows = []
        for ref in self.refs():
            entry = self.entries[ref.key]
            scores = [s.score for s in entry.similarities.values() if not s.unscored]
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
                "work": work_counts(self), "layers": layers}


def work_counts(smap: SubspaceMap, keys=None) -> dict[str, int]:
    """Candidate pairs of ``keys`` (default: all) by how far their score had to be computed: found identical on
    their values (no basis), decided on a screening estimate's bound, scored exactly, or never needed."""
    counts = {"candidate_pairs": 0, "identical_by_value": 0, "decided_on_estimate": 0, "scored_exactly": 0,
              "not_needed": 0}
    for key in (smap.entries if keys is None else keys):
        entry = smap.entries[key]
        for t, _ in entry.candidates.targets:
            sim = entry.similarities.get(t)
            counts["candidate_pairs"] += 1
            if sim is None:
                counts["not_needed"] += 1
            elif (key, t) in smap.identical_by_value:
                counts["identical_by_value"] += 1
            elif sim.estimate:
                counts["decided_on_estimate"] += 1
            else:
                counts["scored_exactly"] += 1
    return counts


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


def _store(smap: SubspaceMap) -> PairStore:
    if smap.cache.pairs is None:
        smap.cache.pairs = PairStore(smap.cache.directory)
    return smap.cache.pairs


def _pairs(smap: SubspaceMap, keys) -> list[tuple[str, str]]:
    return [(s, t) for s in keys for t, _ in smap.entries[s].candidates.targets]


def _recall(smap: SubspaceMap, pairs):
    """What earlier runs settled: exact scores (and identities) first, then screening estimates."""
    store, opts = _store(smap), smap.options
    ids = [opts.pair_id(opts.exact_spec()), opts.pair_id(opts.screening_spec())]
    for s, t in pairs:
        entry = smap.entries[s]
        if t in entry.similarities:
            continue
        fp_s, fp_t = smap.source.fingerprint(s), smap.target.fingerprint(t)
        for pid in ids:
            sim = store.get(fp_s, fp_t, pid)
            if sim is not None:
                entry.similarities[t] = sim
                if sim.identical:
                    smap.identical_by_value.add((s, t))
                break


def _settle(smap: SubspaceMap, store, pid: str, s: str, t: str, sim: LayerSimilarity, fp_s=None, fp_t=None):
    """Keep a pair's score in the map and, under ``pid``, in the pair store (later runs recall it)."""
    smap.entries[s].similarities[t] = sim
    store.put(fp_s or smap.source.fingerprint(s), fp_t or smap.target.fingerprint(t), pid, sim)


def _first_row(weights, key: str) -> torch.Tensor:
    row = getattr(weights, "first_row", None)
    return row(key) if row is not None else weights.matrix(key)[0]


def _rows_may_match(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Necessary for :func:`identical_after_cast`: the rows agree in float16, bfloat16 or as they are (compared on
    the host: one row each, and the two models may sit on different devices)."""
    a, b = a.cpu(), b.cpu()
    return torch.equal(a.half(), b.half()) or torch.equal(a.bfloat16(), b.bfloat16()) or torch.equal(a, b)


def _identify_by_value(smap: SubspaceMap, pairs):
    """Same-shape pairs equal after casting both to the lower precision are identical (METHOD §2): score 1, no
    basis. Equal fingerprints settle it at once; otherwise the first rows are compared before whole weights, so
    an unrelated pair costs one row of each."""
    source, target, opts = smap.source, smap.target, smap.options
    store, pid = _store(smap), opts.pair_id(opts.exact_spec())
    rows: dict[tuple[int, str], torch.Tensor] = {}

    def row(weights, key):
        k = (id(weights), key)
        if k not in rows:
            rows[k] = _first_row(weights, key)
        return rows[k]

    for s, t in pairs:
        entry = smap.entries[s]
        shape = matrix_shape(source.shape(s))
        if t in entry.similarities or shape != matrix_shape(target.shape(t)):
            continue
        fp_s, fp_t = source.fingerprint(s), target.fingerprint(t)
        if fp_s != fp_t and not (_rows_may_match(row(source, s), row(target, t))
                                 and identical_after_cast(source.matrix(s), target.matrix(t))):
            continue
        _settle(smap, store, pid, s, t, identical_pair_similarity(shape, opts.rank), fp_s, fp_t)
        smap.identical_by_value.add((s, t))


def _by_stage(smap: SubspaceMap, pairs) -> list[tuple[list[str], dict[str, list[str]]]]:
    """Pairs grouped by stage: (source keys, {target key: its sources}), targets in model order."""
    stages: dict[tuple, dict[str, list[str]]] = {}
    for s, t in pairs:
        ref = smap.entries[s].candidates.source
        stages.setdefault((ref.order[0], smap.entries[s].candidates.stage), {}).setdefault(t, []).append(s)
    out = []
    for stage in sorted(stages):
        by_target = stages[stage]
        sources = sorted({s for ss in by_target.values() for s in ss})
        out.append((sources, {t: by_target[t] for t in sorted(by_target, key=lambda k: parse_key(k).order)}))
    return out


def _score_pairs(smap: SubspaceMap, pairs, spec: SubspaceSpec, steps: _Steps, lora: LoraModel | None = None):
    """Score ``pairs`` from bases of ``spec`` (screening sketches, or spectra for exact scores), stage by stage,
    and keep the scores in the map and the pair store. With ``lora``, the share of each LoRA layer's energy inside
    its candidate's top-r subspaces (Eq. 3) is recorded while the target's basis is at hand."""
    opts, cache, store = smap.options, smap.cache, _store(smap)
    source, target, device = smap.source, smap.target, opts.device
    pid = opts.pair_id(spec)
    # overlaps of sketches run in bfloat16 where the device multiplies it natively (subspaces.Basis.to)
    product_dtype = getattr(torch, fast_sketch_dtype(device)) if spec.method == "randomized" else torch.float32
    plans = _by_stage(smap, pairs)
    prefetch_fingerprints(source, [s for sources, _ in plans for s in sources])
    prefetch_fingerprints(target, [t for _, by_target in plans for t in by_target])
    steps.add(sum(len(sources) + len(by_target) for sources, by_target in plans))
    for sources, by_target in plans:
        held = {}
        with closing(cache.get_many(source, sources, spec, device)) as fetched:
            for s, basis in fetched:
                held[s] = basis.top(opts.rank).to(device).to(product_dtype)
                steps.tick()
        with closing(cache.get_many(target, list(by_target), spec, device)) as fetched:
            for t, basis in fetched:
                top = basis.top(opts.rank).to(device)
                screen_t = top.to(product_dtype)
                fp_t = target.fingerprint(t)
                for s in by_target[t]:
                    entry = smap.entries[s]
                    _settle(smap, store, pid, s, t, layer_similarity(held[s], screen_t), fp_t=fp_t)
                    if lora is not None:
                        layer = lora.layers[s]
                        lfp = layer_fingerprint(layer)
                        if entry.energy_layer != lfp:
                            entry.energy_layer, entry.energies = lfp, {}
                        entry.energies[t] = (projected_energy(layer, top.to(layer.up.device)), top.estimate)
                del top, screen_t
                steps.tick()
        del held
    store.flush()
    for provider in (source, target):
        flush = getattr(provider, "flush", None)
        if flush is not None:
            flush()


def _gather(smap: SubspaceMap, keys, lora, steps: _Steps, complete: bool):
    """Plan ``keys`` not in the map yet and learn what is cheap to know of their pairs (module docstring, step 1)."""
    new = [k for k in keys if k not in smap.entries]
    _plan_entries(smap, new, lora)
    if smap.options.mode == "direct":
        return
    pairs = _pairs(smap, keys)
    prefetch_fingerprints(smap.source, sorted({s for s, _ in pairs}))
    prefetch_fingerprints(smap.target, sorted({t for _, t in pairs}))
    _recall(smap, pairs)
    steps.check()
    _identify_by_value(smap, pairs)
    if complete:
        unknown = [(s, t) for s, t in pairs if t not in smap.entries[s].similarities]
        _score_pairs(smap, unknown, smap.options.screening_spec(), steps, lora)


def compute_similarity_map(source, target, options: TransferOptions | None = None, *, lora: LoraModel | None = None,
                           source_keys=None, cache: SubspaceCache | None = None, progress: Progress = None,
                           should_stop: ShouldStop = None, complete: bool = True,
                           _steps: _Steps | None = None) -> SubspaceMap:
    """What is known of every candidate pair for the LoRA's layers (``lora``), the given ``source_keys``, or every
    source layer of a known role: with ``complete``, every pair screened (the similarity plot shows them all);
    without, only what is cheap (:func:`project` refines what its decisions need). With ``lora``, the energy each
    screened candidate's subspaces hold is recorded too. A LoRA, source or target the transfer does not expect is
    refused first (files/compatibility.py)."""
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
    _gather(smap, keys, lora, _steps or _Steps(progress, should_stop), complete)
    smap.seconds = time.perf_counter() - t0
    smap.cache_stats = _stats_delta(before, cache.stats)
    return smap


# --------------------------------------------------------------------------------------------- decisions

def _output_architecture(arch: str) -> str:
    # SSD-1B and Vega load SDXL LoRAs (their blocks are a subset of SDXL's)
    return "sdxl" if arch in ("sdxl", "ssd1b", "vega") else ("sd1" if arch == "sd1" else "unknown")


_STALE_METADATA = ("ss_base_model_version", "ss_network_dim", "ss_network_alpha", "ss_network_module",
                   "ss_network_args", "modelspec.", "lorax.")


def _evidence(sim: LayerSimilarity | None, floor: float) -> Evidence:
    if sim is None:
        return replace(UNKNOWN, floor=floor)
    return Evidence(sim.upper, not sim.estimate, sim.identical, sim.unscored)


def _decide(smap: SubspaceMap, opts: TransferOptions, lora: LoraModel, live: list[str], energies: dict[str, float],
            steps: _Steps):
    """Decisions on evidence that settles them: the pairs a decision needs are screened (unknown) or scored exactly
    (estimates, and unknown pairs that screening could not settle), and the decision made again (module
    docstring)."""
    floors = {k: screening_floor(matrix_shape(smap.entries[k].candidates.source_shape), opts.rank) for k in live}
    while True:
        layers = {k: LayerChoice(smap.entries[k].candidates.source, energies[k],
                                 {t: _evidence(smap.entries[k].similarities.get(t), floors[k])
                                  for t, _ in smap.entries[k].candidates.targets}) for k in live}
        decisions = decide(layers, opts.policy, opts.threshold)
        if not decisions.needs:
            return decisions
        screen = sorted(p for p in decisions.needs - decisions.score_now
                        if p[1] not in smap.entries[p[0]].similarities)
        if screen:
            _score_pairs(smap, screen, opts.screening_spec(), steps, lora)
        exact = decisions.score_now if screen else decisions.needs
        if exact:
            _score_pairs(smap, sorted(exact), opts.exact_spec(), steps, lora)


# --------------------------------------------------------------------------------------------- projection

def _shared_blocks(assignments: dict[str, list[tuple[str, float]]]) -> dict[str, list[str]]:
    """{target unit: source units} for every target unit that receives several source units (updates add)."""
    landed: dict[str, set[str]] = {}
    for t, parts in assignments.items():
        for s, _ in parts:
            landed.setdefault(unit_of(parse_key(t)), set()).add(unit_of(parse_key(s)))
    return {tunit: sorted(srcs) for tunit, srcs in sorted(landed.items()) if len(srcs) > 1}


def project(lora: LoraModel, subspace_map: SubspaceMap, options: TransferOptions | None = None, *,
            progress: Progress = None, should_stop: ShouldStop = None,
            _steps: _Steps | None = None) -> tuple[LoraModel, Report]:
    """Decide (policy, threshold; module docstring) and project ``lora`` through ``subspace_map``.

    ``options`` may change policy, threshold, mode and output rank; rank, method and device are the map's. Layers
    of the LoRA the map does not know yet are gathered now. Every applied pair (but identical ones) gets its exact
    score on the spectra it is projected with: the one reported.
    """
    smap = subspace_map
    check_transfer_inputs(lora, smap.source, smap.target)
    opts = smap.options if options is None else replace(
        options, rank=smap.options.rank, method=smap.options.method, device=smap.options.device,
        oversample=smap.options.oversample, power_iters=smap.options.power_iters, seed=smap.options.seed)
    steps = _steps or _Steps(progress, should_stop)
    t0 = time.perf_counter()
    before = replace(smap.cache.stats)
    source, target, cache = smap.source, smap.target, smap.cache
    if opts.mode != smap.options.mode and "direct" in (opts.mode, smap.options.mode):
        # direct matches by name, the others by similarity: re-plan every layer for the new mode
        smap = replace(smap, options=opts, entries={}, identical_by_value=set())
    elif opts != smap.options:
        smap = replace(smap, options=opts)
    _gather(smap, sorted(lora.layers), lora, steps, complete=False)

    keys = sorted(lora.layers, key=lambda k: (smap.entries[k].candidates.source.order, k))
    live = [k for k in keys if not smap.entries[k].candidates.reason
            and layer_fits(lora.layers[k], smap.entries[k].candidates.source_shape)]
    energies = {k: lora.layers[k].energy() for k in keys}
    if opts.mode == "direct":
        chosen = {k: {smap.entries[k].candidates.targets[0][0]: 1.0} for k in live}
        reasons: dict[str, dict[str, str]] = {k: {} for k in live}
    else:
        decisions = _decide(smap, opts, lora, live, energies, steps)
        chosen, reasons = decisions.chosen, decisions.reasons
    records: dict[str, LayerRecord] = {}
    cand_records: dict[tuple[str, str], CandidateRecord] = {}
    assignments: dict[str, list[tuple[str, float]]] = {}
    for key in keys:
        entry, layer = smap.entries[key], lora.layers[key]
        cands = entry.candidates
        rec = LayerRecord(key, cands.stage, cands.source.block, cands.source.role, list(layer.weight_shape),
                          layer.rank, energies[key])
        records[key] = rec
        if key not in chosen:
            # a map scored without this LoRA knows the source's shapes, not the LoRA's
            rec.reason = cands.reason or DROP_NOT_IN_SOURCE
            continue
        mine, why = chosen[key], reasons.get(key, {})
        known = entry.energies if entry.energy_layer == layer_fingerprint(layer) else {}
        for t, compat in cands.targets:
            sim = entry.similarities.get(t)
            energy, from_sketch = known.get(t, (None, False))
            c = CandidateRecord(t, compat, similarity_dict(sim) if sim else None, energy, t in mine, mine.get(t, 0.0),
                                why.get(t), energy_from_sketch=from_sketch)
            rec.candidates.append(c)
            cand_records[(key, t)] = c
        if mine:
            rec.applied = True
            for t, strength in mine.items():
                assignments.setdefault(t, []).append((key, strength))
        else:
            rec.reason = (DROP_NOT_IN_UNIT if why and all(r == NOT_BEST_UNIT for r in why.values())
                          else next((r for r in why.values() if r != NOT_BEST_UNIT), DROP_BELOW_THRESHOLD))

    out_layers, targets, misses = _project_assignments(smap, opts, lora, assignments, cand_records, steps)
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
    report.work = work_counts(smap, keys)
    if any(c.compat == "embed" and c.applied for r in report.layers for c in r.candidates):
        report.notes.append("note: cross-attention k/v were embedded into the CLIP-L slot of the wider context "
                            "(METHOD §3); SD1.5 conditions on CLIP-L's last layer, SDXL on its penultimate one.")
    if any(r.reason == DROP_UNUSED_BY_TARGET for r in report.layers):
        report.notes.append("note: layers of the text encoders' last layer are not applied: the target conditions "
                            "on the penultimate layer, so they would have no effect (METHOD §3).")
    report.shared_blocks = _shared_blocks(assignments)
    report.notes.extend(f"note: {len(srcs)} source blocks land on target block {tunit} and their updates add: "
                        f"{', '.join(srcs)}" for tunit, srcs in report.shared_blocks.items())
    if misses:
        report.notes.append(f"warning: {misses} applied pair(s) scored exactly above the bound their screening "
                            "estimate promised (METHOD §2b); please report this with the two model files.")
    if opts.mode == "direct":
        report.notes.append("note: direct mode is the baseline a stock loader applies; it does not project.")

    metadata = {k: v for k, v in lora.metadata.items() if not k.startswith(_STALE_METADATA)}
    metadata.update(report.metadata())
    result = LoraModel(out_layers, _output_architecture(target.architecture), "lorax-transfer", metadata,
                       None, (), [*lora.notes, *report.notes])
    return result, report


def _project_assignments(smap: SubspaceMap, opts: TransferOptions, lora: LoraModel, assignments, cand_records,
                         steps: _Steps) -> tuple[dict[str, LoraLayer], list[TargetRecord], int]:
    """Project every applied pair and combine them per target weight: ``(layers, target records, bound
    misses)``. Identical pairs pass through with no spectrum; the others are projected with the spectra of both
    weights (``subspace``: the target's top-r), and get their exact score if they had none."""
    source, target, cache = smap.source, smap.target, smap.cache
    spec, store = opts.exact_spec(), _store(smap)
    pid = opts.pair_id(spec)
    order = sorted(assignments, key=lambda k: (parse_key(k).order, k))
    needs_spectrum = [t for t in order if opts.mode != "direct" and any(
        not passes_through(opts.mode, _identical(smap, s, t)) for s, _ in assignments[t])]
    steps.add(len(order))
    spectra = cache.get_many(target, needs_spectrum, spec, opts.device)
    out_layers: dict[str, LoraLayer] = {}
    records: list[TargetRecord] = []
    misses = 0
    with closing(spectra):
        pending = iter(spectra)
        for t in order:
            spectrum_t = next(pending)[1] if t in needs_spectrum else None
            shape = tuple(target.shape(t))
            parts = []
            for s, strength in assignments[t]:
                layer, c = lora.layers[s], cand_records[(s, t)]
                sim = smap.entries[s].similarities.get(t)
                identical = _identical(smap, s, t)
                spectrum_s = None
                if opts.mode != "direct" and not passes_through(opts.mode, identical) and (sim is None or sim.estimate):
                    # applied on a bound (or with no threshold at all): its exact score now, with its spectra
                    spectrum_s = cache.get(source, s, spec, opts.device)
                    exact = layer_similarity(spectrum_s.top(opts.rank), spectrum_t.top(opts.rank))
                    if sim is not None and exact.score > sim.upper + 1e-9:
                        misses += 1
                    _settle(smap, store, pid, s, t, exact)
                    c.similarity = similarity_dict(exact)
                overlaps = None
                if opts.mode in SIDEWISE_MODES and not identical:
                    spectrum_s = spectrum_s or cache.get(source, s, spec, opts.device)
                    exact = smap.entries[s].similarities[t]
                    if exact.soft is None and opts.mode == "auto":    # subspace+null weighs both sides fully
                        # kept with the exact score: warm and batch runs reuse it
                        exact = replace(exact, soft=soft_overlaps(spectrum_s, spectrum_t, opts.rank, opts.device))
                        _settle(smap, store, pid, s, t, exact)
                    overlaps = exact.soft
                out, c.operator, c.w_u, c.w_v = _project_pair(layer, opts, identical, spectrum_s, spectrum_t, shape,
                                                              overlaps)
                if c.operator == IDENTITY_OPERATOR:     # the update itself: nothing to measure
                    c.energy_kept, c.change = 1.0, 0.0
                else:
                    c.energy_kept, c.change = energy_fraction(layer, out), relative_change(layer, out)
                if spectrum_t is not None and (c.energy_in_target is None or c.energy_from_sketch):
                    # the target's spectrum is at hand in every run, warm ones too: an applied pair always shows it
                    c.energy_in_target = projected_energy(layer, spectrum_t.top(opts.rank))
                    c.energy_from_sketch = False
                parts.append((out, strength))
            combined = combine(parts, shape)
            cap_kept = 1.0
            if opts.output_rank is not None and combined.rank > opts.output_rank:
                combined, cap_kept = compress(combined, max_rank=opts.output_rank)
            out_layers[t] = combined
            records.append(TargetRecord(t, combined.rank, [s for s, _ in assignments[t]], cap_kept, combined.energy()))
            steps.tick()
    store.flush()
    return out_layers, records, misses


def _project_pair(layer: LoraLayer, opts: TransferOptions, identical: bool, spectrum_s, spectrum_t, shape,
                  overlaps: tuple[float, float] | None = None) -> tuple[LoraLayer, str, float | None, float | None]:
    """One source layer on one target weight: (projected layer, operator used, w_U, w_V); the soft operator
    weighs by the pair's soft ``overlaps``."""
    if opts.mode == "direct":
        return pass_through(layer, shape), "direct", None, None
    if passes_through(opts.mode, identical):
        return pass_through(layer, shape), IDENTITY_OPERATOR, 1.0, 1.0
    if opts.mode == "subspace":
        return project_subspace(layer, spectrum_t.top(opts.rank), shape), "subspace", None, None
    w_u, w_v = soft_weights(opts.mode, overlaps)
    return project_soft(layer, spectrum_s, spectrum_t, opts.rank, shape, w_u, w_v), opts.mode, w_u, w_v


def _identical(smap: SubspaceMap, s: str, t: str) -> bool:
    sim = smap.entries[s].similarities.get(t)
    return sim is not None and sim.identical


def transfer(lora: LoraModel, source, target, options: TransferOptions | None = None, *,
             cache: SubspaceCache | None = None, progress: Progress = None,
             should_stop: ShouldStop = None) -> tuple[LoraModel, Report]:
    """Carry ``lora`` (trained on ``source``) over to ``target``: what is cheap to know first, then only the scores
    and spectra its decisions and projections need."""
    options = options or TransferOptions()
    steps = _Steps(progress, should_stop)
    smap = compute_similarity_map(source, target, options, lora=lora, cache=cache, complete=False, _steps=steps)
    return project(lora, smap, options, _steps=steps)
