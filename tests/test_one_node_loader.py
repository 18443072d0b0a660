"""The one-node loader (Load SD1.5 LoRA into SDXL) in-process on real ComfyUI ModelPatchers: it patches exactly
W0 + strength * ΔW of the engine's own transfer, a strength change recomputes nothing but the patch, and
ComfyUI's "free memory" (``unload_all_models``) empties the pack's in-memory caches."""
from __future__ import annotations

import os
import time

import comfy_harness
import pytest
import torch

from lorax_engine.analysis.subspaces import SubspaceCache
from lorax_engine.files.base_weights import CheckpointWeights
from lorax_engine.files.lora_formats import read_lora
from lorax_engine.files.provenance import UNKNOWN_MODEL
from lorax_engine.projection.transfer import TransferOptions, transfer

SD15_NAME = "v1-5-pruned-emaonly.safetensors"
LORA_NAME = "my_sd15_style_lora.safetensors"
OPTIONS = {"rank": 64, "threshold": -1.0, "policy": "best", "method": "fast"}   # the tiny zoo scores near chance


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


def _load(pack, model, strength_model, mode=None, **extra):
    node = pack.NODE_CLASS_MAPPINGS["LoRAX_LoadSD15LoRAIntoSDXL"]()
    from lorax_engine.projection.operators import DEFAULT_MODE
    with torch.inference_mode():
        out = node.load(model=model, lora_name=LORA_NAME, source_checkpoint=SD15_NAME,
                        strength_model=strength_model, strength_clip=1.0, mode=mode or DEFAULT_MODE,
                        **OPTIONS, **extra)
    return out["result"], out["ui"]["lorax"][0]


def test_one_node_loader_patches_the_engine_transfer_and_reuses_it(comfy, zoo, pack, sdxl, folders, comfy_logs):
    memo = pack.nodes.transfer_nodes.projected_memo
    cache = pack.nodes.comfy_bridge.subspace_cache()
    t0 = time.perf_counter()
    (patched, clip, report), ui = _load(pack, sdxl, 0.8)
    first = time.perf_counter() - t0
    assert clip is None and ui["verdict"] in ("good", "weak") and ui["applied"] > 0 and not ui["reused"]
    assert "text encoder: not applied (no CLIP connected)" in ui["lines"]
    assert f"source model: {SD15_NAME} (sha256 " in report and "source LoRA: my_sd15_style_lora" in report
    assert comfy_logs.lora_keys_not_loaded() == []

    # the engine's transfer of the same files, against the SDXL checkpoint's own weights
    from lorax_engine.projection.operators import DEFAULT_MODE
    options = TransferOptions(**OPTIONS, mode=DEFAULT_MODE)
    with CheckpointWeights(zoo.checkpoint("tiny_sd15")) as source, \
            CheckpointWeights(zoo.checkpoint("tiny_sdxl")) as target:
        expected, _ = transfer(read_lora(folders / "loras" / LORA_NAME), source, target, options,
                               cache=SubspaceCache())
    unet_layers = {k: v for k, v in expected.layers.items() if k.startswith("diffusion_model.")}
    assert unet_layers
    after = comfy_harness.patched_weights(comfy, patched)
    base = sdxl.model.diffusion_model.state_dict()
    for key, layer in unet_layers.items():
        short = key[len("diffusion_model."):]
        w0 = base[short].float()
        delta = (layer.scale * layer.up.float() @ layer.down.float()).reshape(w0.shape)
        torch.testing.assert_close(after[short], w0 + 0.8 * delta, rtol=1e-4, atol=1e-5)

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
    after3 = comfy_harness.patched_weights(comfy, patched3)
    for key, layer in unet_layers.items():
        short = key[len("diffusion_model."):]
        w0 = base[short].float()
        delta = (layer.scale * layer.up.float() @ layer.down.float()).reshape(w0.shape)
        torch.testing.assert_close(after3[short], w0 + 0.3 * delta, rtol=1e-4, atol=1e-5)
    print(f"\none-node loader on the tiny zoo (rank 64): first run {first:.2f} s, second run (caches) "
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
    with pytest.raises(Exception, match="needs an SDXL model, but the model input is SD15"):
        _load(pack, sd15, 1.0)
