"""Makes the Browse Templates thumbnail of every example workflow: workflows/<name>.jpg next to
workflows/<name>.json (ComfyUI serves both under /api/workflow_templates/<pack>/).

Each thumbnail is a screenshot of the workflow loaded in the real frontend (a headless ComfyUI server with this
pack, headless Chromium), at 100 % zoom from the graph's top-left corner, cropped to the canvas. Needs the runtime that
scripts/setup_runtime.sh builds (chromium included). Run: .venv/bin/python scripts/make_thumbnails.py
"""
from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from browser_harness import CHROME_LEFT, CHROME_TOP, CHROMIUM, frame_nodes, frontend, load_workflow  # noqa: E402
from comfy_harness import ComfyServer  # noqa: E402
from PIL import Image  # noqa: E402

VIEW = (1600, 1000)       # every screenshot: what does not fit at 100 % is cut, not shrunk
WIDTH = 800               # thumbnail width; the card in Browse Templates is smaller still


def thumbnail(png: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    return img.resize((WIDTH, round(img.height * WIDTH / img.width)), Image.LANCZOS)


def main() -> int:
    if CHROMIUM is None:
        print("make_thumbnails: chromium is not installed (scripts/setup_runtime.sh installs it as root)",
              file=sys.stderr)
        return 1
    import playwright.sync_api as playwright_api

    workflows = sorted((REPO / "workflows").glob("*.json"))
    with tempfile.TemporaryDirectory() as base, ComfyServer(Path(base)) as server, \
            frontend(server, playwright_api) as page:
        for path in workflows:
            load_workflow(page, json.loads(path.read_text()))
            frame_nodes(page, max_size=VIEW)
            # one size for every card: a small graph keeps its top-left framing on a full-size canvas
            page.set_viewport_size({"width": VIEW[0], "height": VIEW[1]})
            page.wait_for_timeout(300)
            clip = {"x": CHROME_LEFT, "y": CHROME_TOP, "width": VIEW[0] - CHROME_LEFT, "height": VIEW[1] - CHROME_TOP}
            out = path.with_suffix(".jpg")
            thumbnail(page.screenshot(clip=clip)).save(out, format="JPEG", quality=85, optimize=True)
            print(out.relative_to(REPO))
        if page.lorax_errors:
            print("make_thumbnails: page errors:\n" + "\n".join(page.lorax_errors), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
