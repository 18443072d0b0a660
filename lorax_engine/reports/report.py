"""What a transfer did, layer by layer: similarities, energies, what moved, applied or why not; as JSON and as a
table.

Every source layer of the LoRA gets a :class:`LayerRecord` with every target layer considered for it
(:class:`CandidateRecord`: raw phi_U / phi_V, chance levels, normalised scores with the interval an estimate
promises, applied or the reason not). Two energies, each from one operator for every candidate they are given
for, so they compare: ``energy_in_target``, the share of ``||ΔW||_F^2`` inside the target's top-r subspaces (the
paper's Eq. 3), for every candidate whose basis was at hand in the run (``energy_from_sketch``: measured on a
screening sketch, an estimate) and for every applied candidate projected with spectra, from the target's spectrum, in
warm runs too, and ``energy_kept``, what the transfer operator actually used kept, for applied
candidates. A layer's energy kept is the mean over the targets it was applied to (0 when dropped); the summary's
is the ΔW-energy-weighted mean over all source layers. A similarity's ``estimate`` flag marks scores from
sketches; applied pairs carry their exact score.

Per applied candidate the report gives the ``operator`` used (``auto``, ``subspace``, ``subspace+null``,
``identity (identical weights)``, ``direct``), the side weights ``w_u`` / ``w_v`` of the soft side-wise operator
(METHOD §2c) and ``change``, how far the update moved from a direct copy (METHOD §2c "what moved"; the summary
counts applied pairs that arrived whole, changed by at most 2%, or more); per source layer how many targets
received it and with what total strength; per target the energy injected (``||ΔW'||_F^2`` after combining and
strengths), summed in the summary's ``injected_energy`` relative to the LoRA's own energy (above 1 when one
source block lands on several targets). ``work`` counts the candidate pairs by how far their score had to be
computed (identical by value, decided on an estimate's bound, scored exactly, never needed).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

IDENTITY_OPERATOR = "identity (identical weights)"
# "what moved" (METHOD §2c): an applied update whose change against a direct copy is at most this arrived whole
# (rounding of the factor products), at most CHANGED_LITTLE changed little
ARRIVED_WHOLE = 1e-6
CHANGED_LITTLE = 0.02


@dataclass
class CandidateRecord:
    target_key: str
    compat: str                      # "same" | "squeeze" | "embed"
    similarity: dict | None          # similarity.similarity_dict(); None in direct mode and where never needed
    energy_in_target: float | None   # share of ΔW's energy inside the target's top-r subspaces (Eq. 3's operator)
    applied: bool = False
    strength: float = 0.0
    reason: str | None = None
    energy_from_sketch: bool = False      # energy_in_target measured on a screening sketch: an estimate
    operator: str | None = None           # applied: the transfer operator used
    w_u: float | None = None              # applied side-wise: the complement weights (METHOD §2c)
    w_v: float | None = None
    energy_kept: float | None = None      # applied: ||ΔW'||^2 / ||ΔW||^2 of the operator used
    change: float | None = None           # applied: ||ΔW' - ΔW||_F / ||ΔW||_F, the change against a direct copy


@dataclass
class LayerRecord:
    source_key: str
    stage: str
    block: str
    role: str
    source_shape: list[int]
    lora_rank: int
    energy: float                    # ||ΔW||_F^2 of the source layer
    candidates: list[CandidateRecord] = field(default_factory=list)
    applied: bool = False
    reason: str | None = None        # why nothing was applied
    energy_kept: float = 0.0
    targets_received: int = 0        # how many target weights received this layer
    total_strength: float = 0.0      # the sum of the strengths it was applied with

    @property
    def best(self) -> CandidateRecord | None:
        scored = [c for c in self.candidates if c.similarity is not None]
        if not scored:
            return self.candidates[0] if self.candidates else None
        return max(scored, key=lambda c: (c.applied, c.similarity["score"]))


@dataclass
class TargetRecord:
    target_key: str
    rank: int
    sources: list[str]
    cap_energy_kept: float = 1.0     # fraction kept by the output rank cap (1.0: no cap applied)
    energy: float = 0.0              # ||ΔW'||_F^2 written to this weight (all sources, strengths applied)


@dataclass
class Report:
    source_model: str
    target_model: str
    source_architecture: str
    target_architecture: str
    mode: str
    options: dict
    layers: list[LayerRecord] = field(default_factory=list)
    targets: list[TargetRecord] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    shared_blocks: dict[str, list[str]] = field(default_factory=dict)   # target block -> several source blocks
    provenance: dict[str, str] = field(default_factory=dict)   # files read, hashes (files/provenance.py)
    work: dict[str, int] = field(default_factory=dict)         # candidate pairs by how they were settled

    # -- summary ----------------------------------------------------------------------------------
    def summary(self) -> dict:
        dropped: dict[str, int] = {}
        for layer in self.layers:
            if not layer.applied:
                dropped[layer.reason or "unknown"] = dropped.get(layer.reason or "unknown", 0) + 1
        total = sum(layer.energy for layer in self.layers)
        kept = sum(layer.energy * layer.energy_kept for layer in self.layers)
        applied = [c for layer in self.layers for c in layer.candidates if c.applied]
        changes = [c.change for c in applied if c.change is not None]
        return {
            "source_layers": len(self.layers),
            "applied": sum(layer.applied for layer in self.layers),
            "dropped": sum(dropped.values()),
            "dropped_by_reason": dict(sorted(dropped.items())),
            "target_layers_written": len(self.targets),
            "energy_kept": kept / total if total > 0 else 0.0,
            "injected_energy": sum(t.energy for t in self.targets) / total if total > 0 else 0.0,
            "identical_layers": sum(c.operator == IDENTITY_OPERATOR for c in applied),
            "multi_target_layers": sum(layer.targets_received > 1 for layer in self.layers),
            "shared_target_blocks": len(self.shared_blocks),
            "moved": {"whole": sum(x <= ARRIVED_WHOLE for x in changes),
                      "little": sum(ARRIVED_WHOLE < x <= CHANGED_LITTLE for x in changes),
                      "more": sum(x > CHANGED_LITTLE for x in changes)},
            "max_change": max(changes) if changes else None,
            "seconds": round(sum(v for k, v in self.seconds.items() if k in ("similarity", "projection")), 3),
        }

    def to_dict(self) -> dict:
        out = _plain(self)
        out["summary"] = self.summary()
        return out

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    def plot_rows(self) -> list[dict]:
        """Per source layer: block grouping, candidate scores and the verdict (for plot.py)."""
        rows = []
        for layer in self.layers:
            scores = [c.similarity["score"] for c in layer.candidates
                      if c.similarity is not None and not c.similarity["unscored"]]
            rows.append({"key": layer.source_key, "side": layer.stage.split("@")[0], "block": layer.block,
                         "stage": layer.stage, "scores": scores, "best": max(scores) if scores else None,
                         "applied": layer.applied})
        return rows

    def metadata(self) -> dict[str, str]:
        """Provenance for the output file's safetensors metadata (namespaced ``lorax.``)."""
        s = self.summary()
        meta = {
            "lorax.method": "LoRA-X subspace projection (arXiv 2501.16559)" if self.mode != "direct"
                            else "direct copy (baseline, no projection)",
            "lorax.mode": self.mode,
            "lorax.source_model": self.source_model,
            "lorax.target_model": self.target_model,
            "lorax.layers_applied": str(s["applied"]),
            "lorax.layers_dropped": str(s["dropped"]),
            "lorax.dropped_by_reason": json.dumps(s["dropped_by_reason"]),
            "lorax.energy_kept": f"{s['energy_kept']:.4f}",
            "lorax.injected_energy": f"{s['injected_energy']:.4f}",
        }
        for k in ("rank", "method", "policy", "threshold", "output_rank"):
            if k in self.options:
                meta[f"lorax.{k}"] = str(self.options[k])
        return {**meta, **self.provenance}

    # -- table ------------------------------------------------------------------------------------
    def format_table(self) -> str:
        """The report as text: a short summary first (what was applied, what was dropped and why, how much of the
        LoRA survived, what moved), then one row per source layer under plain column names."""
        s = self.summary()
        reasons = ", ".join(f"{n} {r}" for r, n in s["dropped_by_reason"].items()) or "none"
        lines = [f"LoRA-X {self.mode}: {self.source_model} ({self.source_architecture}) -> {self.target_model} "
                 f"({self.target_architecture})",
                 f"{s['applied']} of {s['source_layers']} source layers applied to {s['target_layers_written']} "
                 f"target layers; dropped: {reasons}",
                 f"energy kept {100 * s['energy_kept']:.1f}%, injected {100 * s['injected_energy']:.1f}%; "
                 f"{s['seconds']:.1f} s"]
        moved = s["moved"]
        if s["max_change"] is not None:
            lines.append(f"what moved, against a direct copy: {moved['whole']} updates arrived whole, "
                         f"{moved['little']} changed by at most {100 * CHANGED_LITTLE:.0f}%, {moved['more']} more "
                         f"(largest change {100 * s['max_change']:.0f}%)")
        if self.work:
            w = self.work
            lines.append(f"work: {w['candidate_pairs']} candidate pairs: {w['identical_by_value']} identical on their "
                         f"values, {w['decided_on_estimate']} ruled out by a screening estimate's bound, "
                         f"{w['scored_exactly']} scored exactly, {w['not_needed']} not needed")
        lines.extend(self.notes)
        lines += ["", _TABLE_LEGEND, _TABLE_HEAD, "-" * len(_TABLE_HEAD)]
        for layer in self.layers:
            lines.append(self._row(layer))
        return "\n".join(lines)

    @staticmethod
    def _row(layer: LayerRecord) -> str:
        best = layer.best
        if layer.targets_received > 1:
            sent_to = f"{layer.targets_received} targets"
        else:
            sent_to = _sent_to(layer.source_key, best.target_key) if layer.applied else "-"
        sim = best.similarity if best else None
        if sim is None:
            score = "-"
        elif sim.get("unscored"):
            score = "unscored"
        elif sim.get("estimate"):
            score = f"<={sim['score_upper_bound']:.2f}"
        else:
            score = f"{sim['score']:.2f}"
        kept = f"{100 * layer.energy_kept:.0f}%" if layer.applied else "-"
        change = best.change if layer.applied else None
        changed = f"{100 * change:.1f}%" if change is not None else "-"
        result = _applied_status(layer) if layer.applied else f"dropped: {layer.reason}"
        return f"{_short(layer.source_key, 40):40} {sent_to:24} {score:>10} {kept:>6} {changed:>8}  {result}"


_TABLE_LEGEND = ("similarity: 0 = no more alike than chance, 1 = the same subspace (<=: at most this, from a "
                 "screening estimate; unscored: too narrow to tell); kept: share of the layer's energy that "
                 "survived; changed: how far the update moved from a direct copy")
_TABLE_HEAD = f"{'layer':40} {'sent to':24} {'similarity':>10} {'kept':>6} {'changed':>8}  result"


def _sent_to(source_key: str, target_key: str) -> str:
    """Where a layer went, short: "same layer", or the target's block when the rest of the name is the source's."""
    if target_key == source_key:
        return "same layer"
    src, tgt = source_key.split("."), target_key.split(".")
    common = 0
    while common < min(len(src), len(tgt)) - 1 and src[-1 - common] == tgt[-1 - common]:
        common += 1
    return _short(".".join(tgt[:len(tgt) - common]) if common else target_key, 24)


def _operator(c: CandidateRecord) -> str:
    if c.w_u is None or c.operator == IDENTITY_OPERATOR:
        return c.operator or ""
    return f"{c.operator} w={c.w_u:.2f}/{c.w_v:.2f}"


def _applied_status(layer: LayerRecord) -> str:
    applied = [c for c in layer.candidates if c.applied]
    where = f" to {layer.targets_received} targets x{layer.total_strength:.3g}" if layer.targets_received > 1 else ""
    return f"applied{where} {_operator(applied[0])}" if applied else "applied"


def _short(key: str, width: int) -> str:
    for prefix in ("diffusion_model.", "clip_l.transformer.text_model.encoder.",
                   "clip_g.transformer.text_model.encoder."):
        if key.startswith(prefix):
            key = ("" if prefix == "diffusion_model." else prefix.split(".")[0] + ".") + key[len(prefix):]
            break
    key = key.removesuffix(".weight").replace("transformer_blocks.", "tb.")
    return key if len(key) <= width else "…" + key[-(width - 1):]


def _plain(x):
    """``dataclasses.asdict`` without its deep copy of every leaf (a report's leaves are numbers and strings; the
    copies were most of a warm transfer's report time)."""
    if is_dataclass(x):
        return {f.name: _plain(getattr(x, f.name)) for f in fields(x)}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_plain(v) for v in x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x
