"""The short verdict the canvas extension (js/lorax.js) draws on a node after it ran.

Kept free of ComfyUI imports so it can be tested with plain reports.
"""
from __future__ import annotations

import statistics

# A layer score is normalised so 0 is chance and 1 is the same subspace (METHOD §1). Below this median,
# the matched subspaces are barely better than chance and the transfer carries little of the LoRA.
WEAK_MEDIAN_SCORE = 0.2


def best_scores(report) -> list[float]:
    return [r["best"] for r in report.plot_rows() if r["best"] is not None]


def transfer_summary(report) -> dict:
    """{"verdict": good|weak|none, "lines": [...], ...} from a projection Report."""
    s = report.summary()
    scores = best_scores(report)
    median = statistics.median(scores) if scores else None
    if s["applied"] == 0:
        verdict = "none"
    elif median is None or median < WEAK_MEDIAN_SCORE or s["energy_kept"] < 0.25:
        verdict = "weak"
    else:
        verdict = "good"
    reasons = ", ".join(f"{n} {r}" for r, n in s["dropped_by_reason"].items()) or "none"
    lines = [
        f"{verdict.upper()}: {s['applied']}/{s['source_layers']} layers applied ({report.mode})",
        f"dropped: {reasons}",
        f"energy kept {100 * s['energy_kept']:.0f}%, injected {100 * s['injected_energy']:.0f}%",
    ]
    if s["identical_layers"]:
        lines.append(f"{s['identical_layers']} layers on identical weights arrive whole")
    if median is not None:
        lines.append(f"median score {median:.2f} (0 = chance, 1 = same)")
    if s["shared_target_blocks"]:
        lines.append(f"{s['shared_target_blocks']} target blocks receive several source blocks")
    if s["multi_target_layers"]:
        lines.append(f"{s['multi_target_layers']} layers applied to several targets")
    return {"verdict": verdict, "lines": lines, "applied": s["applied"], "dropped": s["dropped"],
            "source_layers": s["source_layers"], "energy_kept": s["energy_kept"],
            "injected_energy": s["injected_energy"], "identical_layers": s["identical_layers"],
            "shared_target_blocks": s["shared_target_blocks"], "median_score": median}


def map_summary(rows: list[dict], threshold: float) -> dict:
    """Verdict of a similarity map (before any projection): how many layers beat the threshold."""
    best = [r["best"] for r in rows if r["best"] is not None]
    above = sum(b >= threshold for b in best)
    median = statistics.median(best) if best else None
    verdict = "none" if not above else ("good" if median is not None and median >= WEAK_MEDIAN_SCORE else "weak")
    lines = [f"{verdict.upper()}: {above}/{len(rows)} layers above threshold {threshold:g}",
             f"no counterpart: {len(rows) - len(best)}"]
    if median is not None:
        lines.append(f"median best score {median:.2f} (0 = chance)")
    return {"verdict": verdict, "lines": lines, "above_threshold": above, "layers": len(rows),
            "median_score": median}
