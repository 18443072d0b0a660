"""Similarity plot (Pillow + numpy only): per source layer, its candidates' normalised scores, grouped by block.

Groups follow the vocabulary users know: text encoder, input_blocks, middle_block, output_blocks (and
"other" UNet weights). Each source layer is one column: small grey dots for every candidate, a larger
marker for the best one (green: applied, red: dropped, blue: no verdict yet, as in a bare similarity
map), a grey cross at the bottom for layers with no candidate. Dashed lines mark chance (normalised score
0) and the threshold. The legend names exactly the marks drawn (:func:`legend_entries`).
:func:`plot_similarity` returns the picture as a float array ``(H, W, 3)`` in ``[0, 1]`` (what a ComfyUI
IMAGE holds per batch item) and writes a PNG when given a path.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GROUPS = (("text encoder", ("clip_l", "clip_g")), ("input_blocks", ("input",)), ("middle_block", ("middle",)),
          ("output_blocks", ("output",)), ("other", ("unet", "other")))
BG, AXIS, GRID, TEXT = (255, 255, 255), (60, 60, 60), (225, 225, 225), (30, 30, 30)
SHADE = (244, 246, 250)
APPLIED, DROPPED, UNDECIDED, CAND = (34, 150, 60), (205, 45, 45), (40, 90, 200), (150, 150, 150)
THRESH, CHANCE = (230, 130, 0), (120, 120, 120)
LEGEND_STEP = 100  # px per legend entry: mark + longest label ("best candidate", "no counterpart")
LEGEND_ROW = 36  # legend marks' top, in px above the picture's bottom edge


def _group(side: str) -> int:
    for i, (_, sides) in enumerate(GROUPS):
        if side in sides:
            return i
    return len(GROUPS) - 1


def _best_mark(row: dict) -> tuple[str, tuple[int, int, int]]:
    if row.get("applied") is None:
        return "best candidate", UNDECIDED
    return ("applied", APPLIED) if row["applied"] else ("dropped", DROPPED)


def legend_entries(rows: list[dict]) -> list[tuple[str, str, tuple[int, int, int]]]:
    """``(label, shape, colour)`` for each kind of mark ``rows`` draw, in drawing order; shape is dot or cross."""
    kinds = []
    if any(r["scores"] for r in rows):
        kinds.append(("candidates", "dot", CAND))
    for label, color in dict(_best_mark(r) for r in rows if r["best"] is not None).items():
        kinds.append((label, "dot", color))
    if any(r["best"] is None for r in rows):
        kinds.append(("no counterpart", "cross", CAND))
    return kinds


def _cross(draw, x, y, rad, color):
    draw.line([(x - rad, y - rad), (x + rad, y + rad)], fill=color, width=1)
    draw.line([(x - rad, y + rad), (x + rad, y - rad)], fill=color, width=1)


def _dashed(draw, x0, x1, y, color, dash=6):
    for x in range(int(x0), int(x1), 2 * dash):
        draw.line([(x, y), (min(x + dash, x1), y)], fill=color, width=1)


def plot_similarity(rows: list[dict], threshold: float | None = None, title: str = "", path=None,
                    height: int = 420) -> np.ndarray:
    """Draw ``rows`` (``Report.plot_rows()`` or ``SubspaceMap.plot_rows()``); returns float RGB ``(H, W, 3)``."""
    rows = sorted(rows, key=lambda r: _group(r["side"]))
    font = ImageFont.load_default()
    left, right, top, bottom = 56, 16, 44, 50
    col = max(3, min(14, 1100 // max(len(rows), 1)))
    width = left + right + max(len(rows), 1) * col
    width = max(width, 480)
    col = (width - left - right) / max(len(rows), 1)
    img = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(img)

    scores = [s for r in rows for s in r["scores"]]
    lo = min([-0.1, *scores, *([threshold] if threshold is not None and math.isfinite(threshold) else [])])
    hi = 1.05
    plot_h = height - top - bottom

    def y_of(v):
        return top + (hi - v) / (hi - lo) * plot_h

    # alternate shading per block, then group separators and labels on top of it
    prev_block, shade = None, False
    for i, r in enumerate(rows):
        if r["block"] != prev_block:
            shade, prev_block = not shade, r["block"]
        if shade:
            draw.rectangle([left + i * col, top, left + (i + 1) * col, top + plot_h], fill=SHADE)
    starts = [i for i, r in enumerate(rows) if i == 0 or _group(r["side"]) != _group(rows[i - 1]["side"])]
    for a, b in zip(starts, starts[1:] + [len(rows)], strict=False):
        x0, x1 = left + a * col, left + b * col
        name = GROUPS[_group(rows[a]["side"])][0]
        draw.text(((x0 + x1) / 2 - 3 * len(name), top - 14), name, fill=TEXT, font=font)
        if a:
            draw.line([(x0, top), (x0, top + plot_h)], fill=AXIS, width=1)

    # axes and grid
    for v in np.arange(math.ceil(lo * 4) / 4, hi, 0.25):
        y = y_of(v)
        draw.line([(left, y), (width - right, y)], fill=GRID, width=1)
        draw.text((6, y - 6), f"{v:5.2f}", fill=TEXT, font=font)
    draw.line([(left, top), (left, top + plot_h)], fill=AXIS, width=1)
    draw.line([(left, top + plot_h), (width - right, top + plot_h)], fill=AXIS, width=1)
    _dashed(draw, left, width - right, y_of(0.0), CHANCE)
    draw.text((width - right - 44, y_of(0.0) - 12), "chance", fill=CHANCE, font=font)
    if threshold is not None and math.isfinite(threshold):
        _dashed(draw, left, width - right, y_of(threshold), THRESH)
        draw.text((left + 4, y_of(threshold) - 12), f"threshold {threshold:g}", fill=THRESH, font=font)

    # points
    rad = max(1.5, min(4.0, col / 2.5))
    for i, r in enumerate(rows):
        x = left + (i + 0.5) * col
        for s in r["scores"]:
            y = y_of(s)
            draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=CAND)
        if r["best"] is None:
            _cross(draw, x, top + plot_h - 6, rad, CAND)
            continue
        color = _best_mark(r)[1]
        y = y_of(r["best"])
        draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=color)

    draw.text((left, 6), title or "normalised subspace similarity per source layer (best candidate)", fill=TEXT,
              font=font)
    # legend row, then the note on the score scale below it
    x, y = left, height - LEGEND_ROW
    for name, shape, color in legend_entries(rows):
        if shape == "cross":
            _cross(draw, x + 4, y + 4, 4, color)
        else:
            draw.ellipse([x, y, x + 8, y + 8], fill=color)
        draw.text((x + 12, y - 2), name, fill=TEXT, font=font)
        x += LEGEND_STEP
    draw.text((left, height - 18), "normalised score: 0 = chance, 1 = same subspace", fill=TEXT, font=font)

    if path is not None:
        img.save(Path(path), format="PNG")
    return np.asarray(img, dtype=np.float32) / 255.0
