"""A labelled side-by-side grid of images (columns = variants, rows = prompts/seeds), for judging a
transfer by eye: SDXL without the LoRA | the SD1.5 LoRA through a stock loader | LoRA-X."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_HEIGHT = 28
GAP = 4


def _to_pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def labelled_grid(columns: list[np.ndarray], labels: list[str]) -> np.ndarray:
    """``columns[j]`` is a batch ``[B_j, H, W, 3]`` in 0..1; row i shows image i of every column.

    Images are scaled to the first column's height; missing rows (a shorter batch) stay blank.
    Returns ``[H_total, W_total, 3]`` float32 in 0..1.
    """
    if not columns:
        raise ValueError("labelled_grid needs at least one column of images")
    height = int(columns[0].shape[1])
    scaled = []
    for col in columns:
        imgs = []
        for img in col:
            pil = _to_pil(img)
            if pil.height != height:
                pil = pil.resize((max(1, round(pil.width * height / pil.height)), height), Image.LANCZOS)
            imgs.append(pil)
        scaled.append(imgs)
    widths = [max(p.width for p in col) for col in scaled]
    rows = max(len(col) for col in scaled)
    total_w = sum(widths) + GAP * (len(widths) - 1)
    total_h = LABEL_HEIGHT + rows * height + GAP * (rows - 1)
    canvas = Image.new("RGB", (total_w, total_h), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    x = 0
    for j, col in enumerate(scaled):
        label = labels[j] if j < len(labels) else f"image {j + 1}"
        text_w = draw.textlength(label, font=font)
        draw.text((x + max(0, (widths[j] - text_w) / 2), (LABEL_HEIGHT - 10) / 2), label, fill=(235, 235, 235),
                  font=font)
        for i, pil in enumerate(col):
            canvas.paste(pil, (x, LABEL_HEIGHT + i * (height + GAP)))
        x += widths[j] + GAP
    return np.asarray(canvas, dtype=np.float32) / 255.0
