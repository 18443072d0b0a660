"""Test-only ComfyUI extension, installed next to the pack in the test server (tests/comfy_harness.py,
``ComfyServer(test_hooks=True)``): ``POST /lorax_test/interrupt_at`` with ``{"node": "3", "step": 5}`` makes the
server interrupt the running prompt when that node's progress bar reaches that step, exactly as the Cancel button
does (``interrupt_current_processing``), but at a known point of the work instead of a race with it (a GPU may
finish a transfer before an interrupt sent over HTTP arrives). Inert until armed; each arming fires once."""
import comfy.model_management
import comfy.utils
from aiohttp import web
from server import PromptServer

_armed: dict[str, int] = {}
_update_absolute = comfy.utils.ProgressBar.update_absolute


def _update_and_maybe_interrupt(self, value, total=None, preview=None):
    _update_absolute(self, value, total, preview)
    step = _armed.get(str(self.node_id))
    if step is not None and self.current >= step:
        del _armed[str(self.node_id)]
        comfy.model_management.interrupt_current_processing(True)


comfy.utils.ProgressBar.update_absolute = _update_and_maybe_interrupt


@PromptServer.instance.routes.post("/lorax_test/interrupt_at")
async def interrupt_at(request):
    body = await request.json()
    _armed[str(body["node"])] = int(body["step"])
    return web.json_response({"armed": dict(_armed)})


NODE_CLASS_MAPPINGS = {}
