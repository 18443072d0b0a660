"""The short verdict the canvas extension (js/lorax.js) draws on a node after it ran, and what it rests on.

Kept free of ComfyUI imports so it can be tested with plain reports. docs/method.md ("What the verdict means")
explains the verdicts to users; the numbers below are the ones it quotes.

* NONE: nothing was applied.
* GOOD: something was applied, and every measure the report has says the LoRA arrived: the layers' similarity
  scores are clearly above chance (median over the scored layers), most of the LoRA's energy survived, and, where
  the report can compare (METHOD §2c, "what moved": applied pairs whose shapes agree), most applied updates changed
  little against a direct copy.
  Scores alone are not enough: a score near 1 over an update that turned by 14% is no good transfer.
* WEAK: applied, but one of those falls short (each shortfall is named on the node).

Unscored pairs (neither side informative: every candidate would score 1) give no number and count in no median.
"""
from __future__ import annotations

import statistics
import textwrap

# A layer score is normalised so 0 is chance and 1 is the same subspace (METHOD §1). Below this median,
# the matched subspaces are barely better than chance and the transfer carries little of the LoRA.
WEAK_MEDIAN_SCORE = 0.2
# Below this share of the LoRA's energy (||dW||_F^2) surviving the projection, most of the LoRA was cut away.
GOOD_ENERGY_KEPT = 0.5
LINE_WIDTH = 64     # characters per verdict line: the canvas shows them unwrapped, on nodes ~560 px wide
# GOOD needs at most this share of the applied pairs the report compares with a direct copy to have changed more
# than a little (report.py: CHANGED_LITTLE).
GOOD_MOVED_MORE = 0.5


def _score(similarity: dict | None) -> float | None:
    """A candidate's normalised score, or None where it has none to show (direct mode, unscored)."""
    if similarity is None or similarity.get("unscored"):
        return None
    return similarity["score"]


def best_scores(report) -> list[float]:
    """Per source layer with a scored candidate, its best score (what the median is taken over)."""
    best = []
    for layer in report.layers:
        scores = [s for s in (_score(c.similarity) for c in layer.candidates) if s is not None]
        if scores:
            best.append(max(scores))
    return best


def _moved(summary: dict) -> tuple[int, int]:
    """(pairs changed more than a little, pairs compared) from the report's "what moved"."""
    moved = summary["moved"]
    return moved["more"], moved["whole"] + moved["little"] + moved["more"]


def verdict(report) -> tuple[str, list[str], float | None]:
    """(good | weak | none, what it rests on or falls short of, median score) of a projection Report."""
    s = report.summary()
    scores = best_scores(report)
    median = statistics.median(scores) if scores else None
    if s["applied"] == 0:
        return "none", [], median
    measures, shortfalls = [], []
    if median is None:
        shortfalls.append("no layer pair could be scored")
    else:
        (measures if median >= WEAK_MEDIAN_SCORE else shortfalls).append(
            f"median score {median:.2f} {'>=' if median >= WEAK_MEDIAN_SCORE else '<'} {WEAK_MEDIAN_SCORE:g} "
            "(0 = chance, 1 = same)")
    kept = s["energy_kept"]
    (measures if kept >= GOOD_ENERGY_KEPT else shortfalls).append(
        f"energy kept {100 * kept:.0f}% {'>=' if kept >= GOOD_ENERGY_KEPT else '<'} {100 * GOOD_ENERGY_KEPT:.0f}%")
    more, compared = _moved(s)
    if compared:           # applied pairs whose shapes agree (after METHOD §3's embedding)
        (measures if more <= GOOD_MOVED_MORE * compared else shortfalls).append(
            f"{compared - more} of {compared} updates changed little")
    return ("weak", shortfalls, median) if shortfalls else ("good", measures, median)


def transfer_summary(report) -> dict:
    """{"verdict": good|weak|none, "lines": [...], ...} from a projection Report. Lines stay within
    :data:`LINE_WIDTH` characters: the canvas does not wrap them."""
    s = report.summary()
    kind, basis, median = verdict(report)
    head = f"{kind.upper()}: {s['applied']}/{s['source_layers']} layers applied ({report.mode})"
    lines = [head + {"good": "; rests on:", "weak": "; falls short on:", "none": ""}[kind],
             *(f"  {item}" for item in basis)]
    reasons = ", ".join(f"{n} {r}" for r, n in s["dropped_by_reason"].items()) or "none"
    lines += textwrap.wrap(f"dropped: {reasons}", LINE_WIDTH, subsequent_indent="  ")
    if s["identical_layers"]:
        lines.append(f"{s['identical_layers']} layers on identical weights arrive whole")
    if s["shared_target_blocks"]:
        lines.append(f"{s['shared_target_blocks']} target blocks receive several source blocks")
    if s["multi_target_layers"]:
        lines.append(f"{s['multi_target_layers']} layers applied to several targets, energy injected "
                     f"{100 * s['injected_energy']:.0f}%")
    return {"verdict": kind, "lines": lines, "applied": s["applied"], "dropped": s["dropped"],
            "source_layers": s["source_layers"], "energy_kept": s["energy_kept"],
            "injected_energy": s["injected_energy"], "identical_layers": s["identical_layers"],
            "shared_target_blocks": s["shared_target_blocks"], "median_score": median}


def map_summary(smap, threshold: float) -> dict:
    """Verdict of a similarity map (before any projection): how many layers have a candidate above the threshold
    (unscored candidates pass it, as in the projection, but give no number)."""
    best, above, without = [], 0, 0
    for entry in smap.entries.values():
        sims = list(entry.similarities.values())
        without += not sims
        scored = [s.score for s in sims if not s.unscored]
        best += [max(scored)] if scored else []
        above += any(s.unscored or s.score >= threshold for s in sims)
    median = statistics.median(best) if best else None
    kind = "none" if not above else ("good" if median is not None and median >= WEAK_MEDIAN_SCORE else "weak")
    lines = [f"{kind.upper()}: {above}/{len(smap.entries)} layers above threshold {threshold:g}",
             f"no counterpart: {without}"]
    if median is not None:
        lines.append(f"median best score {median:.2f} (0 = chance)")
    return {"verdict": kind, "lines": lines, "above_threshold": above, "layers": len(smap.entries),
            "median_score": median}
