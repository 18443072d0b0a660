"""Registry and Browse Templates metadata: every example workflow has its same-name .jpg thumbnail (made by
scripts/make_thumbnails.py), which the ComfyUI server serves next to the workflow; the icon pyproject.toml
names exists and is a small square PNG; requires-comfyui names the version the suite runs against."""
from __future__ import annotations

import json
import urllib.request

import pytest
import tomllib
from comfy_harness import REPO_ROOT
from PIL import Image

WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["comfy"]
TEST_RUNTIME = "0.3.75"   # COMFYUI.md: the ComfyUI the suite runs against


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_workflow_has_a_thumbnail(path):
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file(), f"{thumb.name} is missing: run .venv/bin/python scripts/make_thumbnails.py"
    with Image.open(thumb) as img:
        assert img.format == "JPEG"
        assert 400 <= img.width <= 1200 and 200 <= img.height <= img.width


def test_icon_and_requires_comfyui():
    icon = REPO_ROOT / PYPROJECT["Icon"]
    with Image.open(icon) as img:
        assert img.format == "PNG" and img.width == img.height <= 400
    assert PYPROJECT["requires-comfyui"] == f">={TEST_RUNTIME}"
    version = (REPO_ROOT / ".runtime" / "comfyui" / "comfyui_version.py")
    if version.exists():
        assert f'"{TEST_RUNTIME}"' in version.read_text()


@pytest.mark.server
def test_server_lists_the_workflows_and_serves_their_thumbnails(comfy_server):
    listed = comfy_server.get_json("/workflow_templates")
    pack = next(name for name, names in listed.items() if "lorax_convert_and_save" in names)
    assert sorted(listed[pack]) == [p.stem for p in WORKFLOWS]
    for path in WORKFLOWS:
        url = f"{comfy_server.url}/api/workflow_templates/{pack}/{path.stem}.jpg"
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200 and r.read() == path.with_suffix(".jpg").read_bytes()
        with urllib.request.urlopen(f"{comfy_server.url}/api/workflow_templates/{pack}/{path.name}", timeout=30) as r:
            assert json.loads(r.read()) == json.loads(path.read_text())
