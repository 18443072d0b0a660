"""SafetensorsFile: validation of every header field, lazy reads, and refusal of pickles that run code."""
from __future__ import annotations

import json
import pickle
import struct
import tracemalloc

import pytest
import torch
from safetensors.torch import save_file

from lorax_engine.errors import LoraFileError
from lorax_engine.files.safetensors_file import SafetensorsFile, load_state_dict_file


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(5, 3, generator=g),
        "f16": torch.randn(4, 2, 3, generator=g).half(),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "u8": torch.arange(9, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def test_reads_back_every_dtype_shape_and_metadata(tmp_path):
    path = tmp_path / "a.safetensors"
    tensors = _tensors()
    save_file(tensors, str(path), metadata={"ss_output_name": "a", "note": "ünïcode"})
    with SafetensorsFile(path) as f:
        assert sorted(f.keys()) == sorted(tensors)
        assert f.metadata == {"ss_output_name": "a", "note": "ünïcode"}
        for k, t in tensors.items():
            assert f.shape(k) == tuple(t.shape)
            assert f.dtype(k) == t.dtype
            got = f.get(k)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got, t), k
        assert torch.equal(f.get_rows("f16", 1, 3), tensors["f16"][1:3])
        assert torch.equal(f.get_rows("f32", 3, 99), tensors["f32"][3:])
        assert f.dtype_names()["bf16"] == "BF16"


def test_get_reads_only_the_requested_tensor(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"big": torch.zeros(4096, 1024), "small": torch.arange(10.0)}, str(path))   # 16 MB + 40 B
    with SafetensorsFile(path) as f:
        tracemalloc.start()
        small = f.get("small")
        rows = f.get_rows("big", 5, 7)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert torch.equal(small, torch.arange(10.0))
    assert rows.shape == (2, 1024)
    assert peak < 1_000_000, f"reading 2 rows and 10 floats allocated {peak} bytes"


def _raw_file(path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(head) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + head + data)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_FILES = {
    "empty": (lambda p: p.write_bytes(b""), "empty"),
    "too_short": (lambda p: p.write_bytes(b"\x01\x02\x03"), "too short"),
    "huge_header_length": (lambda p: p.write_bytes(struct.pack("<Q", 10**12) + b"{}"), "implausible"),
    "header_past_end": (lambda p: _raw_file(p, b"{}", length=5000), "truncated"),
    "not_utf8": (lambda p: _raw_file(p, b"\xff\xfe{}"), "not UTF-8"),
    "not_json": (lambda p: _raw_file(p, b"{not json"), "not valid JSON"),
    "json_array": (lambda p: _raw_file(p, b"[1, 2]"), "not an object"),
    "unknown_dtype": (lambda p: _raw_file(p, {"w": _entry("Q4")}, b"\0" * 8), "unknown dtype"),
    "negative_shape": (lambda p: _raw_file(p, {"w": _entry(shape=(-2,))}, b"\0" * 8), "invalid shape"),
    "float_shape": (lambda p: _raw_file(p, {"w": _entry(shape=(2.0,))}, b"\0" * 8), "invalid shape"),
    "bad_offsets": (lambda p: _raw_file(p, {"w": _entry(offsets=(8,))}, b"\0" * 8), "invalid data_offsets"),
    "reversed_offsets": (lambda p: _raw_file(p, {"w": _entry(offsets=(8, 0))}, b"\0" * 8), "invalid data_offsets"),
    "size_mismatch": (lambda p: _raw_file(p, {"w": _entry(offsets=(0, 12))}, b"\0" * 12), "needs 8 bytes"),
    "truncated_data": (lambda p: _raw_file(p, {"w": _entry(shape=(1000,), offsets=(0, 4000))}, b"\0" * 1000),
                       "header says 4000 bytes of tensor data but the file holds 1000"),
    "overlap": (lambda p: _raw_file(p, {"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}, b"\0" * 12),
                "overlap"),
    "metadata_not_string": (lambda p: _raw_file(p, {"__metadata__": {"x": 1}}), "not a string"),
    "pickle_renamed": (lambda p: p.write_bytes(pickle.dumps({"a": 1}, protocol=4)), "pickle"),
    "torch_zip_renamed": (lambda p: torch.save({"a": torch.zeros(2)}, str(p)), "PyTorch zip"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_invalid_files_give_one_clear_error(tmp_path, case):
    make, problem = BAD_FILES[case]
    path = tmp_path / f"{case}.safetensors"
    make(path)
    with pytest.raises(LoraFileError) as info:
        SafetensorsFile(path)
    msg = str(info.value)
    assert msg.startswith(str(path) + ": ")
    assert problem in msg


def test_truncated_message_explains_the_likely_cause(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.ones(100, 100)}, str(path))
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(LoraFileError, match="truncated.*download is probably incomplete"):
        SafetensorsFile(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(LoraFileError, match="file not found"):
        SafetensorsFile(tmp_path / "nope.safetensors")
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    with pytest.raises(LoraFileError, match="is a directory"):
        SafetensorsFile(d)


def test_load_state_dict_file_reads_safetensors_and_weights_only_pickles(tmp_path):
    tensors = {"a": torch.randn(3, 2), "b": torch.arange(4)}
    st = tmp_path / "x.safetensors"
    save_file(tensors, str(st), metadata={"k": "v"})
    sd, md = load_state_dict_file(st)
    assert md == {"k": "v"} and sorted(sd) == ["a", "b"]
    assert all(torch.equal(sd[k], tensors[k]) for k in tensors)

    pt = tmp_path / "x.ckpt"
    torch.save({"state_dict": {"model": {"w": tensors["a"]}, "b": tensors["b"]}, "epoch": 3}, str(pt))
    sd, md = load_state_dict_file(pt)
    assert md == {} and sorted(sd) == ["b", "model.w"]          # nested dicts flattened, ints ignored
    assert torch.equal(sd["model.w"], tensors["a"])


class _RunsCode:
    """Unpickling this calls exec(): what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("writer", ["torch_zip", "torch_legacy", "plain_pickle"])
def test_pickle_that_runs_code_is_refused_and_never_executed(tmp_path, writer):
    marker = tmp_path / "marker.txt"
    payload = {"w": torch.zeros(2), "evil": _RunsCode(marker)}
    path = tmp_path / "evil.pt"
    if writer == "torch_zip":
        torch.save(payload, str(path))
    elif writer == "torch_legacy":
        torch.save(payload, str(path), _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(LoraFileError) as info:
        load_state_dict_file(path)
    assert str(path) in str(info.value)
    assert "refused: this pickle file needs code execution to load" in str(info.value)
    assert not marker.exists()


def test_unknown_extension(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF....")
    with pytest.raises(LoraFileError, match=r"unknown file type '\.gguf'"):
        load_state_dict_file(path)


def test_threads_reading_one_file_at_once_each_get_their_own_tensor(tmp_path):
    """Weights are hashed by several threads at once through one open file: no read may see another's offset."""
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(257 + i, 129, generator=g) for i in range(16)}
    path = tmp_path / "many.safetensors"
    save_file(tensors, str(path))
    with SafetensorsFile(path) as f, ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            keys = list(tensors) * 3
            for key, t in zip(keys, pool.map(f.get, keys), strict=True):
                assert torch.equal(t, tensors[key]), key
