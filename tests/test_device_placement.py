"""Device placement, checked on a CPU-only machine (the crash of issue 11: a LoRA on the GPU met the CPU bases of
the cache in ``projected_energy`` / ``project_subspace``).

The ``meta`` device stands in for the GPU: a LoRA moved there meets CPU bases as a CUDA LoRA meets the cache's.
Plain meta tensors do not complain when mixed with CPU ones (``cpu @ meta`` even claims to be on the CPU), so
every check runs under :class:`SameDevice`, which raises, as CUDA kernels do, whenever one torch call gets tensors
on two devices. Data-dependent steps (``compress``'s rank choice, the floats of energies) cannot run on meta: the
energies are computed as tensors on the LoRA's device first, and that part is checked here; tests/test_cuda.py
checks the rest on a real GPU.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

import comfy_harness
import pytest
import torch
from inprocess_workflow import place_model_files, run_nodes
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lorax_engine.analysis.subspaces import Basis, Spectrum, SubspaceCache
from lorax_engine.cli import build_parser
from lorax_engine.files.lora import LoraLayer, LoraModel
from lorax_engine.projection import operators
from lorax_engine.projection.transfer import TransferOptions, _project_pair

RANK = 4


class SameDevice(TorchFunctionMode):
    """Every torch call must get its tensors on one device (a 0-d CPU tensor may join any, as on CUDA)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device for t in tree_leaves((args, kwargs))
                   if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1:
            raise RuntimeError(f"Expected all tensors to be on the same device, but {getattr(func, '__name__', func)} "
                               f"got {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def _orthonormal(n: int, r: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, r, generator=torch.Generator().manual_seed(seed))).Q


def _basis(m: int, n: int, r: int = 16, full_v: bool = False, seed: int = 0) -> Basis:
    """A CPU basis, as the subspace cache returns them; ``full_v``: the input side spans its whole space."""
    return Basis((m, n), _orthonormal(m, r, seed), None if full_v else _orthonormal(n, r, seed + 1), None, "exact")


def _spectrum(m: int, n: int, seed: int = 0) -> Spectrum:
    """A CPU spectrum, as the cache returns them (every direction, descending singular values)."""
    d = min(m, n)
    return Spectrum((m, n), _orthonormal(m, d, seed), _orthonormal(n, d, seed + 1),
                    torch.linspace(2.0, 0.1, d), "exact")


def _meta_layer(m: int, n: int, weight_shape=None) -> LoraLayer:
    layer = LoraLayer(torch.randn(m, RANK), torch.randn(RANK, n), 8.0, weight_shape or (m, n))
    return layer.to("meta")


# (source layer m x n, target shape, source spectrum, target spectrum): a linear layer, a cross-attention k/v
# embedded into the 2048-wide slot, a 3x3 conv
CASES = {
    "linear": ((320, 320), (320, 320), _spectrum(320, 320), _spectrum(320, 320, seed=2)),
    "kv_embedded": ((320, 768), (320, 2048), _spectrum(320, 768), _spectrum(320, 2048, seed=2)),
    "conv": ((320, 2880), (320, 320, 3, 3), _spectrum(320, 2880), _spectrum(320, 2880, seed=2)),
}
CASES_BASIS = {name: (case[0], case[3].top(16)) for name, case in CASES.items()}


def _assert_on_meta(layer: LoraLayer, m: int, width: int):
    assert layer.up.device.type == "meta" and layer.down.device.type == "meta"
    assert tuple(layer.up.shape) == (m, RANK) and tuple(layer.down.shape) == (RANK, width)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode,identical", [("auto", False), ("subspace+null", False), ("subspace", False),
                                            ("auto", True), ("direct", False)])
def test_every_operator_computes_on_the_loras_device_with_cpu_spectra(case, mode, identical):
    (m, n), target_shape, source, target = CASES[case]
    layer = _meta_layer(m, n)
    width = 1
    for d in target_shape[1:]:
        width *= d
    if (mode == "direct" or identical) and width != n:
        pytest.skip("direct copies and identical weights pass the update through only where the shapes agree")
    with SameDevice():
        out, _, _, _ = _project_pair(layer, TransferOptions(rank=16, mode=mode), identical, source, target,
                                     target_shape, (0.5, 0.5))
    _assert_on_meta(out, m, width)
    assert out.weight_shape == tuple(target_shape)


@pytest.mark.parametrize("case", CASES_BASIS)
def test_energies_are_computed_on_the_loras_device(case):
    (m, n), target = CASES_BASIS[case]
    layer = _meta_layer(m, n)
    with SameDevice():
        kept, total = operators.projected_energy_terms(layer, target)
        norm = layer.squared_norm()
        delta = layer.delta()
    for t in (kept, total, norm):
        assert t.device.type == "meta" and t.dim() == 0
    assert delta.device.type == "meta" and tuple(delta.shape) == (m, n)


def test_energies_on_the_cpu_match_the_dense_update():
    """The tensors the floats come from are the right ones: against ΔW formed densely."""
    gen = torch.Generator().manual_seed(3)
    layer = LoraLayer(torch.randn(64, RANK, generator=gen), torch.randn(RANK, 96, generator=gen), 2.0, (64, 96))
    basis = _basis(64, 96, r=8)
    dense = layer.delta().double()
    projected = basis.u.double() @ basis.u.double().T @ dense @ basis.v.double() @ basis.v.double().T
    kept, total = operators.projected_energy_terms(layer, basis)
    torch.testing.assert_close(layer.squared_norm().double(), dense.square().sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(kept / total, projected.square().sum() / dense.square().sum(), rtol=1e-5, atol=0)
    assert operators.projected_energy(layer, basis) == pytest.approx(float(kept / total))


def test_combined_updates_stay_on_the_loras_device():
    a, b = _meta_layer(320, 320), _meta_layer(320, 320)
    with SameDevice():
        one = operators.combine([(a, 0.5)], (320, 320))
        two = operators.combine([(a, 1.0), (b, 0.5)], (320, 320))
    assert one.up.device.type == two.up.device.type == two.down.device.type == "meta"
    assert tuple(two.up.shape) == (320, 2 * RANK)


def test_a_cpu_lora_with_spectra_elsewhere_lands_with_the_lora():
    """The other way round: spectra on another device than the LoRA still give the LoRA's device."""
    layer = LoraLayer(torch.randn(320, RANK), torch.randn(RANK, 768), 8.0, (320, 768))
    meta_target = _spectrum(320, 2048, seed=2).to(torch.device("meta"))
    meta_source = _spectrum(320, 768).to(torch.device("meta"))
    with SameDevice():
        out = operators.project_soft(layer.to("meta"), meta_source, meta_target, 16, (320, 2048), 0.5, 0.5)
    _assert_on_meta(out, 320, 2048)


def test_cli_device_defaults_to_the_gpu_when_there_is_one():
    args = build_parser().parse_args(["transfer", "--source-model", "a", "--target-model", "b", "--lora", "l",
                                      "--out", "o"])
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------ nodes

@pytest.fixture(scope="module")
def bridge(pack):
    return sys.modules[f"{pack.__name__}.nodes.comfy_bridge"]


@pytest.mark.parametrize("device,expected", [("cpu", "cpu"), (torch.device("cuda", 1), "cuda:1"),
                                             ("mps", "cpu"), ("xpu", "cpu")])
def test_nodes_compute_on_a_cuda_gpu_else_on_the_cpu(comfy, bridge, monkeypatch, device, expected):
    monkeypatch.setattr(comfy.model_management, "get_torch_device", lambda: torch.device(device))
    assert bridge.engine_device() == expected


# the pack's chain of the example workflow workflows/api/lorax_convert_and_save.json, on the tiny zoo models
CHAIN = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
    "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}},
    "3": {"class_type": "LoRAX_LoadSourceLoRA", "inputs": {"lora_name": "style.safetensors", "strength": 1.0}},
    "4": {"class_type": "LoRAX_SubspaceSimilarity", "inputs": {
        "source_model": ["1", 0], "target_model": ["2", 0], "rank": 64, "threshold": -1.0, "policy": "best",
        "method": "fast", "lora": ["3", 0]}},
    "6": {"class_type": "LoRAX_ProjectLoRA", "inputs": {"lora": ["3", 0], "subspace_map": ["4", 0],
                                                        "mode": "auto", "rank_cap": 0}},
    "7": {"class_type": "LoRAX_ApplyToSDXL", "inputs": {"model": ["2", 0], "clip": None, "projected_lora": ["6", 0],
                                                        "strength_model": 0.8, "strength_clip": 0.8}},
}


def _devices(lora: LoraModel) -> set[str]:
    return {t.device.type for layer in lora.layers.values() for t in (layer.up, layer.down)}


def test_node_chain_on_a_device_the_engine_cannot_use_falls_back_to_the_cpu(comfy, pack, bridge, zoo, tmp_path,
                                                                            monkeypatch):
    """ComfyUI on mps (or xpu): the nodes compute on the CPU, and every tensor they pass on is there."""
    monkeypatch.setattr(bridge, "_cache", SubspaceCache(directory=tmp_path / "cache"))   # cold: energies computed
    place_model_files(monkeypatch, comfy.folder_paths, tmp_path, {
        "checkpoints": {"sd15.safetensors": zoo.checkpoint("tiny_sd15"),
                        "sdxl.safetensors": zoo.checkpoint("tiny_sdxl")},
        "loras": {"style.safetensors": zoo.make_sd15_lora(tmp_path / "style.safetensors", rank=8, seed=5)}})
    models = run_nodes(comfy, pack, CHAIN, ["1", "2"])        # loaded by ComfyUI on its real (CPU) device
    with monkeypatch.context() as m:
        m.setattr(comfy.model_management, "get_torch_device", lambda: torch.device("mps"))
        out = run_nodes(comfy, pack, CHAIN, ["7"], done=models)
    lora, smap, projected = out["3"][0], out["4"][0], out["6"][0]
    assert _devices(lora) == _devices(projected) == {"cpu"}
    assert smap.options.device == "cpu"
    assert projected.layers and all(e.energies for e in smap.entries.values() if e.candidates.targets)
    patched = out["7"][0]
    after = comfy_harness.patched_weights(comfy, patched)
    base = models["2"][0].model.diffusion_model.state_dict()
    for key, layer in projected.layers.items():
        short = key[len("diffusion_model."):]
        torch.testing.assert_close(after[short], base[short].float() + 0.8 * layer.delta_weight(), rtol=1e-4,
                                   atol=1e-5)


def test_a_device_error_in_a_node_is_one_line_naming_the_node(comfy, pack, monkeypatch):
    """The message users saw as a traceback on the H200, raised inside Project LoRA-X's engine call."""
    nodes = sys.modules[f"{pack.__name__}.nodes.transfer_nodes"]
    message = "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!"

    def crash(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(nodes, "project", crash)
    monkeypatch.setattr(nodes, "check_transfer_inputs", lambda *args, **kwargs: None)   # the engine's own first step
    smap = SimpleNamespace(options=TransferOptions(), source=None, target=None)
    with pytest.raises(Exception) as caught:
        nodes.ProjectLoRAX().project(LoraModel({}), smap, "auto", 0)
    text = str(caught.value)
    assert type(caught.value).__name__ == "NodeError" and "\n" not in text
    assert text.startswith("Project LoRA-X: device error (Expected all tensors to be on the same device")
    assert "--cpu" in text

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB on device 0")

    monkeypatch.setattr(nodes, "project", oom)      # ComfyUI handles out-of-memory itself: left as it is
    with pytest.raises(torch.cuda.OutOfMemoryError):
        nodes.ProjectLoRAX().project(LoraModel({}), smap, "auto", 0)
