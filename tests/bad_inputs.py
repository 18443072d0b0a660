"""A factory of bad input files: every way a LoRA or base-model file handed to the pack can be wrong, each
with the words its one-line error must contain.

* ``LORA_CASES``: source-LoRA files (the command line's ``--lora``, Load Source LoRA's ``lora_path``).
  ``stage="read"`` cases fail when the file is read; ``stage="transfer"`` ones are valid LoRAs that do not
  fit the source model (:data:`SOURCE_MODEL`, the zoo's tiny SD1.5).
* ``MODEL_CASES``: base-model checkpoints (``--source-model`` / ``--target-model``, the one-node loader's
  ``source_checkpoint``).
* :func:`old_sd15_checkpoint` writes a good checkpoint the way old SD1.5 ``.ckpt`` files were written.
* :func:`good_lora` writes a small valid SD1.5 LoRA whose layers exist in the tiny SD1.5 model.

``make(folder)`` writes the case under ``folder`` and returns its path. A pickle case whose unpickling would
run code would create :func:`code_marker` ``(path)``; tests assert that file never appears.
"""
from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lora_factory as lf
import torch

SOURCE_MODEL = "tiny_sd15"
TARGET_MODEL = "tiny_sdxl"
# layers of SD1.5's first attention stage: the same names and shapes in the full and the tiny SD1.5
GOOD_KEYS = ("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
             "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
Q = lf.module_name("sd1", GOOD_KEYS[0], "kohya")     # lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q
K = lf.module_name("sd1", GOOD_KEYS[1], "kohya")


@dataclass(frozen=True)
class BadInput:
    make: Callable[[Path], Path]
    problem: str               # text the error message must contain
    stage: str = "read"        # "read": reading the file fails; "transfer": it does not fit the source model


def code_marker(path) -> Path:
    """The file a malicious pickle at ``path`` would create if it were ever unpickled."""
    path = Path(path)
    return path.with_name(path.name + ".code-ran")


class _RunsCode:
    """Unpickling this runs code (what a malicious checkpoint does): it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled')",))


# --- good files ----------------------------------------------------------------------------------------

def good_state_dict(rank: int = 4, seed: int = 0, dtype=torch.float16, keys=GOOD_KEYS) -> dict[str, torch.Tensor]:
    factors = lf.random_factors("sd1", rank=rank, seed=seed, alpha=rank / 2, targets=list(keys))
    return lf.lora_state_dict(factors, "sd1", "kohya", dtype=dtype)


def good_lora(path, rank: int = 4, seed: int = 0, dtype=torch.float16, metadata: dict[str, str] | None = None) -> Path:
    """A valid kohya SD1.5 LoRA on :data:`GOOD_KEYS` (seeded), with a trigger word in its metadata."""
    md = {"ss_tag_frequency": json.dumps({"5_lrxstyle": {"lrxstyle": 9}})} | (metadata or {})
    return lf.save(good_state_dict(rank, seed, dtype), path, md)


def mixed_dtype_lora(path, seed: int = 0) -> Path:
    """:func:`good_lora`'s layers stored as bf16 up, fp16 down and an fp32 alpha, and a second layer in fp32."""
    sd = good_state_dict(seed=seed, dtype=torch.float32)
    sd[f"{Q}.lora_up.weight"] = sd[f"{Q}.lora_up.weight"].to(torch.bfloat16)
    sd[f"{Q}.lora_down.weight"] = sd[f"{Q}.lora_down.weight"].half()
    return lf.save(sd, path)


# --- raw safetensors -----------------------------------------------------------------------------------

def raw_safetensors(path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """A file laid out as safetensors (u64 header length, header, data) with whatever header it is given."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(head) if length is None else length) + head + data)
    return Path(path)


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _one_layer_header(metadata_json: str = "") -> tuple[bytes, bytes]:
    """Header bytes (with ``metadata_json`` spliced in verbatim) and data of a one-layer fp32 LoRA."""
    up, down = torch.randn(320, 2) * 0.01, torch.randn(2, 320) * 0.01
    entries = {f"{Q}.lora_up.weight": _entry("F32", (320, 2), (0, 2560)),
               f"{Q}.lora_down.weight": _entry("F32", (2, 320), (2560, 5120))}
    body = json.dumps(entries)[1:-1]
    head = "{" + (f'"__metadata__": {metadata_json}, ' if metadata_json else "") + body + "}"
    return head.encode(), up.numpy().tobytes() + down.numpy().tobytes()


def _with_metadata(path, metadata_json: str) -> Path:
    head, data = _one_layer_header(metadata_json)
    return raw_safetensors(path, head, data)


def _truncated(path, make_full, keep=0.6) -> Path:
    make_full(path)
    blob = Path(path).read_bytes()
    Path(path).write_bytes(blob[: int(len(blob) * keep)])
    return Path(path)


def _sparse(path, length_field: int, size: int) -> Path:
    """A file of ``size`` bytes (sparse: no disk used) whose header length field says ``length_field``."""
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", length_field) + b'{"')
        f.truncate(size)
    return Path(path)


def _directory(path) -> Path:
    Path(path).mkdir()
    return Path(path)


def _pickle(path, writer: str, payload_of) -> Path:
    payload = payload_of(code_marker(Path(path)))
    if writer == "torch_zip":
        torch.save(payload, str(path))
    elif writer == "torch_legacy":
        torch.save(payload, str(path), _use_new_zipfile_serialization=False)
    else:
        Path(path).write_bytes(pickle.dumps(payload, protocol=4))
    return Path(path)


def _lora_with_code(marker):
    return {**good_state_dict(), "evil": _RunsCode(marker)}


def _sd(path, sd, metadata=None) -> Path:
    return lf.save(sd, path, metadata)


def _over(**tensors) -> dict[str, torch.Tensor]:
    """:func:`good_state_dict` with some tensors replaced (by kohya part name of layer Q)."""
    sd = good_state_dict(dtype=torch.float32)
    sd.update({f"{Q}.{part.replace('__', '.')}": t for part, t in tensors.items()})
    return sd


def _checkpoint_like(n_tensors=6) -> dict[str, torch.Tensor]:
    return {f"model.diffusion_model.input_blocks.{i}.0.in_layers.2.weight": torch.zeros(8, 4, 3, 3)
            for i in range(n_tensors)}


def _deep_json(depth=100_000) -> bytes:
    return ("[" * depth + "]" * depth).encode()


# file name -> case; the names carry the extension each case needs
LORA_CASES: dict[str, BadInput] = {
    "text_file.safetensors": BadInput(
        lambda p: (p.write_text("this is a text file, not a model\n" * 20), p)[1], "not a safetensors file"),
    "html_download.safetensors": BadInput(
        lambda p: (p.write_text("<!DOCTYPE html><html><body>429 Too Many Requests</body></html>"), p)[1],
        "HTML/XML page"),
    "truncated.safetensors": BadInput(lambda p: _truncated(p, good_lora), "download is probably incomplete"),
    "absurd_tensor_size.safetensors": BadInput(
        lambda p: raw_safetensors(p, {f"{Q}.lora_up.weight": _entry("F16", (2**40, 2**40), (0, 2 * 2**80))}),
        "has an absurd shape [1099511627776, 1099511627776]"),
    "empty_tensor_absurd_shape.safetensors": BadInput(
        lambda p: raw_safetensors(p, {f"{Q}.lora_up.weight": _entry("F32", (0, 2**40, 2**40), (0, 0))}),
        "has an absurd shape [0, 1099511627776, 1099511627776]"),
    "offsets_past_end.safetensors": BadInput(
        lambda p: raw_safetensors(p, {f"{Q}.lora_up.weight": _entry("F32", (1000,), (0, 4000))}, b"\0" * 16),
        "header says 4000 bytes of tensor data but the file holds 16"),
    "header_length_absurd.safetensors": BadInput(
        lambda p: raw_safetensors(p, b"{}", length=2**62), "header length field says 4611686018427387904 bytes"),
    "header_too_large.safetensors": BadInput(
        lambda p: _sparse(p, 150_000_000, 150_000_100), "header length field says 150000000 bytes"),
    "header_deeply_nested.safetensors": BadInput(
        lambda p: raw_safetensors(p, _deep_json()), "nested too deeply"),
    "empty.safetensors": BadInput(lambda p: (p.write_bytes(b""), p)[1], "is empty (0 bytes)"),
    "folder.safetensors": BadInput(_directory, "is a directory"),
    "folder_without_extension": BadInput(_directory, "is a directory"),
    "pickle_with_code.ckpt": BadInput(lambda p: _pickle(p, "torch_zip", _lora_with_code),
                                      "refused: this pickle file needs code execution to load"),
    "pickle_with_code.pt": BadInput(lambda p: _pickle(p, "torch_legacy", _lora_with_code),
                                    "refused: this pickle file needs code execution to load"),
    "pickle_with_code.bin": BadInput(lambda p: _pickle(p, "plain", _lora_with_code),
                                     "refused: this pickle file needs code execution to load"),
    "pickle_renamed.safetensors": BadInput(lambda p: _pickle(p, "torch_zip", _lora_with_code),
                                           "is a PyTorch zip checkpoint (pickle), not safetensors"),
    "no_lora_keys.safetensors": BadInput(lambda p: _sd(p, _checkpoint_like()), "holds no LoRA weights"),
    "unknown_keys.safetensors": BadInput(
        lambda p: _sd(p, {f"lora_unet_mystery_block_{i}.lora_up.weight": torch.zeros(4, 2) for i in range(3)}
                      | {f"lora_unet_mystery_block_{i}.lora_down.weight": torch.zeros(2, 4) for i in range(3)}),
        "unknown key scheme: 6 of 6 keys"),
    "mixed_schemes.safetensors": BadInput(
        lambda p: _sd(p, good_state_dict() | lf.lora_state_dict(
            lf.random_factors("sd1", rank=2, targets=[lf.TARGETS["sd1"][2]]), "sd1", "peft")),
        "mixed key schemes in one file"),
    "up_down_mismatch.safetensors": BadInput(
        lambda p: _sd(p, _over(lora_down__weight=torch.randn(3, 320))), "inner ranks differ"),
    "rank_zero.safetensors": BadInput(
        lambda p: _sd(p, _over(lora_up__weight=torch.zeros(320, 0), lora_down__weight=torch.zeros(0, 320))),
        "has rank 0"),
    "nan_values.safetensors": BadInput(
        lambda p: _sd(p, _over(lora_down__weight=torch.full((4, 320), float("nan")))), "contains NaN or Inf values"),
    "inf_values.safetensors": BadInput(
        lambda p: _sd(p, _over(lora_up__weight=torch.full((320, 4), float("-inf")))), "contains NaN or Inf values"),
    "alpha_not_scalar.safetensors": BadInput(
        lambda p: _sd(p, _over(alpha=torch.tensor([2.0, 2.0, 2.0]))), "alpha must be a single number"),
    "metadata_not_utf8.safetensors": BadInput(
        lambda p: raw_safetensors(p, _one_layer_header('{"ss_output_name": "XX"}')[0].replace(b"XX", b"\xff\xfe"),
                                  _one_layer_header()[1]), "header is not UTF-8 text"),
    "metadata_lone_surrogate.safetensors": BadInput(
        lambda p: _with_metadata(p, '{"ss_output_name": "caf\\ud800"}'), "lone surrogate"),
    "metadata_not_string.safetensors": BadInput(
        lambda p: _with_metadata(p, '{"ss_network_dim": 16}'), "value of 'ss_network_dim' is not a string"),
    "key_lone_surrogate.safetensors": BadInput(
        lambda p: raw_safetensors(p, b'{"lora_unet_\\udcff.lora_up.weight": {"dtype": "F32", "shape": [1], '
                                     b'"data_offsets": [0, 4]}}', b"\0" * 4), "lone surrogate"),
    # an SDXL LoRA that fits the SD1.5 source in part (SDXL's CLIP-L is SD1.5's): refused by its architecture
    "sdxl_lora.safetensors": BadInput(
        lambda p: _sd(p, lf.lora_state_dict(lf.random_factors("sdxl", rank=4, targets=[
            "diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight",
            "clip_l.transformer.text_model.encoder.layers.2.self_attn.q_proj.weight",
            "clip_l.transformer.text_model.encoder.layers.2.mlp.fc1.weight"]), "sdxl", "kohya")),
        "this is already an SDXL LoRA: use Load LoRA", stage="transfer"),
    "full_size_sd15_lora_on_tiny_model.safetensors": BadInput(
        lambda p: _sd(p, lf.lora_state_dict(lf.random_factors("sd1", rank=4, targets=[
            "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"]), "sd1", "kohya")),
        "does not fit the source model", stage="transfer"),
}

PICKLE_CASES = tuple(name for name in LORA_CASES if "pickle" in name)


def _unrelated_model(path) -> Path:
    g = torch.Generator().manual_seed(3)
    return _sd(path, {f"encoder.layer.{i}.attention.self.query.weight": torch.randn(16, 16, generator=g)
                      for i in range(4)})


def _small_checkpoint(path) -> Path:
    return _sd(path, {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight":
                      torch.randn(320, 320).half(),
                      "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight":
                      torch.randn(320, 320).half()})


def _checkpoint_with_code(marker):
    return {"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)},
            "evil": _RunsCode(marker)}


class _ModelCheckpoint:
    """Stands in for pytorch_lightning's ModelCheckpoint callback, whose state old SD checkpoints carry."""


def old_sd15_checkpoint(path, state_dict: dict[str, torch.Tensor]) -> Path:
    """``state_dict`` written the way old SD1.5 checkpoints (v1-5-pruned-emaonly.ckpt, sd-v1-4.ckpt) were: a torch
    zip pickle holding ``state_dict`` beside the training state (``global_step`` as a numpy scalar, ``epoch``, the
    Lightning ``callbacks``): plain data that torch's weights-only unpickler can read with ComfyUI's allowances."""
    import sys
    import types

    import numpy as np

    names = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")
    saved = {name: sys.modules.get(name) for name in names}
    for name in names:      # pickle names the class by module; the real package is not installed here
        sys.modules[name] = types.ModuleType(name)
    _ModelCheckpoint.__module__, _ModelCheckpoint.__qualname__ = names[-1], "ModelCheckpoint"
    sys.modules[names[-1]].ModelCheckpoint = _ModelCheckpoint
    callback = _ModelCheckpoint()
    callback.__dict__.update(monitor="val/loss_simple_ema", best_model_score=0.1, dirpath="logs/checkpoints")
    try:
        torch.save({"state_dict": state_dict, "global_step": np.int64(840000), "epoch": 6,
                    "callbacks": {_ModelCheckpoint: callback}}, str(path))
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return Path(path)


MODEL_CASES: dict[str, BadInput] = {
    "text_file.safetensors": LORA_CASES["text_file.safetensors"],
    "truncated_checkpoint.safetensors": BadInput(lambda p: _truncated(p, _small_checkpoint),
                                                 "download is probably incomplete"),
    "empty.safetensors": LORA_CASES["empty.safetensors"],
    "folder.safetensors": LORA_CASES["folder.safetensors"],
    "pickle_checkpoint_with_code.ckpt": BadInput(lambda p: _pickle(p, "torch_zip", _checkpoint_with_code),
                                                 "refused: this pickle file needs code execution to load"),
    "pickle_checkpoint_with_code_legacy.pt": BadInput(lambda p: _pickle(p, "torch_legacy", _checkpoint_with_code),
                                                      "refused: this pickle file needs code execution to load"),
    "pickle_checkpoint_with_code.pth": BadInput(lambda p: _pickle(p, "plain", _checkpoint_with_code),
                                                "refused: this pickle file needs code execution to load"),
    "pickle_checkpoint_renamed.safetensors": BadInput(lambda p: _pickle(p, "torch_zip", _checkpoint_with_code),
                                                      "is a PyTorch zip checkpoint (pickle), not safetensors"),
    "not_a_diffusion_model.safetensors": BadInput(_unrelated_model, "holds no UNet or text-encoder weights"),
    "a_lora_not_a_model.safetensors": BadInput(lambda p: good_lora(p), "holds no UNet or text-encoder weights"),
}


def make(cases: dict[str, BadInput], name: str, folder) -> Path:
    """Write case ``name`` under ``folder`` (created if needed) and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return cases[name].make(folder / name)
