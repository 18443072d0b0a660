"""Provenance hashes (lorax_engine/files/provenance.py) against independent computations on real files."""
from __future__ import annotations

import hashlib
import io
import json
import struct

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorax_engine.files.lora import LoraLayer, LoraModel
from lorax_engine.files.provenance import (
    UNKNOWN_MODEL,
    file_sha256,
    kohya_hashes,
    source_provenance,
    write_lora_with_provenance,
)

KEYS = [f"diffusion_model.input_blocks.{b}.1.transformer_blocks.0.attn1.to_{p}.weight"
        for b in (4, 5) for p in ("q", "k", "v")]


def _lora(rank=96) -> LoraModel:
    g = torch.Generator().manual_seed(3)
    layers = {k: LoraLayer(torch.randn(640, rank, generator=g), torch.randn(rank, 640, generator=g), 8.0, (640, 640))
              for k in KEYS}
    return LoraModel(layers, "sdxl", "lorax-transfer", {"lorax.mode": "auto"})


def _safetensors_bytes(tensors: dict, metadata: dict) -> bytes:
    """An independent safetensors serialisation (the format's spec: sorted by dtype alignment then name, 8-byte
    aligned header padded with spaces), so the hash is not checked against the library that computed it."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, data, offset = {}, b"", 0
    dtypes = {torch.float16: "F16", torch.float32: "F32"}
    for k in order:
        raw = tensors[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": dtypes[tensors[k].dtype], "shape": list(tensors[k].shape),
                     "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def test_file_sha256_is_the_files_sha256_and_follows_rewrites(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 3_000_000)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(b"y" * 3_000_000)              # same size, new content: the memo must not answer
    assert file_sha256(path, memo_dir=tmp_path / "memo") == hashlib.sha256(b"y" * 3_000_000).hexdigest()
    assert list((tmp_path / "memo").iterdir())


def test_kohya_hashes_match_an_independent_serialisation(tmp_path):
    tensors = {"b": torch.arange(400_000, dtype=torch.float32).reshape(400, 1000),
               "a": torch.ones(3, 5, dtype=torch.float16)}
    metadata = {"ss_output_name": "x", "modelspec.title": "not hashed"}
    model_hash, legacy_hash = kohya_hashes(tensors, metadata)
    data = _safetensors_bytes(tensors, {"ss_output_name": "x"})
    n = int.from_bytes(data[:8], "little")
    assert model_hash == hashlib.sha256(data[8 + n:]).hexdigest()
    assert len(data) > 0x110000
    assert legacy_hash == hashlib.sha256(io.BytesIO(data).getbuffer()[0x100000:0x110000]).hexdigest()[:8]


def test_written_file_carries_its_hashes_and_the_provenance(tmp_path):
    out = write_lora_with_provenance(_lora(), tmp_path / "out.safetensors", architecture="sdxl",
                                     provenance={"lorax.source_lora": "style.safetensors"})
    raw = out.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]
    assert meta["lorax.source_lora"] == "style.safetensors" and meta["lorax.mode"] == "auto"
    # the legacy hash is over the file sd-scripts would serialise: these tensors with the ss_* metadata only
    ss_only = {k: v for k, v in meta.items() if k.startswith("ss_")}
    again = _safetensors_bytes(load_file(str(out)), ss_only)
    assert len(again) > 0x110000
    assert meta["sshs_legacy_hash"] == hashlib.sha256(again[0x100000:0x110000]).hexdigest()[:8]


def test_source_provenance_names_unknown_models_honestly(tmp_path):
    lora = tmp_path / "my lora.safetensors"
    lora.write_bytes(b"lora bytes")
    prov = source_provenance(lora_path=lora)
    assert prov == {"lorax.source_lora": "my lora.safetensors",
                    "lorax.source_lora_sha256": hashlib.sha256(b"lora bytes").hexdigest(),
                    "lorax.source_model": UNKNOWN_MODEL, "lorax.target_model": UNKNOWN_MODEL}


def test_hash_ahead_hashes_each_file_once_in_the_background(tmp_path, monkeypatch):
    """The CLI starts the checkpoints' sha256 when the transfer starts; provenance later waits for that result
    instead of reading the file again, and a rewritten file is hashed anew."""
    import lorax_engine.files.provenance as provenance

    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(range(256)) * 40000)
    calls = []
    hash_now = provenance._hash_file_now
    monkeypatch.setattr(provenance, "_hash_file_now", lambda stamp, memo_dir: calls.append(stamp) or
                        hash_now(stamp, memo_dir))
    provenance.hash_ahead(path, None, tmp_path / "missing.safetensors")
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(calls) == 1
    path.write_bytes(b"other content")
    provenance.hash_ahead(path)
    assert file_sha256(path) == hashlib.sha256(b"other content").hexdigest() and len(calls) == 2


def test_an_unwritable_architecture_is_the_writers_clear_error(tmp_path):
    """The hashes are computed from what write_lora prepares, after its checks: a target of unknown architecture
    gets write_lora's one-line error (a bare KeyError from the hashing step once reached the UI)."""
    import pytest

    from lorax_engine.errors import LoraFileError

    with pytest.raises(LoraFileError, match="cannot write a LoRA for architecture 'unknown'"):
        write_lora_with_provenance(_lora(), tmp_path / "out.safetensors", architecture="unknown")
    assert list(tmp_path.iterdir()) == []
