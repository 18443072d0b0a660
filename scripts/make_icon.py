"""Draws the pack's icon, js/icon.png (256 px square, what [tool.comfy] Icon in pyproject.toml names):
a small SD1.5 square carried by an arrow into a larger SDXL square, under "LoRA-X"."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = 256
OUT = Path(__file__).resolve().parent.parent / "js" / "icon.png"


def draw_icon() -> Image.Image:
    img = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle([0, 0, SIZE - 1, SIZE - 1], radius=40, fill=(28, 32, 44, 255))
    d.rounded_rectangle([30, 112, 92, 174], radius=10, fill=(64, 140, 230, 255))     # SD1.5: small
    d.rounded_rectangle([140, 84, 226, 202], radius=14, fill=(63, 174, 90, 255))     # SDXL: larger
    d.line([(98, 143), (128, 143)], fill=(240, 205, 110, 255), width=10)             # the transfer
    d.polygon([(124, 127), (138, 143), (124, 159)], fill=(240, 205, 110, 255))
    font = ImageFont.load_default(size=44)
    text = "LoRA-X"
    width = d.textlength(text, font=font)
    d.text(((SIZE - width) / 2, 22), text, fill=(240, 240, 240, 255), font=font)
    return img


if __name__ == "__main__":
    draw_icon().save(OUT, format="PNG", optimize=True)
    print(OUT)
