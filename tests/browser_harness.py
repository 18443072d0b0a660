"""The real ComfyUI frontend in headless Chromium (Playwright driving Debian's chromium), for tests/test_browser.py
and scripts/make_thumbnails.py: open the frontend served by a ComfyServer, load a UI-format workflow, and frame
chosen nodes at a legible zoom for a screenshot."""
from __future__ import annotations

import contextlib
import shutil

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# closed network: keep Chromium from reaching out (its connections would be refused, many at a time)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# room the frontend's own chrome takes around the canvas: the sidebar on the left; the announcement banner,
# workflow tabs and the run toolbar on top
CHROME_LEFT, CHROME_TOP, PAD = 60, 130, 30


def wait_for_app(page) -> None:
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
    page.wait_for_function("() => window.LiteGraph.registered_node_types['LoRAX_ProjectLoRA'] !== undefined",
                           timeout=180_000)


@contextlib.contextmanager
def frontend(server, playwright_api, viewport=(1600, 1000)):
    """A page on ``server``'s frontend with the pack loaded; ``page.lorax_errors`` collects uncaught page errors."""
    # a fresh user gets the template browser first: mark the tour done so screenshots show the canvas; the
    # minimap, canvas menu and canvas info would cover nodes in the corners of a framed screenshot
    for setting, value in (("Comfy.TutorialCompleted", True), ("Comfy.Minimap.Visible", False),
                           ("Comfy.Graph.CanvasMenu", False), ("Comfy.Graph.CanvasInfo", False)):
        status, _ = server.post_json(f"/settings/{setting}", value)
        if status != 200:
            raise RuntimeError(f"could not store the {setting} setting: HTTP {status}")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.lorax_errors = []
            page.on("pageerror", lambda err: page.lorax_errors.append(str(err)))
            page.goto(server.url, wait_until="load")
            wait_for_app(page)
            yield page
        finally:
            browser.close()


def load_workflow(page, workflow: dict) -> None:
    page.evaluate("""async (wf) => {
        await window.app.loadGraphData(wf, true, true, null, {showMissingNodesDialog: false,
                                                               showMissingModelsDialog: false});
    }""", workflow)


def frame_nodes(page, prefix: str = "", scale: float = 1.0, max_size=(3600, 2000)) -> None:
    """Resize the viewport to the nodes whose type starts with ``prefix`` (all nodes by default) drawn at ``scale``
    and scroll the canvas so they sit just inside the frontend's sidebar and menu bar."""
    x0, y0, x1, y1 = page.evaluate("""(prefix) => {
        const title = window.LiteGraph.NODE_TITLE_HEIGHT;
        const nodes = window.app.graph.nodes.filter(n => n.type.startsWith(prefix));
        return [Math.min(...nodes.map(n => n.pos[0])), Math.min(...nodes.map(n => n.pos[1] - title)),
                Math.max(...nodes.map(n => n.pos[0] + n.size[0])), Math.max(...nodes.map(n => n.pos[1] + n.size[1]))];
    }""", prefix)
    width = min(max_size[0], round((x1 - x0) * scale) + CHROME_LEFT + 2 * PAD)
    height = min(max_size[1], round((y1 - y0) * scale) + CHROME_TOP + 2 * PAD)
    page.set_viewport_size({"width": width, "height": height})
    page.evaluate("""([x0, y0, scale, left, top]) => {
        const ds = window.app.canvas.ds;
        ds.scale = scale;
        ds.offset = [left / scale - x0, top / scale - y0];
        window.app.canvas.setDirty(true, true);
    }""", [x0, y0, scale, CHROME_LEFT + PAD, CHROME_TOP + PAD])
    # toasts (e.g. "Prefer the legacy design?" after the renderer switch) would cover nodes in the screenshot
    page.evaluate("() => document.querySelectorAll('.p-toast-message').forEach(t => t.remove())")
    page.wait_for_timeout(300)  # one frame for the canvas and the DOM widgets to follow the new transform
