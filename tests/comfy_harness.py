"""Test harness around the real ComfyUI v0.3.75 in ``.runtime/comfyui`` (built by scripts/setup_runtime.sh).

* :func:`import_comfy` imports ComfyUI in-process on CPU.
* :func:`load_pack` imports this repository as a ComfyUI custom-node package, the way ComfyUI's loader does.
* :class:`ComfyLogCapture` collects ComfyUI's logging records (e.g. "lora key not loaded").
* :class:`ComfyServer` runs a headless ComfyUI server with this pack in ``custom_nodes`` and executes
  API-format prompts over HTTP + websocket.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

REPO_ROOT = Path(__file__).resolve().parent.parent
COMFY_DIR = REPO_ROOT / ".runtime" / "comfyui"
PACK_DIR_NAME = "lora-x"          # the folder name a git clone of the pack gets in custom_nodes/
PACK_MODULE_NAME = "lora_x_pack"  # in-process module name of the pack (load_pack)
TEST_HOOKS_DIR = Path(__file__).resolve().parent / "comfy_plugins" / "lorax_test_hooks"


def ensure_comfy_path(required: bool = True) -> None:
    """Put ComfyUI first on sys.path: ahead of the repo root, whose own ``nodes/`` package would otherwise
    shadow ComfyUI's top-level ``nodes`` module. Without the runtime: raise, or do nothing if not required."""
    if not (COMFY_DIR / "main.py").is_file():
        if not required:
            return
        raise RuntimeError(f"ComfyUI runtime missing at {COMFY_DIR}: run `bash scripts/setup_runtime.sh`")
    path = str(COMFY_DIR)
    if sys.path[:1] != [path]:
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)


def import_comfy() -> SimpleNamespace:
    """Import ComfyUI in-process on CPU and return its main modules.

    Attributes: ``sd``, ``lora``, ``utils``, ``model_management``, ``nodes`` (ComfyUI's nodes.py),
    ``folder_paths``, ``ops``, ``model_detection``, ``supported_models``.
    """
    ensure_comfy_path()
    from comfy.cli_args import args
    # As a library ComfyUI parses no argv; without this model_management asserts on a CUDA-less torch.
    args.cpu = True
    import comfy.lora
    import comfy.model_detection
    import comfy.model_management
    import comfy.ops
    import comfy.sd
    import comfy.supported_models
    import comfy.utils
    import folder_paths

    import nodes
    if not str(getattr(nodes, "__file__", "")).startswith(str(COMFY_DIR)):
        raise RuntimeError(f"`nodes` resolved to {nodes.__file__}, not ComfyUI's nodes.py: "
                           "something imported it before ComfyUI was put first on sys.path")
    return SimpleNamespace(sd=comfy.sd, lora=comfy.lora, utils=comfy.utils,
                           model_management=comfy.model_management, nodes=nodes, folder_paths=folder_paths,
                           ops=comfy.ops, model_detection=comfy.model_detection,
                           supported_models=comfy.supported_models)


def load_pack():
    """Import the repository as a custom-node package (module ``lora_x_pack``), as ComfyUI's loader does.

    Call after :func:`import_comfy`; the pack's nodes import ComfyUI modules.
    """
    if PACK_MODULE_NAME in sys.modules:
        return sys.modules[PACK_MODULE_NAME]
    spec = importlib.util.spec_from_file_location(PACK_MODULE_NAME, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_MODULE_NAME]
        raise
    return module


def load_ui_summary():
    """nodes/ui_summary.py on its own (it imports no ComfyUI; the pack's package does): the verdicts the nodes show,
    for tests that compare a node's verdict with the engine's own report."""
    spec = importlib.util.spec_from_file_location("lorax_ui_summary", REPO_ROOT / "nodes" / "ui_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- logs

_NOT_LOADED = re.compile(r"lora key not loaded: (\S+)")


class ComfyLogCapture(logging.Handler):
    """Collects every logging record (ComfyUI logs through the root logger) while attached.

    Use as a context manager; the root logger level is lowered to INFO meanwhile so INFO lines show too.
    """

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._old_level = None

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        root = logging.getLogger()
        self._old_level = root.level
        root.setLevel(min(root.level, logging.INFO))   # NOTSET (0) already passes everything
        root.addHandler(self)
        return self

    def __exit__(self, *exc):
        root = logging.getLogger()
        root.removeHandler(self)
        root.setLevel(self._old_level)

    def messages(self, min_level=logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= min_level]

    @property
    def text(self) -> str:
        return "\n".join(self.messages())

    def lora_keys_not_loaded(self) -> list[str]:
        """The LoRA keys ComfyUI's ``load_lora`` reported as "lora key not loaded"."""
        return lora_keys_not_loaded(self.text)

    def clear(self) -> None:
        self.records.clear()


def patched_weights(comfy, patcher, module=None) -> dict:
    """The weights the sampler sees: ``patcher`` loaded the way ComfyUI's executor loads a patched model, the
    state of ``module`` (default: its UNet) copied as float32, then unloaded again (with ``free_memory``:
    ``unload_all_models`` would also empty the pack's caches)."""
    import torch

    with torch.inference_mode():
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        try:
            module = patcher.model.diffusion_model if module is None else module
            return {k: v.detach().float().clone() for k, v in module.state_dict().items()}
        finally:
            comfy.model_management.free_memory(1e30, comfy.model_management.get_torch_device())


def lora_keys_not_loaded(log_text: str) -> list[str]:
    return _NOT_LOADED.findall(log_text)


# ---------------------------------------------------------------- server

class PromptError(RuntimeError):
    """A prompt was rejected by validation or failed while executing; the message carries ComfyUI's text."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _validation_text(body: dict) -> str:
    lines = [str(body.get("error", {}).get("message", "prompt rejected")),
             str(body.get("error", {}).get("details", ""))]
    for node_id, node in (body.get("node_errors") or {}).items():
        for err in node.get("errors", []):
            lines.append(f"node {node_id} ({node.get('class_type')}): {err.get('message')}: {err.get('details')}")
    return "\n".join(line for line in lines if line)


class ComfyServer:
    """A headless ComfyUI server in its own base directory, with this pack installed as a custom node.

    ``base_dir`` holds ``models/{checkpoints,loras}``, ``custom_nodes/lora-x`` (a symlink to the repo),
    ``input``, ``output``, ``temp``, ``user`` and ``server.log``.
    """

    def __init__(self, base_dir, port: int | None = None, python: str = sys.executable,
                 extra_args: tuple[str, ...] = (), test_hooks: bool = False):
        self.base_dir = Path(base_dir)
        self.test_hooks = test_hooks        # tests/comfy_plugins/lorax_test_hooks: interrupts at a known step
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.python = python
        self.extra_args = tuple(extra_args)
        self.log_path = self.base_dir / "server.log"
        self.process: subprocess.Popen | None = None

    # -- lifecycle
    def start(self, timeout: float = 180.0) -> ComfyServer:
        for sub in ("models/checkpoints", "models/loras", "custom_nodes", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        links = {PACK_DIR_NAME: REPO_ROOT, **({TEST_HOOKS_DIR.name: TEST_HOOKS_DIR} if self.test_hooks else {})}
        for name, target in links.items():
            link = self.base_dir / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--disable-auto-launch", "--dont-print-server",
               "--disable-api-nodes", "--database-url", "sqlite:///:memory:", *self.extra_args]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(cmd, cwd=COMFY_DIR, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} while starting; "
                                   f"log tail:\n{self.log_tail()}")
            try:
                self.get_json("/object_info", timeout=30)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ComfyUI did not answer /object_info within {timeout:.0f} s; "
                                   f"log tail:\n{self.log_tail()}")
            time.sleep(0.3)

    def stop(self, grace: float = 10.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def interrupt_at(self, node: str, step: int) -> None:
        """Interrupt the next prompt when ``node``'s progress reaches ``step`` (needs ``test_hooks=True``)."""
        status, body = self.post_json("/lorax_test/interrupt_at", {"node": node, "step": step})
        if status != 200:
            raise RuntimeError(f"the test hooks did not answer (HTTP {status}): {body}")

    # -- files and logs
    def upload_model(self, kind: str, src_path, name: str | None = None, copy: bool = False) -> str:
        """Make a file available as ``models/<kind>/<name>`` and return the name prompts use.

        A symlink by default (zoo checkpoints are large and read-only); ``copy=True`` copies.
        """
        src = Path(src_path).resolve()
        name = name or src.name
        dest = self.base_dir / "models" / kind / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        if copy:
            shutil.copyfile(src, dest)
        else:
            dest.symlink_to(src)
        return name

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    # -- HTTP
    def get_json(self, path: str, timeout: float = 60):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post_json(self, path: str, payload: dict, timeout: float = 60):
        """POST JSON; returns (status, decoded body) for 2xx and 4xx answers alike."""
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw, status = r.read(), r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def object_info(self, node: str | None = None) -> dict:
        return self.get_json("/object_info" + (f"/{node}" if node else ""))

    # -- prompts
    def run_prompt(self, api_prompt: dict, timeout: float = 300.0, extra_data: dict | None = None) -> dict:
        """Queue an API-format prompt, wait for it over the websocket and return its ``/history`` entry.

        Raises :class:`PromptError` with ComfyUI's text when validation rejects the prompt or a node fails.
        """
        return asyncio.run(self._run_prompt(api_prompt, timeout, extra_data or {}))

    async def _run_prompt(self, api_prompt: dict, timeout: float, extra_data: dict) -> dict:
        import aiohttp

        client_id = uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.url}/ws?clientId={client_id}") as ws:
                payload = {"prompt": api_prompt, "client_id": client_id, "extra_data": extra_data}
                async with session.post(f"{self.url}/prompt", json=payload) as r:
                    body = await r.json(content_type=None)
                    if r.status != 200:
                        raise PromptError(_validation_text(body), body)
                prompt_id = body["prompt_id"]
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"prompt {prompt_id} still running after {timeout:.0f} s")
                    msg = await ws.receive(timeout=remaining)
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            raise RuntimeError(f"websocket closed while prompt {prompt_id} ran; "
                                               f"log tail:\n{self.log_tail()}")
                        continue       # binary preview images
                    event = json.loads(msg.data)
                    data = event.get("data") or {}
                    if data.get("prompt_id") != prompt_id:
                        continue
                    kind = event.get("type")
                    if kind == "execution_error":
                        raise PromptError(
                            f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                            f"{data.get('exception_type')}: {data.get('exception_message')}\n"
                            + "".join(data.get("traceback") or []), data)
                    if kind == "execution_interrupted":
                        raise PromptError(f"prompt {prompt_id} was interrupted", data)
                    if kind == "execution_success" or (kind == "executing" and data.get("node") is None):
                        break
            # the history entry is stored just after the success message is sent
            while True:
                async with session.get(f"{self.url}/history/{prompt_id}") as r:
                    history = await r.json(content_type=None)
                if prompt_id in history:
                    return history[prompt_id]
                if time.monotonic() > deadline:
                    raise TimeoutError(f"prompt {prompt_id} finished but has no history entry")
                await asyncio.sleep(0.05)
