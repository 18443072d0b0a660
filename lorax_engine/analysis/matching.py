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
  or the rest of a block: proj_in/out, a resnet, a text-encoder layer) goes whole to the single target unit of
  its stage with the highest score over all its layers, weighted by the LoRA's energy per layer (equal weights
  without a LoRA), so q, k, v, out and ff of one block stay together (q and k only make sense as a pair).
  Ties: the target unit with the source's own name (identity layouts), then model order. Within the chosen unit
  each layer is applied if its own score passes; a layer whose role the chosen unit lacks is dropped.
* ``all-above-threshold``: every passing candidate, each at full strength (per layer).
* ``spread``: every passing candidate, each at strength 1 / (number applied), so the total is the source's.
  (METHOD says "every block of the stage"; we let the threshold gate it like the other policies.)

Default threshold 0.05, on the chance-normalised score. Chance-level scores of independent r-dimensional
subspaces of R^d have standard deviation about sqrt(2) / (d - r): <= 0.0044 for every SD width at r = 320
(d >= 640), and the best of 30 candidates sits ~2 sd above 0. Measured on the zoo's independent SD1.5 and
SDXL UNets (a full-coverage rank-32 LoRA, 1714 candidate pairs): every score lay in [-0.0075, 0.0031],
while a fine-tune (3% drift) scores 0.97-0.98 and identical layers 1.0 (tests/test_transfer.py). 0.05 is
thus 15x the highest chance score seen, yet keeps any layer with real shared structure.
"""
from __future__ import annotations

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
NOT_BEST = "another candidate scored higher"
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
        for key in self._keys:
            ref = parse_key(key)
            if ref is None:
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


def select(source_key: str, scored: list[tuple[str, float]], policy: str, threshold: float
           ) -> tuple[dict[str, float], dict[str, str]]:
    """Apply a policy to ``[(target key, score)]`` (in model order).

    Returns ({target key: strength} for the chosen ones, {target key: reason} for the others).
    """
    check_policy(policy, threshold)
    passing = [(k, s) for k, s in scored if s >= threshold]
    reasons = {k: DROP_BELOW_THRESHOLD for k, s in scored if s < threshold}
    if policy == "best":
        if not scored:
            return {}, reasons
        rank = sorted(range(len(scored)), key=lambda i: (-scored[i][1], scored[i][0] != source_key, i))
        best_key, best_score = scored[rank[0]]
        if best_score < threshold:
            return {}, reasons
        reasons.update({k: NOT_BEST for k, s in passing if k != best_key})
        return {best_key: 1.0}, reasons
    strength = 1.0 / len(passing) if (policy == "spread" and passing) else 1.0
    return {k: strength for k, _ in passing}, reasons


def select_units(units: dict[str, list[tuple[float, dict[str, tuple[float, bool]]]]]
                 ) -> dict[str, tuple[str | None, dict[str, float]]]:
    """Block-level ``best`` (METHOD §4): the target unit each source unit goes to.

    ``units``: source unit -> ``[(energy weight, {target key: (score, unscored)})]``, one entry per layer.
    Returns source unit -> (chosen target unit or None, {target unit: block score}). The block score is the
    weighted mean of the layers' scores (equal weights when they sum to 0); a target unit lacking one of the
    layers' roles scores 0 for it. Unscored pairs (every candidate scores 1) carry no evidence and count only
    when no layer of the unit has an informative pair. The caller applies the threshold per layer.
    """
    out = {}
    for unit, layers in units.items():
        used = [x for x in layers if any(not unscored for _, unscored in x[1].values())] or layers
        total = sum(w for w, _ in used)
        order: dict[str, tuple] = {}
        sums: dict[str, float] = {}
        for w, targets in used:
            weight = w / total if total > 0 else 1.0 / len(used)
            for t, (score, _) in targets.items():
                tref = parse_key(t)
                tunit = unit_of(tref)
                order.setdefault(tunit, tref.order)
                sums[tunit] = sums.get(tunit, 0.0) + weight * score
        best = min(sums, key=lambda u: (-sums[u], u != unit, order[u])) if sums else None
        out[unit] = (best, sums)
    return out
