"""The one-node loader (Load SD1.5 LoRA into SDXL) in-process on real ComfyUI ModelPatchers, with its shipped
defaults (no LoRA-X Options node): it patches exactly W0 + strength * ΔW of the engine's own transfer and says what
its verdict rests on; a strength change recomputes nothing but the patch; strengths 0 and 0 transfer nothing;
wrong files (an SDXL checkpoint as the source, an SDXL LoRA, a code-running .ckpt) are refused in one line naming
them by their listed names before any work; an old-style SD1.5 .ckpt is read; the cache goes where
LORAX_CACHE_DIR or extra_model_paths' lorax_cache say and keeps its disk bound while a transfer runs and after a
Cancel; ComfyUI's "free memory" (``unload_all_models``) empties the pack's in-memory caches."""
from __future__ import annotations

import os
import time

import bad_inputs as bad
import comfy_harness
import lora_factory
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorax_engine.analysis.disk_budget import bases_bytes
from lorax_engine.analysis.subspaces import SubspaceCache
from lorax_engine.files.base_weights import CheckpointWeights
from lorax_engine.files.lora_formats import read_lora
from lorax_engine.files.provenance import UNKNOWN_MODEL
from lorax_engine.projection.transfer import TransferOptions, transfer

SD15_NAME = "v1-5-pruned-emaonly.safetensors"
SDXL_NAME = "sd_xl_base_1.0.safetensors"
LORA_NAME = "my_sd15_style_lora.safetensors"


@pytest.fixture(scope="module")
def sdxl(comfy, zoo):
    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(zoo.checkpoint("tiny_sdxl")),
                                                                  output_vae=False, output_clip=False)
    return model


@pytest.fixture
def folders(comfy, zoo, pack, tmp_path, monkeypatch):
    """ComfyUI's loras and checkpoints folders in tmp_path, and a fresh subspace cache there."""
    fnp = comfy.folder_paths.folder_names_and_paths
    for kind in ("loras", "checkpoints"):
        (tmp_path / kind).mkdir()
        monkeypatch.setitem(fnp, kind, ([str(tmp_path / kind)], fnp[kind][1]))
    zoo.make_sd15_lora(tmp_path / "loras" / LORA_NAME, rank=8, seed=5)
    os.symlink(zoo.checkpoint("tiny_sd15"), tmp_path / "checkpoints" / SD15_NAME)
    bridge = pack.nodes.comfy_bridge
    monkeypatch.setattr(bridge, "_cache", SubspaceCache(tmp_path / "cache"))
    pack.nodes.transfer_nodes.projected_memo.clear()
    return tmp_path


def _load(pack, model, strength_model, clip=None, lora_name=LORA_NAME, source_checkpoint=SD15_NAME, **extra):
    """Run the loader as the frontend would: every widget not given keeps its default."""
    node_cls = pack.NODE_CLASS_MAPPINGS["LoRAX_LoadSD15LoRAIntoSDXL"]
    defaults = {name: spec[1]["default"] for name, spec in node_cls.INPUT_TYPES()["required"].items()
                if "default" in spec[1]}
    inputs = {**defaults, "model": model, "clip": clip, "lora_name": lora_name, "source_checkpoint": source_checkpoint,
              "strength_model": strength_model, "strength_clip": 1.0, **extra}
    with torch.inference_mode():
        out = node_cls().load(**inputs)
    return out["result"], out["ui"]["lorax"][0]


def _refusal(pack, model, **inputs) -> str:
    with pytest.raises(pack.nodes.comfy_bridge.NodeError) as info:
        _load(pack, model, 1.0, **inputs)
    return str(info.value)


def _engine_transfer(zoo, lora_path, source="tiny_sd15", target="tiny_sdxl"):
    with CheckpointWeights(zoo.checkpoint(source)) as src, CheckpointWeights(zoo.checkpoint(target)) as tgt:
        return transfer(read_lora(lora_path), src, tgt, TransferOptions(), cache=SubspaceCache())


def _assert_patched(comfy, base_model, patched, layers, strength):
    after = comfy_harness.patched_weights(comfy, patched)
    base = base_model.model.diffusion_model.state_dict()
    assert layers
    for key, layer in layers.items():
        short = key[len("diffusion_model."):]
        w0 = base[short].float()
        delta = (layer.scale * layer.up.float() @ layer.down.float()).reshape(w0.shape)
        torch.testing.assert_close(after[short], w0 + strength * delta, rtol=1e-4, atol=1e-5)


def test_one_node_loader_patches_the_engine_transfer_and_reuses_it(comfy, zoo, pack, sdxl, folders, comfy_logs):
    memo = pack.nodes.transfer_nodes.projected_memo
    cache = pack.nodes.comfy_bridge.subspace_cache()
    t0 = time.perf_counter()
    (patched, clip, report), ui = _load(pack, sdxl, 0.8)
    first = time.perf_counter() - t0
    assert comfy_logs.lora_keys_not_loaded() == []

    # the engine's transfer of the same files with the same defaults, against the SDXL checkpoint's own weights
    expected, expected_report = _engine_transfer(zoo, folders / "loras" / LORA_NAME)
    unet_layers = {k: v for k, v in expected.layers.items() if k.startswith("diffusion_model.")}
    _assert_patched(comfy, sdxl, patched, unet_layers, 0.8)
    # on the tiny zoo, unrelated random UNets: a few layers pass the default threshold and carry little
    verdict = pack.nodes.ui_summary.transfer_summary(expected_report)
    assert clip is None and ui["verdict"] == verdict["verdict"] == "weak" and not ui["reused"]
    assert ui["lines"] == [*verdict["lines"], f"patched {len(unet_layers)} UNet + 0 text-encoder weights",
                           "text encoder: not applied (no CLIP connected)"]
    assert ui["lines"][0] == f"WEAK: {len(unet_layers)}/264 layers applied (auto); falls short on:"
    assert ui["lines"][1].startswith("  median score 0.0") and ui["lines"][2] == "  energy kept 0% < 50%"
    # the report output: its summary first, then the table under plain column names, then the files read
    lines = report.splitlines()
    assert lines[0] == f"LoRA-X auto: {SD15_NAME} (sd1) -> {UNKNOWN_MODEL} (sdxl)"
    assert lines[1].startswith(f"{len(unet_layers)} of 264 source layers applied to {len(unet_layers)} target layers")
    header = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    assert lines[header].split() == ["layer", "sent", "to", "similarity", "kept", "changed", "result"]
    assert f"source model: {SD15_NAME} (sha256 " in report and "source LoRA: my_sd15_style_lora" in report

    # the same pair again after the memo is emptied: bases and pair scores come from the shared cache
    memo.clear()
    computed = cache.stats.computed
    t0 = time.perf_counter()
    (_, _, report2), _ = _load(pack, sdxl, 0.8)
    second = time.perf_counter() - t0
    assert cache.stats.computed == computed and cache.stats.memory_hits > 0

    # only the strength changed: no transfer at all, the memoised projection is patched again
    hits, stats = memo.hits, cache.stats.as_dict()
    t0 = time.perf_counter()
    (patched3, _, report3), ui3 = _load(pack, sdxl, 0.3)
    third = time.perf_counter() - t0
    assert memo.hits == hits + 1 and ui3["reused"] and cache.stats.as_dict() == stats and report3 == report2
    assert ui3["lines"][-1] == "transfer reused: only the patch was recomputed"
    _assert_patched(comfy, sdxl, patched3, unet_layers, 0.3)
    print(f"\none-node loader on the tiny zoo (defaults): first run {first:.2f} s, second run (caches) "
          f"{second:.2f} s, strength change only {third:.3f} s")


def test_saved_metadata_names_the_files(pack, sdxl, folders):
    """The one-node loader's result carries the real source checkpoint, and no invented target name."""
    _load(pack, sdxl, 1.0)
    memo = pack.nodes.transfer_nodes.projected_memo
    result = next(iter(memo._entries.values()))[0]
    assert result.metadata["lorax.source_model"] == SD15_NAME
    assert result.metadata["lorax.target_model"] == UNKNOWN_MODEL
    assert result.metadata["lorax.source_lora"] == LORA_NAME
    assert len(result.metadata["lorax.source_model_sha256"]) == 64


def test_options_node_sets_the_transfer(pack, zoo, sdxl, folders):
    """The LoRA-X Options node shows the defaults of METHOD; what it returns changes the transfer."""
    options_node = pack.NODE_CLASS_MAPPINGS["LoRAX_Options"]
    required = options_node.INPUT_TYPES()["required"]
    assert {name: spec[1]["default"] for name, spec in required.items()} == {
        "rank": 320, "threshold": 0.05, "policy": "best", "mode": "auto", "method": "fast"}
    loader_inputs = pack.NODE_CLASS_MAPPINGS["LoRAX_LoadSD15LoRAIntoSDXL"].INPUT_TYPES()
    assert list(loader_inputs["required"]) == ["model", "lora_name", "source_checkpoint", "strength_model",
                                               "strength_clip"]
    assert list(loader_inputs["optional"]) == ["clip", "options"]
    (options,) = options_node().options(rank=64, threshold=-1.0, policy="best", mode="subspace", method="fast")
    (_, _, report), ui = _load(pack, sdxl, 1.0, options=options)
    assert ui["lines"][0] == "WEAK: 12/264 layers applied (subspace); falls short on:"  # the chosen blocks, all
    with pytest.raises(pack.nodes.comfy_bridge.NodeError, match="threshold must be"):
        options_node().options(rank=64, threshold=2.0, policy="best", mode="auto", method="fast")


def test_strengths_zero_pass_the_inputs_through_without_a_transfer(pack, sdxl, folders):
    memo = pack.nodes.transfer_nodes.projected_memo
    cache = pack.nodes.comfy_bridge.subspace_cache()
    clip = object()
    (model_out, clip_out, report), ui = _load(pack, sdxl, 0.0, clip=clip, strength_clip=0.0)
    assert model_out is sdxl and clip_out is clip
    line = "strengths 0 and 0: model and CLIP pass through unchanged, nothing transferred"
    assert ui == {"verdict": "off", "lines": [f"OFF: {line}"]} and report == line
    assert cache.stats.computed == 0 and not memo._entries and not (folders / "cache").exists()


def test_an_sdxl_checkpoint_as_source_is_refused_before_any_work(pack, zoo, sdxl, folders):
    """The dropdown lists every checkpoint: an SDXL one in the SD1.5 slot shares CLIP-L and ~50 UNet weights with
    SD1.5 by name and shape, which would pass through and read like a transfer."""
    os.symlink(zoo.checkpoint("demo_sdxl"), folders / "checkpoints" / SDXL_NAME)
    message = _refusal(pack, sdxl, source_checkpoint=SDXL_NAME)
    assert message == (f"{LORA_NAME} is an SD1.5 LoRA, but the source model {SDXL_NAME} is SDXL: pick the SD1.5 "
                       "checkpoint it was trained on (e.g. v1-5-pruned-emaonly)")
    assert pack.nodes.comfy_bridge.subspace_cache().stats.computed == 0 and not (folders / "cache").exists()


def test_an_sdxl_lora_is_already_an_sdxl_lora(pack, sdxl, folders):
    # on layers SD1.5 has too (SDXL's CLIP-L is SD1.5's): before, those were transferred and the rest dropped
    factors = lora_factory.random_factors("sdxl", rank=4, seed=3, targets=[
        "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight",
        "clip_l.transformer.text_model.encoder.layers.2.self_attn.q_proj.weight",
        "clip_l.transformer.text_model.encoder.layers.2.mlp.fc1.weight"])
    sub = folders / "loras" / "sdxl"
    sub.mkdir()
    lora_factory.save(lora_factory.lora_state_dict(factors, "sdxl", "kohya"), sub / "my_sdxl_lora.safetensors")
    message = _refusal(pack, sdxl, lora_name="sdxl/my_sdxl_lora.safetensors")
    assert message == ("sdxl/my_sdxl_lora.safetensors: this is already an SDXL LoRA: use Load LoRA (or any SDXL "
                       "LoRA loader) instead; LoRA-X carries SD1.5 LoRAs to SDXL")
    assert not (folders / "cache").exists()


def test_a_bad_lora_file_is_named_as_listed_never_by_its_server_path(pack, sdxl, folders):
    sub = folders / "loras" / "downloads"
    path = bad.make(bad.LORA_CASES, "truncated.safetensors", sub)
    message = _refusal(pack, sdxl, lora_name="downloads/truncated.safetensors")
    assert message.startswith("downloads/truncated.safetensors: truncated: ") and str(folders) not in message
    assert bad.LORA_CASES["truncated.safetensors"].problem in message and path.exists()


def test_a_code_running_ckpt_is_refused_with_nothing_executed(pack, sdxl, folders):
    path = bad.make(bad.MODEL_CASES, "pickle_checkpoint_with_code.ckpt", folders / "checkpoints")
    message = _refusal(pack, sdxl, source_checkpoint=path.name)
    assert message.startswith("pickle_checkpoint_with_code.ckpt: refused: this pickle file needs code execution "
                              "to load; convert it to .safetensors with a tool you trust (it asks for ")
    assert not bad.code_marker(path).exists() and str(folders) not in message


def test_an_old_sd15_ckpt_source_gives_the_same_transfer(comfy, pack, zoo, sdxl, folders):
    """v1-5-pruned-emaonly.ckpt as most SD1.5 users have it: a torch zip pickle with a state_dict."""
    ckpt = bad.old_sd15_checkpoint(folders / "checkpoints" / "v1-5-pruned-emaonly.ckpt",
                                   load_file(str(zoo.checkpoint("tiny_sd15"))))
    (patched, _, report), ui = _load(pack, sdxl, 1.0, source_checkpoint=ckpt.name)
    expected, _ = _engine_transfer(zoo, folders / "loras" / LORA_NAME)
    _assert_patched(comfy, sdxl, patched, expected.layers, 1.0)
    assert report.splitlines()[0] == f"LoRA-X auto: {ckpt.name} (sd1) -> {UNKNOWN_MODEL} (sdxl)"
    assert ui["lines"][0] == f"WEAK: {len(expected.layers)}/264 layers applied (auto); falls short on:"


def test_unet_only_lora(pack, zoo, sdxl, folders):
    sd = {k: v for k, v in load_file(str(folders / "loras" / LORA_NAME)).items() if k.startswith("lora_unet_")}
    lora_factory.save(sd, folders / "loras" / "unet_only.safetensors")
    (_, _, report), ui = _load(pack, sdxl, 1.0, lora_name="unet_only.safetensors")
    expected, _ = _engine_transfer(zoo, folders / "loras" / "unet_only.safetensors")
    assert ui["lines"][0] == f"WEAK: {len(expected.layers)}/192 layers applied (auto); falls short on:"
    assert "text encoder: not applied (no CLIP connected)" not in ui["lines"]


@pytest.fixture(scope="module")
def sdxl_with_clip(comfy, zoo):
    """The tiny SDXL UNet with SDXL's real-size text encoders (their CLIP-L the fp16 cast of tiny_sd15_trained's)."""
    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(zoo.checkpoint("demo_sdxl_trained")),
                                                                  output_vae=False, output_clip=True)
    return model, clip


@pytest.mark.slow
def test_text_encoder_only_lora_arrives_whole_and_not_from_an_sdxl_source(pack, zoo, sdxl_with_clip, folders):
    model, clip = sdxl_with_clip
    os.symlink(zoo.checkpoint("tiny_sd15_trained"), folders / "checkpoints" / "sd15_trained.safetensors")
    os.symlink(zoo.checkpoint("demo_sdxl_trained"), folders / "checkpoints" / SDXL_NAME)
    full = load_file(str(folders / "loras" / LORA_NAME))
    lora_factory.save({k: v for k, v in full.items() if k.startswith("lora_te_")},
                      folders / "loras" / "te_only.safetensors")
    lora = read_lora(folders / "loras" / "te_only.safetensors")
    assert lora.architecture == "sd1" and not lora.unet_keys()
    used = [k for k in lora.layers if ".layers.11." not in k]        # SDXL reads CLIP-L's penultimate layer
    kept = sum(lora.layers[k].energy() for k in used) / sum(layer.energy() for layer in lora.layers.values())
    (_, clip_out, _), ui = _load(pack, model, 1.0, clip=clip, lora_name="te_only.safetensors",
                                 source_checkpoint="sd15_trained.safetensors")
    assert ui["verdict"] == "good"
    assert ui["lines"][:5] == [f"GOOD: {len(used)}/{len(lora.layers)} layers applied (auto); rests on:",
                               "  median score 1.00 >= 0.2 (0 = chance, 1 = same)",
                               f"  energy kept {100 * kept:.0f}% >= 50%",
                               f"  {len(used)} of {len(used)} updates changed little",
                               "dropped: 6 unused by target"]
    assert f"{len(used)} layers on identical weights arrive whole" in ui["lines"]
    # CLIP-L is the same in SDXL: with an SDXL checkpoint as the source every layer would "arrive whole"
    message = _refusal(pack, model, clip=clip, lora_name="te_only.safetensors", source_checkpoint=SDXL_NAME)
    assert message == ("te_only.safetensors is an SD1.5 LoRA, but the source model sd_xl_base_1.0.safetensors is "
                       "SDXL: pick the SD1.5 checkpoint it was trained on (e.g. v1-5-pruned-emaonly)")


def test_lorax_cache_dir_and_comfyui_config_move_the_nodes_cache(comfy, pack, sdxl, folders, monkeypatch):
    bridge = pack.nodes.comfy_bridge
    monkeypatch.setattr(bridge, "_cache", None)
    monkeypatch.setenv("LORAX_CACHE_DIR", str(folders / "env_cache"))
    _load(pack, sdxl, 1.0)
    assert bases_bytes(folders / "env_cache") > 0 and not (folders / "cache").exists()

    # without the variable: the lorax_cache folder of ComfyUI's extra_model_paths.yaml (+ subspaces)
    monkeypatch.delenv("LORAX_CACHE_DIR")
    monkeypatch.setattr(bridge, "_cache", None)
    monkeypatch.setitem(comfy.folder_paths.folder_names_and_paths, "lorax_cache", ([str(folders / "yaml")], set()))
    pack.nodes.transfer_nodes.projected_memo.clear()
    _load(pack, sdxl, 1.0)
    assert bases_bytes(folders / "yaml" / "subspaces") > 0


def test_disk_bound_holds_during_the_run_and_after_a_cancel(comfy, pack, sdxl, folders, monkeypatch):
    """$LORAX_DISK_CACHE_GB holds while bases are written, not only after a successful run; a Cancel at a known
    step (deterministic: the interrupt is raised from the transfer's own progress, not raced over HTTP) leaves
    the bound held, no projection remembered, and valid cache entries; the next run gives the full result."""
    bound = 3 * 2**20
    monkeypatch.setenv("LORAX_DISK_CACHE_GB", str(bound / 2**30))
    monkeypatch.setattr(pack.lorax_engine.cache_bound, "TRIM_INTERVAL", 0.0)
    bridge = pack.nodes.comfy_bridge
    seen, steps_done, entry_sizes, cancel_at = [], [], [0], {"step": 12}
    original = bridge.ComfyProgress.__call__

    def watching(self, done, total):     # after every basis (and as work is added): the engine called should_stop
        seen.append(bases_bytes(folders / "cache"))
        steps_done.append(done)
        entry_sizes.extend(p.stat().st_size for p in (folders / "cache").rglob("bases/*/*.safetensors"))
        if done == cancel_at["step"]:
            comfy.model_management.interrupt_current_processing(True)     # what Cancel / POST /interrupt sets
        original(self, done, total)

    monkeypatch.setattr(bridge.ComfyProgress, "__call__", watching)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _load(pack, sdxl, 1.0)
    # nothing advanced after the Cancel (progress may be reported again as work is added, at the same step)
    assert max(steps_done) == steps_done[-1] == cancel_at["step"]
    assert not pack.nodes.transfer_nodes.projected_memo._entries
    assert bases_bytes(folders / "cache") <= bound
    # two bases are computed at once: one may land between a trim and the look after it
    assert max(seen) <= bound + 2 * max(entry_sizes)
    for entry in (folders / "cache").rglob("bases/*/*.safetensors"):
        with safe_open(str(entry), "pt") as f:     # complete entries only
            assert f.metadata()["lorax.cache_key"].startswith("lorax-subspace-")

    cancel_at["step"] = -1
    seen.clear()
    (patched, _, _), ui = _load(pack, sdxl, 1.0)
    assert max(seen) <= bound + 2 * max(entry_sizes) and bases_bytes(folders / "cache") <= bound
    assert ui["lines"][0].startswith("WEAK: ") and ui["applied"] > 0


def test_free_memory_empties_the_in_memory_caches(comfy, pack, sdxl, folders):
    """What ComfyUI calls on POST /free (main.prompt_worker: unload_all_models) empties the pack's caches."""
    memo = pack.nodes.transfer_nodes.projected_memo
    cache = pack.nodes.comfy_bridge.subspace_cache()
    _load(pack, sdxl, 1.0)
    assert memo._entries and cache._lru and cache.pairs is not None
    comfy.model_management.unload_all_models()
    assert not memo._entries and not cache._lru and cache._used == 0 and cache.pairs is None
    # and the next run recomputes from the disk cache, not from scratch
    computed = cache.stats.computed
    _, ui = _load(pack, sdxl, 1.0)
    assert not ui["reused"] and cache.stats.computed == computed and cache.stats.disk_hits > 0


def test_one_node_loader_refuses_an_sd15_model(comfy, zoo, pack, folders):
    with torch.inference_mode():
        sd15, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(zoo.checkpoint("tiny_sd15")),
                                                              output_vae=False, output_clip=False)
    assert _refusal(pack, sd15) == ("Load SD1.5 LoRA into SDXL needs an SDXL model, but the model input is SD15; "
                                    "connect the SDXL checkpoint's MODEL output")


def test_first_rows_of_a_models_weights_are_their_matrices_first_rows(comfy, pack, sdxl):
    """The comparison by value tries first rows before whole weights; a MODEL's (linear and conv weights, as ComfyUI
    holds them) are row 0 of the float32 matrix the transfer reads, on the same device."""
    weights = pack.nodes.comfy_bridge.PatcherWeights(sdxl)
    keys = [k for k in weights.keys() if k.endswith(("attn1.to_q.weight", "ff.net.2.weight", "proj_in.weight"))]
    keys += [k for k in weights.keys() if len(weights.shape(k)) == 4][:2]     # conv kernels [m, c, kh, kw]
    assert len(keys) > 4
    with torch.inference_mode():
        for key in keys:
            row, whole = weights.first_row(key), weights.matrix(key)
            assert row.dtype == torch.float32 and row.device == whole.device, key
            assert torch.equal(row, whole[0]), key
