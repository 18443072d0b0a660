"""Writes the UI-format example workflows (workflows/*.json) from their API-format twins
(workflows/api/*.json), using the node definitions of a headless ComfyUI server with this pack loaded.

    .venv/bin/python scripts/make_ui_workflows.py
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from comfy_harness import ComfyServer  # noqa: E402
from workflow_format import api_to_ui  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as base, ComfyServer(Path(base)) as server:
        object_info = server.object_info()
    for api_path in sorted((REPO / "workflows" / "api").glob("*.json")):
        ui = api_to_ui(json.loads(api_path.read_text()), object_info)
        out = REPO / "workflows" / api_path.name
        out.write_text(json.dumps(ui, indent=1) + "\n")
        print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
