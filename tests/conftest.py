"""Shared fixtures: in-process ComfyUI (``comfy``), the synthetic model zoo (``zoo``), a headless ComfyUI
server with this pack installed (``comfy_server``) and ComfyUI log capture (``comfy_logs``).

See tests/comfy_harness.py for the machinery.
"""
from __future__ import annotations

import os

import comfy_harness
import pytest

# ComfyUI must precede the repo root on sys.path before anything can import `nodes` (the repo has its own
# nodes/ package); only the path is set here, ComfyUI itself is imported by the `comfy` fixture (which fails
# with a clear message if the runtime is missing; engine-only tests still run without it).
comfy_harness.ensure_comfy_path(required=False)


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI v0.3.75 imported in-process on CPU (run code under test inside ``torch.inference_mode()``)."""
    return comfy_harness.import_comfy()


@pytest.fixture(scope="session")
def pack(comfy):
    """This pack imported in-process as ComfyUI imports a custom-node folder (``.NODE_CLASS_MAPPINGS``...)."""
    return comfy_harness.load_pack()


@pytest.fixture(scope="session")
def zoo():
    """The ``lorax_zoo`` module; checkpoints are cached in $LORAX_ZOO_DIR or <repo>/.cache/zoo."""
    import lorax_zoo
    return lorax_zoo


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A headless ComfyUI server (``.url``, ``.base_dir``, ``.run_prompt()``, ``.upload_model()``,
    ``.log_text()``, ``.interrupt_at()``) in a temporary base dir, with this repo symlinked as
    ``custom_nodes/lora-x`` and the test hooks (tests/comfy_plugins) beside it. ``$LORAX_FRONTEND_ROOT`` serves
    another frontend build (the ``static`` folder of a comfyui-frontend-package wheel) instead of the pinned one."""
    frontend = os.environ.get("LORAX_FRONTEND_ROOT")
    server = comfy_harness.ComfyServer(tmp_path_factory.mktemp("comfy_base"), test_hooks=True,
                                       extra_args=("--front-end-root", frontend) if frontend else ())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def comfy_logs():
    """Captures logging records during the test; ``.lora_keys_not_loaded()``, ``.messages()``, ``.text``."""
    with comfy_harness.ComfyLogCapture() as capture:
        yield capture
