"""Property-based fuzzing of everything that reads untrusted names and bytes: the LoRA reader (random and
mutated safetensors files, generated headers, state dicts of random keys and shapes), the key-name parser
(``split_key``, ``module_to_canonical``) and the output-name sanitiser.

The property: a result or one of the pack's own errors (:class:`LoraXError`), never anything else.

``make test`` runs a bounded, deterministic number of cases per test (the file takes well under a minute).
A longer, randomised run::

    LORAX_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_fuzz_readers.py --hypothesis-show-statistics
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import lora_factory as lf
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import lorax_zoo
from lorax_engine.errors import LoraXError, OutputPathError
from lorax_engine.files.keys import module_to_canonical, split_key
from lorax_engine.files.lora import LoraModel
from lorax_engine.files.lora_formats import lora_from_state_dict, read_lora
from lorax_engine.files.output_names import sanitize_stem, unique_output_path
from lorax_engine.files.safetensors_file import DTYPES

# the strategies sample from thousands of real module names: their repr is long, and that is all it is
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

EXAMPLES = int(os.environ.get("LORAX_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # the default run is the same on every machine; a long run explores new cases each time
    derandomize="LORAX_FUZZ_EXAMPLES" not in os.environ,
    database=None,          # no .hypothesis/ folder in the repository; failures print a reproduction blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)

ARCHITECTURES = ("sd1", "sdxl", "unknown", "ssd1b", "vega", "")


def _read(path: Path):
    """read_lora, with the property checked: a LoraModel or a LoraXError (returned, for further checks)."""
    try:
        lora = read_lora(path)
    except LoraXError as err:
        assert str(err).strip(), "an error must say something"
        return err
    assert isinstance(lora, LoraModel)
    for layer in lora.layers.values():
        assert layer.up.shape[1] == layer.down.shape[0] == layer.rank > 0
        assert layer.up.shape[0] == layer.weight_shape[0]
        assert layer.down.shape[1] == math.prod(layer.weight_shape[1:])
        assert math.isfinite(layer.alpha)
    return lora


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# --- whole files ------------------------------------------------------------------------------------

def _templates(folder: Path) -> list[bytes]:
    """Valid LoRA files of several formats and dtypes: the seeds that mutations start from."""
    sd1 = lf.random_factors("sd1", rank=2, targets=lf.TARGETS["sd1"][:3])
    xl = lf.random_factors("sdxl", rank=2, targets=lf.TARGETS["sdxl"][-2:])
    text_key = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    loha, _ = lf.loha_state_dict("sd1", [text_key], rank=2)
    lokr, _ = lf.lokr_state_dict("sd1", [text_key], factor=4, rank=2)
    dicts = [
        (lf.lora_state_dict(sd1, "sd1", "kohya"), {"ss_tag_frequency": json.dumps({"1_x": {"x": 3}})}),
        (lf.lora_state_dict(sd1, "sd1", "peft", dtype=torch.bfloat16), None),
        (lf.lora_state_dict(xl, "sdxl", "diffusers_old", dtype=torch.float32), {"note": "ü"}),
        (loha, None),
        (lokr, None),
    ]
    out = []
    for i, (sd, md) in enumerate(dicts):
        out.append(lf.save(sd, folder / f"template{i}.safetensors", md).read_bytes())
    return out


@pytest.fixture(scope="module")
def templates(scratch):
    seeds = _templates(scratch)
    for i, blob in enumerate(seeds):   # the seeds themselves must read
        path = scratch / f"seed{i}.safetensors"
        path.write_bytes(blob)
        assert isinstance(_read(path), LoraModel)
    return seeds


@FUZZ
@given(blob=st.binary(max_size=4096))
def test_random_bytes(scratch, blob):
    path = scratch / "random.safetensors"
    path.write_bytes(blob)
    _read(path)


def _mutate(blob: bytes, data) -> bytes:
    header_end = 8 + int.from_bytes(blob[:8], "little")
    buf = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 6), label="mutations")):
        kind = data.draw(st.sampled_from(["flip", "byte", "truncate", "insert", "delete", "length"]), label="kind")
        # most mutations hit the header, where the parsing is
        hi = header_end if data.draw(st.booleans(), label="in header") else max(len(buf), 1)
        pos = data.draw(st.integers(0, max(min(hi, len(buf)) - 1, 0)), label="position")
        if kind == "flip" and buf:
            buf[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif kind == "byte" and buf:
            buf[pos] = data.draw(st.sampled_from(b'{}[]",:0123456789-.eE \\\x00\xff'), label="byte")
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=16), label="inserted")
        elif kind == "delete":
            del buf[pos:pos + data.draw(st.integers(1, 16), label="deleted")]
        elif kind == "length" and len(buf) >= 8:
            n = data.draw(st.sampled_from([0, 1, 2, header_end - 9, header_end - 7, 2**31, 2**63, 2**64 - 1]),
                          label="header length")
            buf[:8] = struct.pack("<Q", max(n, 0))
    return bytes(buf)


@FUZZ
@given(data=st.data())
def test_mutated_lora_files(scratch, templates, data):
    blob = templates[data.draw(st.integers(0, len(templates) - 1), label="template")]
    path = scratch / "mutated.safetensors"
    path.write_bytes(_mutate(blob, data))
    _read(path)


@pytest.fixture(scope="module")
def pickle_template(scratch):
    path = scratch / "template.pt"
    torch.save(lf.lora_state_dict(lf.random_factors("sd1", rank=2, targets=lf.TARGETS["sd1"][:2]), "sd1", "kohya"),
               str(path))
    assert isinstance(_read(path), LoraModel)
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_mutated_weights_only_pickles(scratch, pickle_template, data):
    """A .pt LoRA goes through torch.load(weights_only=True): damaged zips and pickles must be refused cleanly."""
    path = scratch / "mutated.pt"
    blob = bytearray(pickle_template)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        pos = data.draw(st.integers(0, len(blob) - 1), label="position")
        if data.draw(st.booleans(), label="truncate"):
            del blob[max(pos, 1):]
        else:
            blob[pos] = data.draw(st.integers(0, 255), label="byte")
    path.write_bytes(bytes(blob))
    _read(path)


# --- generated headers ------------------------------------------------------------------------------

# real module names of several schemes (ComfyUI's own key map), plus near misses
_MODULES = sorted({*lorax_zoo.lora_key_map("sd15"), *list(lorax_zoo.lora_key_map("sdxl"))[::7]})
_PARTS = [".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".alpha", ".lora_A.weight", ".lora_B.weight",
          ".lora_A.default.weight", "_lora.up.weight", ".lora.down.weight", ".lora_linear_layer.up.weight",
          ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2", ".lokr_w1", ".lokr_w2",
          ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2", ".dora_scale", ".weight", ".diff", ""]
_TEXT = st.text(max_size=40)   # any code point, lone surrogates included (JSON can escape them)
module_names = st.one_of(
    st.sampled_from(_MODULES),
    st.builds(lambda m, cut: m[:cut], st.sampled_from(_MODULES), st.integers(0, 80)),
    st.builds(lambda m, s: m.replace("_", s, 1), st.sampled_from(_MODULES), st.sampled_from([".", "__", "", "-"])),
    _TEXT,
)
tensor_keys = st.builds(lambda m, p: m + p, module_names, st.sampled_from(_PARTS))
small_shapes = st.lists(st.integers(0, 9), max_size=4)


@st.composite
def headers(draw):
    """(header JSON bytes, data bytes): mostly well-formed entries with finite values, some broken fields."""
    names = draw(st.lists(tensor_keys, min_size=0, max_size=8, unique=True))
    header, data = {}, b""
    for name in names:
        dtype = draw(st.sampled_from([*DTYPES, "F16", "F32", "BF16", "Q4", None, 3]))
        shape = draw(st.one_of(small_shapes, st.just([320, 2]), st.just([2, 768]),
                               st.lists(st.one_of(st.integers(-2, 2**40), st.floats(), st.text(max_size=2)),
                                        max_size=3)))
        itemsize = DTYPES[dtype][1] if dtype in DTYPES else 4
        ok_shape = all(type(s) is int and s >= 0 for s in shape)
        nbytes = math.prod(shape) * itemsize if ok_shape else 0
        if ok_shape and max(shape, default=0) <= 1 << 16 and nbytes <= 1 << 16 and dtype in DTYPES \
                and draw(st.booleans()):
            values = draw(st.sampled_from(["normal", "bytes", "nan"]))
            if values == "bytes":
                raw = draw(st.binary(min_size=nbytes, max_size=nbytes))
            else:
                t = torch.randn(shape) * 0.1
                if values == "nan" and t.numel():
                    t.view(-1)[0] = float("nan")
                raw = t.to(DTYPES[dtype][0]).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            begin = len(data)
            data += raw
            offsets = [begin, begin + len(raw)]
        else:
            offsets = draw(st.lists(st.integers(-1, 2**64), max_size=3))
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if draw(st.integers(0, 9)) == 0:
            entry = draw(st.sampled_from([None, [], "x", {"dtype": dtype}, {**entry, "extra": 1}]))
        header[name] = entry
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(_TEXT, _TEXT, max_size=3),
                                                st.dictionaries(_TEXT, st.integers(), max_size=2),
                                                st.just("not a dict"), st.none()))
    return json.dumps(header, allow_nan=True).encode(), data


@FUZZ
@given(content=headers())
# found by the long run: torch has no isfinite for float8
@example(content=(b'{"conv_in.lora_up.weight": {"dtype": "F8_E4M3", "shape": [2, 2], "data_offsets": [0, 4]}}',
                  b"\x7f\x7f\x00\x00"))
# and an empty tensor whose other dimensions overflow torch's strides
@example(content=(b'{"conv_in.lora_up.weight": {"dtype": "F32", "shape": [0, 1099511627776, 1099511627776], '
                  b'"data_offsets": [0, 0]}}', b""))
def test_generated_headers(scratch, content):
    head, data = content
    path = scratch / "generated.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    _read(path)


# --- state dicts: the format logic itself ----------------------------------------------------------

_FACTOR_SHAPES = st.lists(st.sampled_from([0, 1, 2, 3, 4, 8, 320, 768]), min_size=0, max_size=4)


@st.composite
def state_dicts(draw):
    modules = draw(st.lists(st.sampled_from(_MODULES[:400] + _MODULES[-400:]), min_size=1, max_size=3, unique=True))
    sd = {}
    for module in modules:
        for part in draw(st.lists(st.sampled_from(_PARTS), min_size=1, max_size=5, unique=True)):
            shape = draw(_FACTOR_SHAPES)
            if math.prod(shape) > 1 << 18:
                shape = shape[:2]
            dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64]))
            special = draw(st.sampled_from([None, None, None, "nan", "inf", "zero", "huge"]))
            t = torch.randn(shape) * 0.1
            if t.numel() and special:
                t.view(-1)[0] = {"nan": float("nan"), "inf": float("inf"), "zero": 0.0, "huge": 6e4}[special]
            sd[module + part] = t.to(dtype)
    return sd


_TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@FUZZ
@given(sd=state_dicts(), with_metadata=st.booleans())
# found by the long run: LoKr factors whose product is a scalar, empty, or overflows float32 (the SVD then failed)
@example(sd={"conv_in.lokr_w1": torch.tensor(0.05), "conv_in.lokr_w2": torch.tensor(-0.05)}, with_metadata=False)
@example(sd={"conv_in.lokr_w1": torch.tensor(0.05), "conv_in.lokr_w2": torch.tensor([])}, with_metadata=False)
@example(sd={"conv_in.lokr_w1": torch.tensor(0.05), "conv_in.lokr_w2": torch.zeros(0, 0, 0, 0)}, with_metadata=False)
@example(sd={f"conv_in.hada_{p}": torch.tensor(0.05) for p in ("w1_a", "w1_b", "w2_a", "w2_b")}, with_metadata=False)
@example(sd={f"{_TE_Q}.lokr_w1": torch.full((4, 4), 1e30), f"{_TE_Q}.lokr_w2": torch.full((192, 192), 1e30)},
         with_metadata=False)
def test_state_dicts_of_random_keys_and_shapes(sd, with_metadata):
    try:
        lora = lora_from_state_dict(sd, {"ss_tag_frequency": "{"} if with_metadata else None, path="fuzz")
    except LoraXError as err:
        assert str(err).startswith("fuzz: ")
        return
    for layer in lora.layers.values():
        assert layer.up.shape[1] == layer.down.shape[0] > 0
        assert torch.isfinite(layer.up).all() and torch.isfinite(layer.down).all()


# --- key names ---------------------------------------------------------------------------------------

@FUZZ
@given(key=st.one_of(tensor_keys, _TEXT))
def test_split_key(key):
    part = split_key(key)
    if part is not None:
        assert key.startswith(part.module) and part.module
        assert part.family in (None, "kohya", "comfyui", "diffusers-old", "peft")


@FUZZ
@given(module=module_names, architecture=st.sampled_from(ARCHITECTURES))
def test_module_to_canonical(module, architecture):
    try:
        canonical = module_to_canonical(module, architecture)
    except LoraXError:
        return
    if canonical is not None:
        assert canonical.endswith(".weight")
        assert canonical.startswith(("diffusion_model.", "clip_l.transformer.", "clip_g.transformer."))


# --- output names ------------------------------------------------------------------------------------

@FUZZ
@given(name=st.one_of(_TEXT, st.text(min_size=60, max_size=300), st.builds("".join, st.lists(st.sampled_from(
    ["..", "/", "\\", "\x00", "CON", "nul", "COM1", ".", " ", "a", "é", "C:", "~", ".safetensors", "\n",
     "\udce9"]),   # a byte of a non-UTF-8 file name, as Python keeps it
    max_size=8))))
def test_output_names_stay_in_their_folder(scratch, name):
    folder = scratch / "out"
    folder.mkdir(exist_ok=True)
    try:
        path = unique_output_path(folder, name)
    except OutputPathError:
        return
    assert path.parent == folder
    stem = sanitize_stem(name)
    assert path.name == f"{stem}.safetensors"
    # room for a "_00001" counter and write_lora's temporary name within the usual 255-byte limit
    assert len(path.name.encode("utf-8")) + len("_00001") + len("..12345678.tmp") <= 255
    assert not any(c in stem for c in '/\\\x00:') and ".." not in stem and stem.strip(" .") == stem
    assert stem.split(".")[0].rstrip(" ").lower() not in ("con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)),
                                              *(f"lpt{i}" for i in range(10)))
