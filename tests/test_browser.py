"""The real ComfyUI frontend, served by the test server, in headless Chromium (Playwright driving Debian's
chromium): every example workflow loads with no missing or red node, and after a run the pack's canvas
extension shows the transfer verdict on the Project node. Screenshots go to artifacts/browser/."""
from __future__ import annotations

import json
import shutil

import pytest
from comfy_harness import REPO_ROOT

pytestmark = [pytest.mark.browser, pytest.mark.server]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = REPO_ROOT / "artifacts" / "browser"
WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))
# closed network: keep Chromium from reaching out (its connections would be refused, many at a time)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page(comfy_server, zoo, tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (scripts/setup_runtime.sh installs it as root)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    lora = zoo.make_sd15_lora(tmp_path_factory.mktemp("lora") / "my_sd15_style_lora.safetensors", rank=8, seed=11)
    comfy_server.upload_model("checkpoints", zoo.checkpoint("tiny_sd15"), "v1-5-pruned-emaonly.safetensors")
    comfy_server.upload_model("checkpoints", zoo.checkpoint("tiny_sdxl"), "sd_xl_base_1.0.safetensors")
    comfy_server.upload_model("loras", lora, "my_sd15_style_lora.safetensors")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # a fresh user gets the template browser first; mark the tour done so screenshots show the canvas
    status, _ = comfy_server.post_json("/settings/Comfy.TutorialCompleted", True)
    assert status == 200
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(comfy_server.url, wait_until="load")
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        page.wait_for_function("() => window.LiteGraph.registered_node_types['LoRAX_ProjectLoRA'] !== undefined",
                               timeout=60_000)
        page.lorax_errors = errors
        yield page
        browser.close()


def _load(page, workflow: dict):
    page.evaluate("""async (wf) => {
        await window.app.loadGraphData(wf, true, true, null, {showMissingNodesDialog: false,
                                                               showMissingModelsDialog: false});
    }""", workflow)
    _show_whole_graph(page)


def _show_whole_graph(page):
    page.evaluate("""() => {
        const ds = window.app.canvas.ds;
        ds.scale = 0.5;
        ds.offset = [60, 120];
        window.app.canvas.setDirty(true, true);
    }""")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_with_every_node_known(page, path):
    workflow = json.loads(path.read_text())
    _load(page, workflow)
    state = page.evaluate("""() => window.app.graph.nodes.map(n => ({
        id: n.id, type: n.type, known: window.LiteGraph.registered_node_types[n.type] !== undefined,
        red: Boolean(n.has_errors) || n.color === '#FF0000' || n.bgcolor === '#FF0000',
        widgets: (n.widgets || []).length}))""")
    assert len(state) == len(workflow["nodes"])
    assert [s for s in state if not s["known"]] == []
    assert [s for s in state if s["red"]] == []
    page.screenshot(path=str(ARTIFACTS / f"{path.stem}.png"))


def test_extension_shows_the_verdict_after_a_run(page):
    workflow = json.loads((REPO_ROOT / "workflows" / "lorax_convert_and_save.json").read_text())
    _load(page, workflow)
    # unrelated synthetic models score near chance: apply every candidate so something is transferred
    page.evaluate("""() => {
        const sim = window.app.graph.nodes.find(n => n.type === 'LoRAX_SubspaceSimilarity');
        sim.widgets.find(w => w.name === 'threshold').value = -1;
        sim.widgets.find(w => w.name === 'rank').value = 64;
    }""")
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    page.wait_for_function("""() => {
        const n = window.app.graph.nodes.find(n => n.type === 'LoRAX_ProjectLoRA');
        return n && n.loraxSummary !== undefined;
    }""", timeout=600_000, polling=1000)
    summary = page.evaluate("""() => {
        const n = window.app.graph.nodes.find(n => n.type === 'LoRAX_ProjectLoRA');
        return {summary: n.loraxSummary, boxcolor: n.boxcolor};
    }""")
    assert summary["summary"]["applied"] > 0
    assert summary["summary"]["lines"][0].split(":")[0] in ("GOOD", "WEAK")
    assert summary["boxcolor"] in ("#3fae5a", "#d9a520")
    _show_whole_graph(page)
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / "after_run_verdict.png"))
    assert page.lorax_errors == []
