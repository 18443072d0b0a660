"""Which target layers may receive a source layer, and which of them do (METHOD.md §4).

A canonical key is parsed into a :class:`LayerRef`: *side* (``input`` / ``middle`` / ``output`` for the
UNet's three stacks, ``unet`` for its other weights, the text-encoder id ``clip_l`` / ``clip_g``), the
*block* it sits in (``input_blocks.4.1``, ``clip_l.layers.3``), the transformer-block *depth* index and
the *role* (``attn1.to_q``, ``ff.net.0.proj``, ``proj_in``, ``in_layers.2``, ``self_attn.q_proj``,
``mlp.fc1`` ...). Nothing here knows a model pair: SD1.5 -> SDXL, a model -> its fine-tune, SDXL ->
SSD-1B / Vega and CLIP-L -> CLIP-L all go through the same rules.

Candidates of a source layer: every target layer on the same side with the same role whose shape is
compatible: equal, or 1x1 conv ``[C, C, 1, 1]`` <-> linear ``[C, C]`` (``squeeze``), or, for the
cross-attention k/v that read the text context, a wider input to embed into (``embed``, §3). The *stage*
is (side, width): width is the layer's channel count (its output width, or its input width for the
up-projections ``ff.net.0.proj`` / ``mlp.fc1``). With no candidate a layer is dropped as
``no counterpart`` when the target has no layer of that role at that width on that side (SD1.5's
320-channel attention on SDXL), or ``shape`` when it has some but none fits.

Policies pick among the candidates by normalised similarity score (``score >= threshold`` passes):

* ``best`` (default, block-level, METHOD §4): each source *unit* (a transformer block ``input_blocks.4.1.tb0``,
  or the rest of a block: a resnet, a text-encoder layer) goes whole to the single target unit of its stage with
  the highest score over all its layers, weighted by the LoRA's energy per layer (equal weights without a LoRA),
  so q, k, v, out and ff of one block stay together. Ties: identical weights, then the target unit with the
  source's own name (identity layouts), then model order. Within the chosen unit each layer is applied if its own
  score passes; a layer whose role the chosen unit lacks is dropped.
* ``all-above-threshold``: every passing candidate, each at full strength.
* ``spread``: every passing candidate, each at strength 1 / (number applied), so the total is the source's.
  (METHOD says "every block of the stage"; we let the threshold gate it like the other policies.)

In every policy (METHOD §4, "kept together"): an attention's q and k pass together or not at all, tested as one
(both must pass, in the same target unit, at the same strength); a SpatialTransformer's proj_in / proj_out go to
the target blocks the transformer blocks they wrap went to (``best``: the block of the LoRA's heaviest one), when
the LoRA has those; the target's own unused layers (CLIP-L's last layer under SDXL) are no candidates.

Decisions are made on evidence (:class:`Evidence`: the most the exact score can be, similarity.py; exact or not): an
estimate only rules a candidate out, and whatever may pass or lead is scored exactly first; :func:`decide` names
the pairs to refine (METHOD §2b). Pairs nothing is known of are asked for as the decisions need them: a q/k pair one
member at a time, q first, since one member below the threshold fails both and the other then needs no basis (on
unrelated weights this spares every k its sketch). A pair whose screening could settle nothing is asked to be scored
exactly at once (:attr:`Decisions.score_now`): a screening estimate fails a pair only where its bound falls below
the threshold, and rules a ``best`` unit out only where its block score falls below the leader's exact one, which
is not to be expected where even a sketch scoring at chance leaves a bound above them (:attr:`Evidence.floor`).
With the threshold off and targets unrelated to the source (SD1.5 -> SDXL), every candidate a decision needs is
then scored exactly without first being sketched for nothing; ``best`` scores the target unit of the source's own
name first, the likely leader of an identity layout (a fine-tune), above which the other units' sketches do rule
them out. This decides only how a pair's evidence is sought; the decisions rest on the same exact scores.

Default threshold 0.05, on the chance-normalised score. Chance-level scores of independent r-dimensional
subspaces of R^d have standard deviation about sqrt(2) / d (measured: 0.0022 at d = 640, 0.0011 at 1280), so
the best of 30 candidates sits ~2 sd above 0. Measured on the zoo's independent SD1.5 and SDXL UNets (a
full-coverage rank-32 LoRA, 1714 candidate pairs): every score lay in [-0.0075, 0.0031], while a fine-tune
(3% drift) scores 0.97-0.98 and identical layers 1.0 (tests/test_transfer.py). 0.05 is thus 15x the highest
chance score seen, yet keeps any layer with real shared structure.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..errors import TransferOptionError
from .subspaces import matrix_shape

POLICIES = ("best", "all-above-threshold", "spread")
DEFAULT_POLICY = "best"
DEFAULT_THRESHOLD = 0.05
EMBED_ROLES = frozenset({"attn2.to_k", "attn2.to_v"})
UP_ROLES = frozenset({"ff.net.0.proj", "mlp.fc1"})
# The roles the method is specified for (METHOD §4); other weights a LoRA touches are matched by the same
# rules under their own path as role.
KNOWN_ROLES = frozenset({
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
    "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
    "in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection",
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"})
SIDE_ORDER = {"clip_l": 0, "clip_g": 1, "input": 2, "middle": 3, "output": 4, "unet": 5}

DROP_NO_COUNTERPART = "no counterpart"
DROP_BELOW_THRESHOLD = "below threshold"
DROP_SHAPE = "shape"
DROP_NOT_IN_SOURCE = "not in source model"
DROP_UNUSED_BY_TARGET = "unused by target"
DROP_NOT_IN_UNIT = "no counterpart in the chosen block"
NOT_BEST_UNIT = "another block scored higher"
# SDXL and its derivatives condition on the penultimate layer of both text encoders, so a LoRA's update of the
# last layer has no effect there (SD1.5 reads CLIP-L's last layer): such layers are reported, not applied.
SDXL_FAMILY = frozenset({"sdxl", "ssd1b", "vega"})
UNUSED_TEXT_LAYERS = {"clip_l": 11, "clip_g": 31}

_UNET = re.compile(r"^diffusion_model\.(?:(input_blocks|output_blocks)\.(\d+)\.(\d+)|middle_block\.(\d+))"
                   r"(?:\.(.+))?\.weight$")
_TEXT = re.compile(r"^(clip_[a-z]+)\.transformer\.(?:text_model\.encoder\.layers\.(\d+)\.(.+)|(.+))\.weight$")
_DEPTH = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class LayerRef:
    key: str
    side: str
    block: str
    order: tuple
    depth: int | None
    role: str


def unit_of(ref: LayerRef) -> str:
    """The unit that ``best`` moves whole: a transformer block, or the rest of a block (METHOD §4)."""
    return ref.block if ref.depth is None else f"{ref.block}.tb{ref.depth}"


def unused_by_target(ref: LayerRef, target_architecture: str) -> bool:
    """A text-encoder layer the target model never reads (its last layer, under SDXL's penultimate-layer use)."""
    if target_architecture not in SDXL_FAMILY or ref.side not in UNUSED_TEXT_LAYERS:
        return False
    return ref.block == f"{ref.side}.layers.{UNUSED_TEXT_LAYERS[ref.side]}"


def parse_key(key: str) -> LayerRef | None:
    """The position and role of a canonical weight key; None for keys that are not ``.weight`` of a model."""
    m = _UNET.match(key)
    if m:
        stack, n, sub, mid, rest = m.groups()
        if stack:
            side, block, order = stack.split("_")[0], f"{stack}.{n}.{sub}", (int(n), int(sub))
        else:
            side, block, order = "middle", f"middle_block.{mid}", (0, int(mid))
        depth = None
        if rest:
            d = _DEPTH.match(rest)
            if d:
                depth, rest = int(d.group(1)), d.group(2)
        return LayerRef(key, side, block, (SIDE_ORDER[side], *order, depth or 0), depth, rest or "conv")
    m = _TEXT.match(key)
    if m:
        enc, layer, role, other = m.groups()
        if layer is not None:
            return LayerRef(key, enc, f"{enc}.layers.{layer}", (SIDE_ORDER.get(enc, 6), int(layer), 0), None, role)
        return LayerRef(key, enc, f"{enc}.other", (SIDE_ORDER.get(enc, 6), 10_000, 0), None, other)
    if key.startswith("diffusion_model.") and key.endswith(".weight"):
        path = key[len("diffusion_model."):-len(".weight")]
        return LayerRef(key, "unet", path.split(".")[0], (SIDE_ORDER["unet"], 0, 0), None, path)
    return None


def width(ref: LayerRef, shape) -> int:
    m, n = matrix_shape(shape)
    return n if ref.role in UP_ROLES else m


def stage_label(ref: LayerRef, shape) -> str:
    return f"{ref.side}@{width(ref, shape)}"


def _pointwise(shape) -> bool:
    return len(shape) == 2 or (len(shape) == 4 and tuple(shape[2:]) == (1, 1))


def compatibility(role: str, source_shape, target_shape) -> str | None:
    """How a source weight's update fits a target weight: "same", "squeeze", "embed", or None."""
    source_shape, target_shape = tuple(source_shape), tuple(target_shape)
    if source_shape == target_shape:
        return "same"
    (ms, ns), (mt, nt) = matrix_shape(source_shape), matrix_shape(target_shape)
    if (ms, ns) == (mt, nt) and _pointwise(source_shape) and _pointwise(target_shape):
        return "squeeze"
    if role in EMBED_ROLES and ms == mt and ns < nt and len(source_shape) == 2 and len(target_shape) == 2:
        return "embed"
    return None


@dataclass
class Candidates:
    """The target layers one source layer may go to (empty, with ``reason``, when there are none)."""

    source: LayerRef
    source_shape: tuple[int, ...]
    stage: str
    targets: list[tuple[str, str]] = field(default_factory=list)     # (target key, compatibility)
    reason: str | None = None


class TargetIndex:
    """Target-model layers by (side, role), built once per target model."""

    def __init__(self, target):
        self.target = target
        self._keys = set(target.keys())
        self._by_role: dict[tuple[str, str], list[tuple[LayerRef, tuple[int, ...]]]] = {}
        architecture = getattr(target, "architecture", "")
        for key in self._keys:
            ref = parse_key(key)
            if ref is None or unused_by_target(ref, architecture):      # never read by the target: no candidate
                continue
            shape = tuple(target.shape(key))
            if len(shape) not in (2, 4):
                continue
            self._by_role.setdefault((ref.side, ref.role), []).append((ref, shape))
        for refs in self._by_role.values():
            refs.sort(key=lambda x: x[0].order)

    def candidates(self, source_key: str, source_shape) -> Candidates:
        ref = parse_key(source_key)
        source_shape = tuple(source_shape)
        if ref is None or len(source_shape) not in (2, 4):
            return Candidates(ref or LayerRef(source_key, "other", "other", (99,), None, source_key),
                              source_shape, "other", reason=DROP_NO_COUNTERPART)
        out = Candidates(ref, source_shape, stage_label(ref, source_shape))
        if unused_by_target(ref, getattr(self.target, "architecture", "")):
            out.reason = DROP_UNUSED_BY_TARGET
            return out
        same_width = False
        w = width(ref, source_shape)
        for tref, tshape in self._by_role.get((ref.side, ref.role), []):
            if width(tref, tshape) != w:
                continue
            same_width = True
            compat = compatibility(ref.role, source_shape, tshape)
            if compat:
                out.targets.append((tref.key, compat))
        if not out.targets:
            out.reason = DROP_SHAPE if same_width else DROP_NO_COUNTERPART
        return out

    def direct(self, source_key: str, source_shape) -> Candidates:
        """The stock-loader rule: the target weight of the same name, if its matrix shape agrees."""
        ref = parse_key(source_key) or LayerRef(source_key, "other", "other", (99,), None, source_key)
        out = Candidates(ref, tuple(source_shape), stage_label(ref, source_shape) if ref.side != "other" else "other")
        if source_key not in self._keys:
            out.reason = DROP_NO_COUNTERPART
            return out
        compat = compatibility("", source_shape, self.target.shape(source_key))
        if compat in ("same", "squeeze"):
            out.targets.append((source_key, compat))
        else:
            out.reason = DROP_SHAPE
        return out


def check_policy(policy: str, threshold: float):
    if policy not in POLICIES:
        raise TransferOptionError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if not isinstance(threshold, int | float) or threshold != threshold or threshold > 1:
        raise TransferOptionError(f"threshold must be a number <= 1 (normalised score; -inf applies every "
                                  f"candidate), got {threshold!r}")


@dataclass(frozen=True)
class Evidence:
    """What is known of one candidate pair's normalised score: it is at most ``hi``; ``exact``: it is ``hi``
    (exact subspaces or identical weights). Decisions use an estimate only to rule a pair out: whatever may pass
    or lead is scored exactly first (its spectra are needed to project it anyway). Nothing known yet
    (:data:`UNKNOWN`): ``hi`` 1, ``known`` False; ``floor``: the ``hi`` that screening can be expected to leave (the
    bound of a sketch scoring at chance; 0 where that is not known)."""

    hi: float = 1.0
    exact: bool = False
    identical: bool = False
    unscored: bool = False
    known: bool = True
    floor: float = 0.0

    @property
    def least(self) -> float:
        """The upper bound the pair can be expected to have before it is scored exactly: ``hi``, or ``floor`` while
        unknown."""
        return self.hi if self.known else self.floor


UNKNOWN = Evidence(known=False)


@dataclass
class LayerChoice:
    """A LoRA layer to place: its position, the LoRA's energy on it (block-level ``best`` weighs by it) and what is
    known of each candidate."""

    ref: LayerRef
    weight: float
    candidates: dict[str, Evidence]


@dataclass
class Decisions:
    """``chosen``: source key -> {target key: strength}; ``reasons``: source key -> {target key: why not};
    ``needs``: (source, target) pairs whose evidence must improve before the rest can be decided; ``score_now``:
    those of them nothing is known of that screening could not settle, to score exactly at once."""

    chosen: dict[str, dict[str, float]] = field(default_factory=dict)
    reasons: dict[str, dict[str, str]] = field(default_factory=dict)
    needs: set[tuple[str, str]] = field(default_factory=set)
    score_now: set[tuple[str, str]] = field(default_factory=set)

    def ask(self, pairs, layers: dict[str, LayerChoice], threshold: float, screening_may_rank: bool = False):
        """Add ``pairs`` to ``needs``; those unknown whose screening is not expected to fail them on the threshold
        (``floor >= threshold``) nor, with ``screening_may_rank``, to rank their unit out, to ``score_now`` too."""
        self.needs |= pairs
        if not screening_may_rank:
            self.score_now |= {(s, t) for s, t in pairs
                               if not layers[s].candidates[t].known and layers[s].candidates[t].floor >= threshold}


# an attention's q and k only make sense as a pair (their product is the attention map): one decision for both
QK_PARTNERS = {"attn1.to_q": "attn1.to_k", "attn2.to_q": "attn2.to_k", "self_attn.q_proj": "self_attn.k_proj"}
# a SpatialTransformer's proj_in / proj_out go where the transformer blocks they wrap go
FOLLOWERS = frozenset({"proj_in", "proj_out"})
DROP_PARTNER = "its q/k partner does not pass there"
DROP_WRAPPED_ELSEWHERE = "the transformer blocks it wraps went elsewhere"
PASS, FAIL, OPEN = "pass", "fail", "open"


def _groups(layers: dict[str, LayerChoice]) -> list[tuple[str, ...]]:
    """q and k of one attention (both in the LoRA) as one group, q first (screened first: :func:`_test`; SDXL's
    cross-attention q is the cheaper weight to sketch); every other layer alone."""
    by_role = {(unit_of(c.ref), c.ref.role): k for k, c in layers.items()}
    partner_of = {}
    for (unit, role), key in by_role.items():
        other = by_role.get((unit, QK_PARTNERS.get(role)))
        if other is not None:
            partner_of[key], partner_of[other] = other, key
    groups, seen = [], set()
    for key in sorted(layers, key=lambda k: (layers[k].ref.order, k)):
        if key not in seen:
            group = (key, partner_of[key]) if key in partner_of else (key,)
            group = tuple(sorted(group, key=lambda m: layers[m].ref.role not in QK_PARTNERS))     # q first
            seen.update(group)
            groups.append(group)
    return groups


def _in_unit(choice: LayerChoice) -> dict[str, str]:
    """{target unit: target key} of a layer's candidates (a unit holds one layer per role)."""
    return {unit_of(parse_key(t)): t for t in choice.candidates}


def _test(group, units_of, layers, unit, threshold) -> tuple[str, dict[str, str], set]:
    """Does ``group`` pass the threshold in target ``unit``? ``(PASS | FAIL | OPEN, reasons, pairs to score)``:
    every member must pass; one whose upper bound is below the threshold fails the group; passing needs exact
    scores. Pairs nothing is known of are asked for one at a time, before any is scored exactly."""
    members = []
    for s in group:
        t = units_of[s].get(unit)
        if t is None:
            return FAIL, {m: DROP_PARTNER for m in group if units_of[m].get(unit)}, set()
        members.append((s, t, layers[s].candidates[t]))
    low = {s for s, _, ev in members if ev.hi < threshold}
    if low:
        return FAIL, {s: DROP_BELOW_THRESHOLD if s in low else DROP_PARTNER for s, _, _ in members}, set()
    unseen = [(s, t) for s, t, ev in members if not ev.known]
    if unseen and threshold > -math.inf:    # one at a time: one below the threshold fails the group, sparing the rest
        return OPEN, {}, {unseen[0]}
    unsure = {(s, t) for s, t, ev in members if not ev.exact}
    return (OPEN, {}, unsure) if unsure else (PASS, {}, set())


def _block_score(unit_layers, units_of, layers, target_unit, least: bool = False) -> tuple[float, bool, bool]:
    """``best``'s block score of a target unit, the LoRA-energy-weighted mean of the layers' scores (a role the unit
    lacks scores 0): ``(upper bound, exact, every layer on identical weights)``; ``least``: the upper bound screening
    can be expected to leave (:attr:`Evidence.least`). Unscored pairs (every candidate scores 1) count only when no
    layer of the unit has an informative pair."""
    used = [s for s in unit_layers if any(not ev.unscored for ev in layers[s].candidates.values())] or unit_layers
    total = sum(layers[s].weight for s in used)
    hi, exact, identical = 0.0, True, True
    for s in used:
        weight = layers[s].weight / total if total > 0 else 1.0 / len(used)
        t = units_of[s].get(target_unit)
        ev = layers[s].candidates[t] if t is not None else Evidence(0.0, True)
        hi += weight * (ev.least if least else ev.hi)
        exact, identical = exact and ev.exact, identical and ev.identical
    return hi, exact, identical


def _best_unit(unit, unit_layers, groups, units_of, layers, threshold, out: Decisions) -> tuple[str | None, bool]:
    """``(target unit, still open)``: where ``unit`` goes. ``(None, False)`` when no candidate could pass anywhere
    (the choice would change nothing); ``(None, True)`` while the evidence cannot tell, with ``out.needs`` naming
    what to score exactly: the most promising unit first, then every unit whose upper bound reaches the best exact
    block score. Ties between exact scores: identical weights, then the source's own name, then model order."""
    targets = sorted({tu for s in unit_layers for tu in units_of[s]}, key=lambda tu: _unit_order(units_of, tu))
    if not targets or all(_test(g, units_of, layers, tu, threshold)[0] == FAIL for tu in targets for g in groups):
        return None, False
    scored = {tu: _block_score(unit_layers, units_of, layers, tu) for tu in targets}
    exact = [tu for tu in targets if scored[tu][1]]
    # max keeps the first in model order among equal keys
    leader = max(exact, key=lambda tu: (scored[tu][0], scored[tu][2], tu == unit)) if exact else None
    pending = [tu for tu in targets if not scored[tu][1]]
    if leader is not None:      # a unit that is not exact could beat the leader, or tie it unless it is identical
        best, identical = scored[leader][0], scored[leader][2]
        pending = [tu for tu in pending if scored[tu][0] > best or (scored[tu][0] == best and not identical)]
        if not pending:
            return leader, False
    else:       # the most promising unit; among equals the source's own name, the likely leader of an identity layout
        pending = [max(pending, key=lambda tu: (scored[tu][0], tu == unit))]
    for tu in pending:
        # the pairs of groups that may still pass first (a q/k pair one member at a time), the block score's other
        # layers only once no group is open there: where those pairs fail everywhere, no block needs ranking
        asks = set().union(*(_test(g, units_of, layers, tu, threshold)[2] for g in groups))
        if not asks:
            asks = {(s, t) for s in unit_layers
                    if (t := units_of[s].get(tu)) is not None and not layers[s].candidates[t].exact}
        # screening ranks this unit out only where its block score can fall below the leader's exact one
        out.ask(asks, layers, threshold, screening_may_rank=leader is not None and
                _block_score(unit_layers, units_of, layers, tu, least=True)[0] < scored[leader][0])
    return None, True


def _unit_order(units_of, target_unit):
    for targets in units_of.values():
        t = targets.get(target_unit)
        if t is not None:
            return parse_key(t).order
    return ()


def _apply_groups(groups, units_of, layers, allowed, threshold, spread, out: Decisions, elsewhere: str):
    """Decide each group over the target units in ``allowed`` (a function of the group); candidates outside get
    ``elsewhere`` as their reason."""
    for group in groups:
        units = allowed(group)
        results = {tu: _test(group, units_of, layers, tu, threshold) for tu in units}
        still = set().union(*(r[2] for r in results.values())) if results else set()
        if still:
            out.ask(still, layers, threshold)
            continue
        passing = [tu for tu in units if results[tu][0] == PASS]
        strength = 1.0 / len(passing) if spread and passing else 1.0
        for s in group:
            chosen, reasons = {}, {}
            for tu, t in units_of[s].items():
                if tu in passing:
                    chosen[t] = strength
                elif tu in results:
                    reasons[t] = results[tu][1].get(s, DROP_PARTNER)
                else:
                    reasons[t] = elsewhere
            out.chosen[s], out.reasons[s] = chosen, reasons


def decide(layers: dict[str, LayerChoice], policy: str, threshold: float) -> Decisions:
    """Which target layers receive which source layer (module docstring), made on what is known: a decision whose
    margin the evidence cannot settle is not made; the pairs it needs refined come back in ``needs``
    (call again once they are).

    q and k of one attention pass together or not at all (one test on both, in every policy); proj_in / proj_out
    follow the target blocks the transformer blocks they wrap went to (``best``: the block of the heaviest one),
    when the LoRA has those; where those went nowhere, they are placed on their own.
    """
    check_policy(policy, threshold)
    out = Decisions()
    units_of = {s: _in_unit(c) for s, c in layers.items()}
    wrapped = {c.ref.block for c in layers.values() if c.ref.depth is not None}
    follower = sorted(s for s, c in layers.items() if c.ref.role in FOLLOWERS and c.ref.depth is None
                      and c.ref.block in wrapped)
    groups = [g for g in _groups(layers) if g[0] not in follower]
    went = _place(groups, layers, units_of, policy, threshold, out)
    _place([(s,) for s in follower if went[layers[s].ref.block] == set()], layers, units_of, policy, threshold, out)
    following = [(s,) for s in follower if went[layers[s].ref.block]]
    _apply_groups(following, units_of, layers,
                  lambda g: [tu for tu in units_of[g[0]] if tu in went[layers[g[0]].ref.block]], threshold,
                  policy == "spread", out, DROP_WRAPPED_ELSEWHERE)
    return out


def _place(groups, layers, units_of, policy, threshold, out: Decisions) -> dict[str, set[str] | None]:
    """Decide ``groups`` by ``policy`` into ``out``; returns, per source block with transformer-block layers among
    them, the target blocks those went to (None while still open)."""
    went: dict[str, set[str] | None] = {layers[g[0]].ref.block: set() for g in groups
                                        if layers[g[0]].ref.depth is not None}
    if policy == "best":
        by_unit: dict[str, list[tuple[str, ...]]] = {}
        for g in groups:
            by_unit.setdefault(unit_of(layers[g[0]].ref), []).append(g)
        heaviest: dict[str, tuple[float, str]] = {}
        for unit, unit_groups in by_unit.items():
            unit_layers = [s for g in unit_groups for s in g]
            ref = layers[unit_layers[0]].ref
            target, still_open = _best_unit(unit, unit_layers, unit_groups, units_of, layers, threshold, out)
            if still_open and ref.depth is not None:
                went[ref.block] = None
            if target is None:
                if not still_open:      # nothing could pass anywhere: each candidate says why it fails
                    _apply_groups(unit_groups, units_of, layers, lambda g: list(units_of[g[0]]), threshold, False,
                                  out, DROP_PARTNER)
                continue
            _apply_groups(unit_groups, units_of, layers, lambda g, t=target: [t], threshold, False, out,
                          NOT_BEST_UNIT)
            weight = sum(layers[s].weight for s in unit_layers)
            if ref.depth is not None and any(out.chosen.get(s) for s in unit_layers) and \
                    weight >= heaviest.get(ref.block, (-1.0, ""))[0]:
                heaviest[ref.block] = (weight, parse_key(units_of[unit_layers[0]][target]).block)
        for block, (_, target_block) in heaviest.items():
            if went[block] is not None:
                went[block] = {target_block}
        return went
    _apply_groups(groups, units_of, layers, lambda g: _common_units(g, units_of), threshold, policy == "spread",
                  out, DROP_PARTNER)
    for g in groups:
        ref = layers[g[0]].ref
        if ref.depth is None or went[ref.block] is None:
            continue
        if any(s not in out.chosen for s in g):
            went[ref.block] = None
        else:
            went[ref.block] |= {parse_key(t).block for s in g for t in out.chosen[s]}
    return went


def _common_units(group, units_of) -> list[str]:
    """The target units holding a candidate of every member (in model order of the first member's candidates)."""
    return [tu for tu in units_of[group[0]] if all(tu in units_of[s] for s in group)]
