"""The real ComfyUI frontend, served by the test server, in headless Chromium (Playwright driving Debian's
chromium): every example workflow loads with no missing or red node; the one-node loader runs the shipped
text-to-image workflow with its shipped settings and shows its verdict and its report; a verdict belongs to its
run: marked "from an earlier run" after a page reload or when a new run starts, replaced by the failure when the
node fails, and gone from a workflow this server never ran (a shared one); in the classic LiteGraph canvas and in
the Vue ("Nodes 2.0") renderer. Screenshots go to artifacts/browser/ (another frontend's to
artifacts/browser/frontend-<version>/).

The pinned frontend (comfyui-frontend-package 1.32.9) is served by default; ``LORAX_FRONTEND_ROOT`` serves another
build (tests/conftest.py), e.g. 1.58.1's ``static`` folder. Without chromium or the playwright module these tests
skip on a developer's machine and fail when $CI is set, so a CI that lacks the browser cannot stay green without
them."""
from __future__ import annotations

import json
import os
import uuid

import lora_factory
import pytest
from browser_harness import CHROMIUM, frame_nodes, frontend, load_workflow, wait_for_app
from comfy_harness import REPO_ROOT

pytestmark = [pytest.mark.browser, pytest.mark.server]

ARTIFACTS = REPO_ROOT / "artifacts" / "browser"
WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))
VUE_SETTING = "Comfy.VueNodes.Enabled"  # "Modern Node Design (Nodes 2.0)" in frontend 1.32.9
BOX_COLOURS = {"good": "#3fae5a", "weak": "#d9a520", "failed": "#d04a4a"}
STALE_BOX = "#606060"
SDXL_LORA = "my_sdxl_lora.safetensors"


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so the browser tests must run (run scripts/setup_runtime.sh as root)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def playwright_api():
    """Checked before the server starts, so a missing browser is reported at once."""
    if CHROMIUM is None:
        _unavailable("Debian's chromium is not installed (scripts/setup_runtime.sh installs it as root)")
    try:
        import playwright.sync_api
    except ImportError:
        _unavailable("the playwright module is not installed (requirements-dev.txt)")
    return playwright.sync_api


@pytest.fixture(scope="module")
def page(playwright_api, comfy_server, zoo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    lora = zoo.make_sd15_lora(folder / "my_sd15_style_lora.safetensors", rank=8, seed=11)
    sdxl_lora = lora_factory.save(lora_factory.lora_state_dict(lora_factory.random_factors("sdxl", targets=[
        "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight",
        "clip_l.transformer.text_model.encoder.layers.2.self_attn.q_proj.weight"]), "sdxl", "kohya"),
        folder / SDXL_LORA)
    comfy_server.upload_model("checkpoints", zoo.checkpoint("tiny_sd15"), "v1-5-pruned-emaonly.safetensors")
    # the tiny SDXL UNet with SDXL's text encoders and a VAE: every node of every workflow can run
    comfy_server.upload_model("checkpoints", zoo.checkpoint("demo_sdxl"), "sd_xl_base_1.0.safetensors")
    comfy_server.upload_model("loras", lora, "my_sd15_style_lora.safetensors")
    comfy_server.upload_model("loras", sdxl_lora, SDXL_LORA)
    with frontend(comfy_server, playwright_api) as page:
        # another frontend's screenshots go beside the pinned one's, in a folder named by its version
        version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? 'unknown'")
        page.artifacts = ARTIFACTS / f"frontend-{version}" if os.environ.get("LORAX_FRONTEND_ROOT") else ARTIFACTS
        page.artifacts.mkdir(parents=True, exist_ok=True)
        _listen(page)
        yield page


def _listen(page):
    """Record every run's end (after each page load: a reload starts a new page)."""
    page.evaluate("""() => {
        window.__loraxRuns = [];
        for (const name of ['execution_error', 'execution_success'])
            window.app.api.addEventListener(name, (e) => window.__loraxRuns.push([name, e.detail]));
    }""")


def _reload(page, node_type: str):
    page.reload(wait_until="load")
    wait_for_app(page)
    _listen(page)
    page.wait_for_function("(type) => window.app.graph.nodes.some(n => n.type === type)", arg=node_type,
                           timeout=60_000)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_with_every_node_known(page, path):
    workflow = json.loads(path.read_text())
    load_workflow(page, workflow)
    state = page.evaluate("""() => window.app.graph.nodes.map(n => ({
        id: n.id, type: n.type, known: window.LiteGraph.registered_node_types[n.type] !== undefined,
        red: Boolean(n.has_errors) || n.color === '#FF0000' || n.bgcolor === '#FF0000',
        widgets: (n.widgets || []).length}))""")
    assert len(state) == len(workflow["nodes"])
    assert [s for s in state if not s["known"]] == []
    assert [s for s in state if s["red"]] == []
    frame_nodes(page)
    page.screenshot(path=str(page.artifacts / f"{path.stem}.png"))


def _run(page, timeout=600_000) -> tuple[str, dict]:
    """Queue the open workflow and wait for its end: (execution_success | execution_error, the event's detail)."""
    count = page.evaluate("() => window.__loraxRuns.length")
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    page.wait_for_function(f"() => window.__loraxRuns.length > {count}", timeout=timeout, polling=500)
    return page.evaluate(f"() => window.__loraxRuns[{count}]")


def _shown_verdict(page, node_type: str) -> dict:
    """What a node holds and what its verdict widget shows on screen (text, visibility, box colour)."""
    return page.evaluate("""(type) => {
        const n = window.app.graph.nodes.find(n => n.type === type);
        const el = n?.widgets?.find(w => w.name === 'lorax_verdict')?.element;
        const r = el?.getBoundingClientRect();
        const onScreen = Boolean(r && r.width > 0 && r.height > 0 && el.isConnected
                                 && getComputedStyle(el).visibility !== 'hidden'
                                 && el.offsetParent !== null);
        return {id: n?.id, summary: n?.properties?.lorax_summary ?? null, boxcolor: n?.boxcolor ?? null,
                text: el ? el.innerText : null, onScreen,
                inVueNode: Boolean(el?.closest(`[data-node-id="${n?.id}"]`))};
    }""", node_type)


def _assert_shows(shown: dict, lines: list[str], where: str):
    assert shown["onScreen"], f"{where}: the verdict widget is not visible"
    assert shown["text"].splitlines() == lines, where


def _wait_settled(page, node_type: str, stale: bool | None):
    """Wait until the node's verdict is checked against the server (restored workflows) and is (not) stale."""
    page.wait_for_function("""([type, stale]) => {
        const s = window.app.graph.nodes.find(n => n.type === type)?.properties?.lorax_summary;
        return stale === null ? s === undefined : Boolean(s) && Boolean(s.stale) === stale;
    }""", arg=[node_type, stale], timeout=30_000)


def _earlier(page, summary: dict) -> list[str]:
    """The lines a verdict from an earlier run shows: the marker (with the run's local time), then the verdict."""
    when = page.evaluate("(at) => new Date(at).toLocaleString()", summary["run"]["at"])
    return [f"from an earlier run, {when}:", *summary["lines"]]


def _set_vue_nodes(page, enabled: bool):
    page.evaluate("(args) => window.app.extensionManager.setting.set(args[0], args[1])", [VUE_SETTING, enabled])
    page.wait_for_timeout(1500)  # the renderer switch mounts or unmounts every node


def _set_widgets(page, values: dict):
    """{node type: {widget: value}} on the open workflow, as a user would set them."""
    page.evaluate("""(values) => {
        for (const [type, widgets] of Object.entries(values))
            for (const node of window.app.graph.nodes.filter(n => n.type === type))
                for (const [name, value] of Object.entries(widgets))
                    node.widgets.find(w => w.name === name).value = value;
    }""", values)


def test_verdict_belongs_to_its_run_in_both_renderers(page, tmp_path):
    """The four-node workflow with its shipped settings: the verdict after the run; after a reload and a
    save/load on this server, marked "from an earlier run"; gone when the workflow comes from elsewhere."""
    workflow = json.loads((REPO_ROOT / "workflows" / "lorax_convert_and_save.json").read_text())
    load_workflow(page, workflow)
    event, detail = _run(page)
    assert event == "execution_success", json.dumps(detail)[:2000]
    page.wait_for_function("""() => window.app.graph.nodes.find(n => n.type === 'LoRAX_ProjectLoRA')
                                        ?.properties?.lorax_summary !== undefined""", timeout=10_000)
    shown = _shown_verdict(page, "LoRAX_ProjectLoRA")
    summary = shown["summary"]
    # the tiny zoo's unrelated random UNets: a few UNet layers pass the default threshold and carry little; the
    # text encoder (the same CLIP-L in both checkpoints) arrives whole
    assert summary["verdict"] == "weak" and summary["applied"] > summary["identical_layers"] == 66
    assert summary["run"]["prompt_id"] == detail["prompt_id"] and not summary.get("stale")
    assert summary["lines"][0].endswith("; falls short on:")
    assert shown["boxcolor"] == BOX_COLOURS["weak"]
    _assert_shows(shown, summary["lines"], "after the run")
    # every LoRAX_ node that reported shows its own verdict too (no hard-coded node list in js/lorax.js)
    reported = page.evaluate("""() => window.app.graph.nodes.filter(n => n.type.startsWith('LoRAX_'))
        .map(n => [n.type, Boolean(n.properties?.lorax_summary),
                   Boolean(n.widgets?.find(w => w.name === 'lorax_verdict')?.element?.innerText)])""")
    assert {t for t, stored, _ in reported if stored} == {"LoRAX_LoadSourceLoRA", "LoRAX_SubspaceSimilarity",
                                                          "LoRAX_ProjectLoRA", "LoRAX_SaveLoRA"}
    assert all(text == stored for _, stored, text in reported)
    frame_nodes(page, "LoRAX_")
    page.screenshot(path=str(page.artifacts / "after_run_verdict.png"))

    # a reload restores the open workflow from what the frontend persisted: this server ran that prompt
    _reload(page, "LoRAX_ProjectLoRA")
    _wait_settled(page, "LoRAX_ProjectLoRA", stale=True)
    frame_nodes(page, "LoRAX_")
    shown = _shown_verdict(page, "LoRAX_ProjectLoRA")
    assert shown["boxcolor"] == STALE_BOX and {**shown["summary"], "stale": False} == {**summary, "stale": False}
    _assert_shows(shown, _earlier(page, summary), "after a page reload")
    page.screenshot(path=str(page.artifacts / "after_reload_verdict.png"))

    # saved to a file and loaded back on this server: the same
    saved = json.loads(page.evaluate("() => JSON.stringify(window.app.graph.serialize())"))
    page.evaluate("() => window.app.graph.clear()")
    assert _shown_verdict(page, "LoRAX_ProjectLoRA")["id"] is None
    load_workflow(page, saved)
    _wait_settled(page, "LoRAX_ProjectLoRA", stale=True)
    frame_nodes(page, "LoRAX_")
    _assert_shows(_shown_verdict(page, "LoRAX_ProjectLoRA"), _earlier(page, summary), "after saving and loading")

    # the Vue renderer mounts the same DOM widget inside its own node element
    assert page.evaluate("(name) => window.app.extensionManager.setting.get(name)", VUE_SETTING) is not None, \
        f"frontend has no {VUE_SETTING} setting"
    _set_vue_nodes(page, True)
    try:
        frame_nodes(page, "LoRAX_")
        shown = _shown_verdict(page, "LoRAX_ProjectLoRA")
        assert shown["inVueNode"], "the verdict widget is not inside the Vue node"
        _assert_shows(shown, _earlier(page, summary), "in the Vue renderer")
        page.screenshot(path=str(page.artifacts / "vue_nodes_verdict.png"))
    finally:
        _set_vue_nodes(page, False)

    # run again with nothing changed: ComfyUI reuses every node's result, so the verdict is this run's again
    event, detail = _run(page)
    assert event == "execution_success", json.dumps(detail)[:2000]
    _wait_settled(page, "LoRAX_ProjectLoRA", stale=False)
    shown = _shown_verdict(page, "LoRAX_ProjectLoRA")
    assert shown["summary"]["run"]["prompt_id"] == detail["prompt_id"] and shown["boxcolor"] == BOX_COLOURS["weak"]
    _assert_shows(shown, summary["lines"], "after a run that reused the node's result")

    # the same workflow as someone else shares it: their run is no run of this server, so no verdict shows
    foreign = json.loads(json.dumps(saved))
    for node in foreign["nodes"]:
        if "lorax_summary" in node.get("properties", {}):
            node["properties"]["lorax_summary"]["run"]["prompt_id"] = str(uuid.uuid4())
    load_workflow(page, foreign)
    for node_type in ("LoRAX_ProjectLoRA", "LoRAX_SubspaceSimilarity", "LoRAX_LoadSourceLoRA", "LoRAX_SaveLoRA"):
        _wait_settled(page, node_type, stale=None)
        shown = _shown_verdict(page, node_type)
        assert shown["text"] in (None, "") and shown["boxcolor"] is None, node_type
    assert page.lorax_errors == []


def _report_shown(page) -> str | None:
    """The text the Preview Any node of the one-node workflow shows (the loader's report)."""
    return page.evaluate("""() => {
        const n = window.app.graph.nodes.find(n => n.type === 'PreviewAny');
        const texts = (n?.widgets ?? []).map(w => w.value).filter(v => typeof v === 'string');
        return texts.find(t => t.startsWith('LoRA-X')) ?? null;
    }""")


def test_one_node_loader_run_report_failure_and_reload(page):
    """The shipped one-node text-to-image workflow, as shipped (no LoRA-X Options node), the image cut to 64 px
    and 2 steps for the CPU: the loader's verdict and the report in Preview Any; a failing run shows the failure
    on the loader; after a reload the verdict is marked as from an earlier run."""
    workflow = json.loads((REPO_ROOT / "workflows" / "lorax_sdxl_text_to_image.json").read_text())
    load_workflow(page, workflow)
    _set_widgets(page, {"EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 2}})
    event, detail = _run(page)
    assert event == "execution_success", json.dumps(detail)[:2000]
    _wait_settled(page, "LoRAX_LoadSD15LoRAIntoSDXL", stale=False)
    shown = _shown_verdict(page, "LoRAX_LoadSD15LoRAIntoSDXL")
    summary = shown["summary"]
    assert summary["verdict"] == "weak" and summary["identical_layers"] == 66 and not summary["reused"]
    assert summary["lines"][0].endswith("; falls short on:") and shown["boxcolor"] == BOX_COLOURS["weak"]
    _assert_shows(shown, summary["lines"], "after the run")
    report = _report_shown(page)
    assert report is not None and report.splitlines()[0] == (
        "LoRA-X auto: v1-5-pruned-emaonly.safetensors (sd1) -> unknown (ComfyUI MODEL input) (sdxl)")
    frame_nodes(page)
    page.screenshot(path=str(page.artifacts / "one_node_after_run.png"))

    # an SDXL LoRA picked from the list: the run fails on the loader, which says so instead of the old verdict
    _set_widgets(page, {"LoRAX_LoadSD15LoRAIntoSDXL": {"lora_name": SDXL_LORA}})
    event, detail = _run(page)
    assert event == "execution_error" and detail["node_type"] == "LoRAX_LoadSD15LoRAIntoSDXL"
    message = (f"{SDXL_LORA}: this is already an SDXL LoRA: use Load LoRA (or any SDXL LoRA loader) instead; "
               "LoRA-X carries SD1.5 LoRAs to SDXL")
    assert detail["exception_message"].splitlines()[0] == message
    page.wait_for_function("""() => window.app.graph.nodes.find(n => n.type === 'LoRAX_LoadSD15LoRAIntoSDXL')
                                        ?.properties?.lorax_summary?.verdict === 'failed'""", timeout=10_000)
    failed = _shown_verdict(page, "LoRAX_LoadSD15LoRAIntoSDXL")
    assert " ".join(failed["text"].splitlines()) == f"FAILED: {message}"
    assert failed["boxcolor"] == BOX_COLOURS["failed"] and failed["onScreen"]
    page.screenshot(path=str(page.artifacts / "one_node_failed_dialog.png"))    # the frontend's own error dialog
    page.keyboard.press("Escape")
    frame_nodes(page)
    page.screenshot(path=str(page.artifacts / "one_node_failed.png"))

    # the LoRA back, a run that reuses the transfer, then a reload: the verdict is from an earlier run
    _set_widgets(page, {"LoRAX_LoadSD15LoRAIntoSDXL": {"lora_name": "my_sd15_style_lora.safetensors",
                                                       "strength_model": 0.5}})
    event, detail = _run(page)
    assert event == "execution_success", json.dumps(detail)[:2000]
    page.wait_for_function("""() => window.app.graph.nodes.find(n => n.type === 'LoRAX_LoadSD15LoRAIntoSDXL')
                                        ?.properties?.lorax_summary?.reused === true""", timeout=10_000)
    again = _shown_verdict(page, "LoRAX_LoadSD15LoRAIntoSDXL")["summary"]
    assert again["lines"] == [*summary["lines"], "transfer reused: only the patch was recomputed"]
    _reload(page, "LoRAX_LoadSD15LoRAIntoSDXL")
    _wait_settled(page, "LoRAX_LoadSD15LoRAIntoSDXL", stale=True)
    shown = _shown_verdict(page, "LoRAX_LoadSD15LoRAIntoSDXL")
    _assert_shows(shown, _earlier(page, again), "after a page reload")
    assert shown["boxcolor"] == STALE_BOX
    frame_nodes(page)
    page.screenshot(path=str(page.artifacts / "one_node_after_reload.png"))
    assert page.lorax_errors == []
