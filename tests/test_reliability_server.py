"""Bad inputs and faults through the real headless ComfyUI server with this pack installed (one server for
the whole session: the ``comfy_server`` fixture).

* Every bad LoRA file of tests/bad_inputs.py, given to Load Source LoRA (by ``lora_path``, and uploaded into
  ``models/loras``): the prompt fails with an ``execution_error`` carrying the pack's one-line message, which
  names the file as ComfyUI lists it (never by the server's path), and the next good prompt on the same server
  works.
* Wrong architectures: an SDXL LoRA as the source, SD1.5 as Apply to SDXL's model.
* Path inputs leading out of the loras folders; save names that try to leave the output folder; an output
  folder that cannot be created.
* Cancel while a transfer runs, at a known step (the test hooks interrupt exactly as POST /interrupt does, when
  the node's progress reaches it: no race a fast machine could lose): no output, no temporary files, the cache
  stays valid and the next run equals the engine's own result.
* Two prompts queued together give the results each gives alone.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid

import bad_inputs as bad
import pytest
import torch
from comfy_harness import PromptError
from safetensors.torch import load_file

from lorax_engine.analysis.subspaces import SubspaceCache
from lorax_engine.files.base_weights import CheckpointWeights
from lorax_engine.files.lora_formats import read_lora
from lorax_engine.files.safetensors_file import SafetensorsFile
from lorax_engine.projection.transfer import TransferOptions, transfer

pytestmark = pytest.mark.server

SD15, SDXL = "reliability_sd15.safetensors", "reliability_sdxl.safetensors"
GOOD = "reliability_good.safetensors"
BIG = "reliability_big.safetensors"      # three layer kinds: about 80 progress steps to cancel in
BIG_KEYS = (*bad.GOOD_KEYS, "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight")
CANCEL_RANK = 40                          # used by no other prompt: its bases are not cached before the cancel
CANCEL_STEP = 5                           # the Similarity node's progress step at which Cancel is pressed


@pytest.fixture(scope="module")
def server(comfy_server, zoo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reliability_loras")
    comfy_server.upload_model("checkpoints", zoo.checkpoint(bad.SOURCE_MODEL), SD15)
    comfy_server.upload_model("checkpoints", zoo.checkpoint(bad.TARGET_MODEL), SDXL)
    comfy_server.upload_model("loras", bad.good_lora(folder / GOOD), GOOD, copy=True)
    comfy_server.upload_model("loras", bad.lf.save(bad.good_state_dict(seed=21, keys=BIG_KEYS), folder / BIG), BIG,
                              copy=True)
    return comfy_server


_runs = iter(range(1, 1_000_000))


@pytest.fixture
def lora_dir(server):
    """A fresh folder inside the server's loras folder: the only place lora_path may read from."""
    folder = server.base_dir / "models" / "loras" / f"tmp_{next(_runs)}"
    folder.mkdir()
    return folder


def _load(lora_path="", lora_name=GOOD, strength=1.0):
    return {"class_type": "LoRAX_LoadSourceLoRA",
            "inputs": {"lora_name": lora_name, "strength": strength, "lora_path": str(lora_path)}}


def load_prompt(lora_path="", lora_name=GOOD):
    return {"1": _load(lora_path, lora_name), "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}


def transfer_prompt(lora_path="", lora_name=GOOD, rank=8, method="fast", filename="reliability",
                    save_to="output", apply_model=None, target="11"):
    """Load both checkpoints, the LoRA, similarity (every candidate applies), project and save."""
    prompt = {
        "10": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
        "11": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL}},
        "1": _load(lora_path, lora_name),
        "3": {"class_type": "LoRAX_SubspaceSimilarity", "inputs": {
            "source_model": ["10", 0], "target_model": [target, 0], "rank": rank, "threshold": -1.0,
            "policy": "best", "method": method, "lora": ["1", 0]}},
        "4": {"class_type": "LoRAX_ProjectLoRA", "inputs": {
            "lora": ["1", 0], "subspace_map": ["3", 0], "mode": "subspace", "rank_cap": 0}},
        "5": {"class_type": "LoRAX_SaveLoRA", "inputs": {
            "projected_lora": ["4", 0], "filename_prefix": f"loras/{filename}", "save_to": save_to}},
    }
    if apply_model is not None:
        del prompt["5"]
        prompt["6"] = {"class_type": "LoRAX_ApplyToSDXL", "inputs": {
            "model": [apply_model, 0], "clip": ["10", 1], "projected_lora": ["4", 0],
            "strength_model": 1.0, "strength_clip": 1.0}}
        prompt["7"] = {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}}
    return prompt


def assert_server_still_works(server):
    """A good prompt right after a failure succeeds (a new strength, so ComfyUI's cache cannot answer it)."""
    prompt = load_prompt()
    prompt["1"]["inputs"]["strength"] = 1.0 - next(_runs) * 1e-4
    history = server.run_prompt(prompt, timeout=120)
    assert history["status"]["status_str"] == "success"
    [text] = history["outputs"]["2"]["text"]
    assert text.startswith(f"{GOOD}: kohya, architecture sd1")


def run_failing(server, prompt, node_type="LoRAX_LoadSourceLoRA") -> str:
    with pytest.raises(PromptError) as info:
        server.run_prompt(prompt, timeout=300)
    details = info.value.details
    assert details.get("node_type") == node_type, info.value
    # ComfyUI appends a line of tips (empty unless it is out of memory)
    message, tips = details["exception_message"].split("\n", 1)
    assert tips == "" and "Traceback" not in message
    return message


def _saved(history, node="5"):
    return history["outputs"][node]["text"][0]


# --- bad LoRA files ------------------------------------------------------------------------------------

READ_CASES = sorted(name for name, case in bad.LORA_CASES.items() if case.stage == "read")


@pytest.mark.parametrize("name", READ_CASES)
def test_bad_lora_file_fails_its_node_with_the_message(server, lora_dir, name):
    path = bad.make(bad.LORA_CASES, name, lora_dir)
    message = run_failing(server, load_prompt(lora_path=path))
    listed = path.relative_to(server.base_dir / "models" / "loras")      # as the LoRA list shows it
    assert message.startswith(f"{listed}: ") and bad.LORA_CASES[name].problem in message
    assert str(server.base_dir) not in message
    assert not bad.code_marker(path).exists()
    assert_server_still_works(server)


@pytest.mark.parametrize("name", ["truncated.safetensors", "pickle_with_code.ckpt", "pickle_with_code.pt",
                                  "pickle_with_code.bin", "nan_values.safetensors", "empty.safetensors"])
def test_bad_lora_file_uploaded_into_the_loras_folder(server, tmp_path, name):
    """Picked from the LoRA dropdown, as most users would: the same message, naming the file."""
    src = bad.make(bad.LORA_CASES, name, tmp_path)
    upload = f"reliability_{name}"
    dest = server.base_dir / "models" / "loras" / upload
    shutil.copyfile(src, dest)
    try:
        message = run_failing(server, load_prompt(lora_name=upload))
        assert message.startswith(f"{upload}: ") and bad.LORA_CASES[name].problem in message
        assert str(server.base_dir) not in message
        assert not bad.code_marker(dest).exists()
    finally:
        dest.unlink()
    assert_server_still_works(server)


@pytest.mark.parametrize("name", sorted(n for n, c in bad.LORA_CASES.items() if c.stage == "transfer"))
def test_lora_that_does_not_fit_the_source_model(server, lora_dir, name):
    path = bad.make(bad.LORA_CASES, name, lora_dir)
    message = run_failing(server, transfer_prompt(lora_path=path), node_type="LoRAX_SubspaceSimilarity")
    listed = path.relative_to(server.base_dir / "models" / "loras")
    assert bad.LORA_CASES[name].problem in message and message.startswith(f"{listed}")
    assert str(server.base_dir) not in message
    assert_server_still_works(server)


def test_apply_to_sdxl_refuses_an_sd15_model(server):
    message = run_failing(server, transfer_prompt(apply_model="10"), node_type="LoRAX_ApplyToSDXL")
    assert "Apply to SDXL needs an SDXL model, but the model input is SD15" in message
    # SD1.5 -> SD1.5 (a fine-tune) is a legitimate transfer, but its result is no SDXL LoRA
    message = run_failing(server, transfer_prompt(apply_model="11", target="10"), node_type="LoRAX_ApplyToSDXL")
    assert "the projected LoRA is for 'sd1', not SDXL" in message
    path = _saved(server.run_prompt(transfer_prompt(target="10", filename="sd15_to_sd15"), timeout=600))
    assert read_lora(path).architecture == "sd1"
    history = server.run_prompt(transfer_prompt(apply_model="11"), timeout=600)     # the SDXL model is fine
    assert history["status"]["status_str"] == "success"


def test_mixed_dtype_and_weights_only_pickle_loras_work(server, lora_dir):
    """Unusual but valid files transfer exactly like their plain fp32 .safetensors twin."""
    mixed = bad.mixed_dtype_lora(lora_dir / "mixed.safetensors", seed=41)
    twin = bad.lf.save({k: v.float() for k, v in load_file(str(mixed)).items()}, lora_dir / "twin.safetensors")
    pickled = lora_dir / "pickled.pt"
    torch.save(load_file(str(twin)), str(pickled))
    paths = {p.stem: _saved(server.run_prompt(transfer_prompt(lora_path=p, filename=p.stem), timeout=600))
             for p in (mixed, twin, pickled)}
    _assert_same_lora(paths["mixed"], read_lora(paths["twin"]), exact=True)
    _assert_same_lora(paths["pickled"], read_lora(paths["twin"]), exact=True)


# --- output names ----------------------------------------------------------------------------------------

# filename_prefix as core's Save nodes read it: subfolders of the output folder, a _00001_ counter
SAVED_NAMES = {
    "loras/sub/dir/name": "loras/sub/dir/name_00001_.safetensors",
    "loras/a\x00b": "loras/a_b_00001_.safetensors",
    "loras/nul.txt": "loras/nul_.txt_00001_.safetensors",        # a name Windows reserves
    "loras/x/../inside": "loras/inside_00001_.safetensors",     # '..' that stays inside
    "loras/" + "é" * 300: "loras/" + "é" * 60 + "_00001_.safetensors",   # 120 bytes: the temporary name fits
}
LEAVING = ["../../escaped", "/etc/passwd", "loras/../../escaped", "/"]


def _all_files(server) -> set:
    """Every file the server's folders hold (the pack's own folder in custom_nodes aside)."""
    top = {p for p in server.base_dir.iterdir() if p.is_file()}
    return top.union(*(_files(server.base_dir / sub) for sub in ("output", "models", "user", "input", "temp")))


def test_save_names_never_leave_the_output_folder(server):
    server.run_prompt(transfer_prompt(filename="warm_up"), timeout=600)   # bases cached: later prompts only save
    before = _all_files(server)
    for prefix, expected in SAVED_NAMES.items():
        path = _saved(server.run_prompt(transfer_prompt(filename=prefix[len("loras/"):]), timeout=600))
        assert path == str(server.output_dir / expected), prefix
        assert read_lora(path).layers
    created = _all_files(server) - before
    assert len(created) == len(SAVED_NAMES)
    assert all(server.output_dir.resolve() in p.resolve().parents for p in created)
    for prefix in LEAVING:
        prompt = transfer_prompt()
        prompt["5"]["inputs"]["filename_prefix"] = prefix
        message = run_failing(server, prompt, node_type="LoRAX_SaveLoRA")
        assert message == (f"filename_prefix {prefix!r} leaves the output folder; use a relative name such as "
                           "loras/lorax_sdxl")
    for name in ("", "....", "..\\.."):
        prompt = transfer_prompt()
        prompt["5"]["inputs"]["filename_prefix"] = name
        message = run_failing(server, prompt, node_type="LoRAX_SaveLoRA")
        assert "has no usable characters" in message
    assert _all_files(server) - before == created


def test_lora_path_out_of_the_loras_folders_is_refused(server, tmp_path, lora_dir):
    """A link inside the loras folder leading out is refused like any outside path, revealing nothing."""
    secret = bad.good_lora(tmp_path / "secret.safetensors")
    (lora_dir / "innocent.safetensors").symlink_to(secret)
    for path in (lora_dir / "innocent.safetensors", secret, lora_dir / ".." / ".." / ".." / "nothing.safetensors"):
        message = run_failing(server, load_prompt(lora_path=path))
        assert message == ("lora_path: only files inside ComfyUI's models/loras folders can be read; choose the "
                           "file from the list, or start ComfyUI with LORAX_ALLOW_ANY_PATH=1 to allow any path")
    assert_server_still_works(server)


def test_output_folder_that_cannot_be_created(server):
    blocker = server.base_dir / "models" / "loras" / "lorax"
    assert not blocker.exists()
    blocker.write_text("a file where the pack's output folder should be")
    try:
        message = run_failing(server, transfer_prompt(save_to="models/loras/lorax"), node_type="LoRAX_SaveLoRA")
        assert message == "models/loras/lorax: the folder cannot be created (File exists)"
    finally:
        blocker.unlink()
    assert_server_still_works(server)


# --- cancel and concurrency ----------------------------------------------------------------------------

async def _progress_until_done(server, prompt: dict, node: str, timeout: float = 600):
    """Queue ``prompt``; returns its final event type and the progress values ``node`` reported."""
    import aiohttp

    client_id = uuid.uuid4().hex
    deadline = time.monotonic() + timeout
    values = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
            async with session.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                assert r.status == 200, await r.text()
                prompt_id = (await r.json())["prompt_id"]
            while True:
                msg = await ws.receive(timeout=max(deadline - time.monotonic(), 1))
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(msg.data)
                data = event.get("data") or {}
                if data.get("prompt_id") != prompt_id:
                    continue
                kind = event["type"]
                if kind == "progress" and data.get("node") == node:
                    values.append(data["value"])
                if kind in ("execution_interrupted", "execution_error", "execution_success"):
                    return kind, values


def _files(folder, pattern="*"):
    return sorted(p for p in folder.rglob(pattern) if p.is_file()) if folder.exists() else []


def _expected(zoo, lora_path, rank, method):
    """The engine's own transfer of the file, in-process, without any cache."""
    options = TransferOptions(rank=rank, method=method, threshold=-1.0, policy="best", mode="subspace")  # as the prompt
    with CheckpointWeights(zoo.checkpoint(bad.SOURCE_MODEL)) as source, \
            CheckpointWeights(zoo.checkpoint(bad.TARGET_MODEL)) as target:
        result, _ = transfer(read_lora(lora_path), source, target, options, cache=SubspaceCache())
    return result


def _assert_same_lora(path, expected, exact=False):
    got = read_lora(path)
    assert sorted(got.layers) == sorted(expected.layers) and got.layers
    for key, layer in expected.layers.items():
        want = layer.to(dtype=torch.float16).delta()      # the file holds fp16 factors
        tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-3, "atol": 1e-3 * float(want.abs().max())}
        torch.testing.assert_close(got.layers[key].delta(), want, **tol)


def test_cancel_mid_transfer_leaves_no_output_and_a_valid_cache(server, zoo):
    cache_dir = server.base_dir / "user" / "lorax_cache"
    prompt = transfer_prompt(lora_name=BIG, rank=CANCEL_RANK, filename="cancelled")
    server.interrupt_at("3", CANCEL_STEP)
    kind, values = asyncio.run(_progress_until_done(server, prompt, node="3"))
    assert kind == "execution_interrupted" and max(values) == CANCEL_STEP, (kind, values)
    assert _files(server.output_dir / "loras", "cancelled*") == []
    assert [p for sub in ("output", "user", "models") for p in _files(server.base_dir / sub, "*.tmp")] == []
    entries = _files(cache_dir / "subspaces" / "bases", "*.safetensors")
    assert entries, "the transfer was cancelled before it wrote any cache entry"
    for entry in entries:      # complete, readable entries only
        with SafetensorsFile(entry) as f:
            assert f.metadata["lorax.cache_key"].startswith("lorax-subspace-")
            assert all(torch.isfinite(f.get(k)).all() for k in f.keys())

    path = _saved(server.run_prompt(prompt, timeout=900))          # the same prompt again, to the end
    _assert_same_lora(path, _expected(zoo, server.base_dir / "models" / "loras" / BIG, CANCEL_RANK, "fast"))


def test_two_prompts_queued_together_equal_each_run_alone(server, lora_dir):
    loras = {seed: bad.good_lora(lora_dir / f"seed{seed}.safetensors", seed=seed) for seed in (31, 32)}
    alone = {seed: _saved(server.run_prompt(transfer_prompt(lora_path=p, filename=f"alone{seed}"), timeout=600))
             for seed, p in loras.items()}

    async def both():
        import aiohttp
        async with aiohttp.ClientSession() as session:
            ids = {}
            for seed, src in loras.items():
                copy = lora_dir / f"copy{seed}.safetensors"       # a new path: ComfyUI's cache cannot answer
                shutil.copyfile(src, copy)
                payload = {"prompt": transfer_prompt(lora_path=copy, filename=f"together{seed}")}
                async with session.post(f"{server.url}/prompt", json=payload) as r:
                    assert r.status == 200, await r.text()
                    ids[seed] = (await r.json())["prompt_id"]
            deadline = time.monotonic() + 900
            done = {}
            while len(done) < len(ids) and time.monotonic() < deadline:
                for seed, pid in ids.items():
                    async with session.get(f"{server.url}/history/{pid}") as r:
                        entry = (await r.json()).get(pid)
                    if entry and entry["status"]["completed"]:
                        done[seed] = entry
                await asyncio.sleep(0.2)
            return done

    together = asyncio.run(both())
    assert sorted(together) == sorted(loras)
    for seed in loras:
        assert together[seed]["status"]["status_str"] == "success"
        path = _saved(together[seed])
        assert path.endswith(f"/loras/together{seed}_00001_.safetensors")
        _assert_same_lora(path, read_lora(alone[seed]), exact=True)
