"""The similarity plot's legend names exactly the marks the plot draws, in the colours it draws them: a bare
similarity map (no verdict yet) draws blue best-candidate marks, a projection report green/red ones."""
from __future__ import annotations

import numpy as np
import pytest

from lorax_engine.reports.plot import (
    APPLIED,
    CAND,
    DROPPED,
    LEGEND_ROW,
    UNDECIDED,
    legend_entries,
    plot_similarity,
)

VERDICT_COLOURS = {"applied": APPLIED, "dropped": DROPPED, "best candidate": UNDECIDED}


def _row(key, side, scores, best, applied=None):
    row = {"key": key, "side": side, "block": f"{side}.{key}", "scores": scores, "best": best}
    if applied is not None:
        row["applied"] = applied
    return row


BARE_MAP = [_row("a", "input", [0.6, 0.1], 0.6), _row("b", "output", [0.2, -0.05], 0.2),
            _row("c", "middle", [], None)]
REPORT = [_row("a", "clip_l", [0.9, 0.1], 0.9, applied=True), _row("b", "input", [0.05, 0.0], 0.05, applied=False),
          _row("c", "output", [], None, applied=False)]
ALL_APPLIED = [_row("a", "input", [0.7, 0.3], 0.7, applied=True), _row("b", "output", [0.8], 0.8, applied=True)]


def _count(pixels, colour) -> int:
    return int(np.all(pixels == np.array(colour), axis=2).sum())


@pytest.mark.parametrize(("rows", "labels"), [
    (BARE_MAP, ["candidates", "best candidate", "no counterpart"]),
    (REPORT, ["candidates", "applied", "dropped", "no counterpart"]),
    (ALL_APPLIED, ["candidates", "applied"]),
], ids=["bare_map", "report", "all_applied"])
def test_legend_names_exactly_the_marks_drawn(rows, labels):
    assert [label for label, _, _ in legend_entries(rows)] == labels
    pixels = np.round(plot_similarity(rows, threshold=0.3) * 255).astype(int)
    height = pixels.shape[0]
    legend = pixels[height - LEGEND_ROW - 2: height - LEGEND_ROW + 10]
    plot_area = pixels[: height - LEGEND_ROW - 4]
    for label, colour in VERDICT_COLOURS.items():
        drawn, in_legend = _count(plot_area, colour) > 3, _count(legend, colour) > 10
        # a colour is in the legend exactly when the plot draws it, and under the label the entries give it
        assert drawn == in_legend == (label in labels), (label, drawn, in_legend)
    assert _count(plot_area, CAND) > 0 and _count(legend, CAND) > 10  # candidate dots / crosses, same grey


def test_legend_entries_carry_the_drawn_colours():
    entries = {label: (shape, colour) for label, shape, colour in legend_entries(REPORT)}
    assert entries == {"candidates": ("dot", CAND), "applied": ("dot", APPLIED), "dropped": ("dot", DROPPED),
                       "no counterpart": ("cross", CAND)}
