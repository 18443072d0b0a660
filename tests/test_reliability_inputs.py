"""Bad inputs on the command line: every case of tests/bad_inputs.py gives exit status 2 and one line
``error: <file>: <problem>`` (no traceback, nothing on stdout), writes nothing, and never runs a pickle's code.
Unusual but valid inputs (mixed dtypes, weights-only pickles, oversized trigger-word metadata) must work.

The same files through the ComfyUI server are in test_reliability_server.py; the engine-level checks of
each header field are in test_safetensors_file.py and test_lora_formats.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import bad_inputs as bad
import pytest
import torch
from comfy_harness import REPO_ROOT
from safetensors.torch import load_file

from lorax_engine.cli import main
from lorax_engine.files.lora_formats import MAX_METADATA_VALUE_CHARS, read_lora

RANK = "8"


@pytest.fixture(scope="module")
def models(zoo):
    return str(zoo.checkpoint(bad.SOURCE_MODEL)), str(zoo.checkpoint(bad.TARGET_MODEL))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Shared by the tests that run whole transfers: the tiny models' bases are computed once."""
    return tmp_path_factory.mktemp("cache")


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code, out, err, *needles):
    assert code == 2, err
    assert out == ""
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and "unexpected" not in err
    for needle in needles:
        assert needle in err, err


def _transfer_args(models, lora, out, cache, *extra):
    return ("transfer", "--source-model", models[0], "--target-model", models[1], "--lora", lora, "--out", out,
            "--rank", RANK, "--cache-dir", cache, "--quiet", *extra)


@pytest.mark.parametrize("name", sorted(bad.LORA_CASES))
def test_bad_lora_file(models, tmp_path, capsys, name):
    case = bad.LORA_CASES[name]
    path = bad.make(bad.LORA_CASES, name, tmp_path / "in")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, out, err = _cli(capsys, *_transfer_args(models, path, out_dir / "x.safetensors", tmp_path / "cache"))
    _assert_one_line_error(code, out, err, str(path), case.problem)
    assert list(out_dir.iterdir()) == []
    if case.stage == "read":                        # inspect reads the file the same way
        _assert_one_line_error(*_cli(capsys, "inspect", path, "--json"), str(path), case.problem)
    assert not bad.code_marker(path).exists()


@pytest.mark.parametrize("role", ["--source-model", "--target-model"])
@pytest.mark.parametrize("name", sorted(bad.MODEL_CASES))
def test_bad_model_file(models, tmp_path, capsys, name, role):
    case = bad.MODEL_CASES[name]
    path = bad.make(bad.MODEL_CASES, name, tmp_path / "models")
    lora = bad.good_lora(tmp_path / "good.safetensors")
    args = list(_transfer_args(models, lora, tmp_path / "x.safetensors", tmp_path / "cache"))
    args[args.index(role) + 1] = str(path)
    _assert_one_line_error(*_cli(capsys, *args), str(path), case.problem)
    assert not (tmp_path / "x.safetensors").exists()
    assert not bad.code_marker(path).exists()


@pytest.mark.parametrize("lora_case, model_case", [
    ("pickle_with_code.ckpt", None), ("header_deeply_nested.safetensors", None),
    (None, "pickle_checkpoint_with_code.ckpt"), (None, "not_a_diffusion_model.safetensors")])
def test_bad_inputs_in_a_real_process(models, tmp_path, lora_case, model_case):
    """The same through ``python -m lorax_engine``: the exit status and stderr a shell sees."""
    lora = bad.make(bad.LORA_CASES, lora_case, tmp_path) if lora_case else bad.good_lora(tmp_path / "g.safetensors")
    model = bad.make(bad.MODEL_CASES, model_case, tmp_path) if model_case else models[0]
    problem = bad.LORA_CASES[lora_case].problem if lora_case else bad.MODEL_CASES[model_case].problem
    proc = subprocess.run([sys.executable, "-m", "lorax_engine", "transfer", "--source-model", str(model),
                           "--target-model", models[1], "--lora", str(lora), "--out", str(tmp_path / "x.safetensors")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    _assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, problem)
    assert not bad.code_marker(lora).exists() and not bad.code_marker(model).exists()
    assert not (tmp_path / "x.safetensors").exists()


def test_lora_file_written_without_a_folder_is_an_error_before_any_work(models, tmp_path, capsys):
    lora = bad.good_lora(tmp_path / "g.safetensors")
    cache = tmp_path / "cache"
    for out in (tmp_path / "no_such_folder" / "x.safetensors", tmp_path):
        _assert_one_line_error(*_cli(capsys, *_transfer_args(models, lora, out, cache)), str(out))
    assert not cache.exists(), "the output path is checked before any basis is computed"


# --- unusual inputs that must work ----------------------------------------------------------------------

def test_output_file_name_that_is_not_utf8(models, cache_dir, tmp_path, capsys):
    """Linux file names are bytes; Python keeps the non-UTF-8 ones as lone surrogates, which the UTF-8
    metadata cannot hold."""
    lora = bad.good_lora(tmp_path / "g.safetensors")
    out = tmp_path / "caf\udce9_sdxl.safetensors"
    code, _, err = _cli(capsys, *_transfer_args(models, lora, out, cache_dir, "--threshold", "off"))
    assert code == 0, err
    assert os.fsencode(out).endswith(b"caf\xe9_sdxl.safetensors") and out.is_file()
    assert read_lora(out).metadata["ss_output_name"] == "caf\ufffd_sdxl"
    # printing such a name (a real process: its stdout is strict UTF-8) shows the byte escaped
    proc = subprocess.run([sys.executable, "-m", "lorax_engine", "inspect", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "caf\\udce9_sdxl.safetensors" in proc.stdout


def _deltas(path) -> dict[str, torch.Tensor]:
    return {k: layer.delta() for k, layer in read_lora(path).layers.items()}


def test_mixed_dtypes_read_exactly_and_transfer_like_fp32(models, cache_dir, tmp_path, capsys):
    mixed = bad.mixed_dtype_lora(tmp_path / "mixed.safetensors")
    # the same numbers, all fp32 (what bf16/fp16 rounding left of them)
    sd = {k: v.float() for k, v in load_file(str(mixed)).items()}
    fp32 = bad.lf.save(sd, tmp_path / "fp32.safetensors")
    layer = read_lora(mixed).layers[bad.GOOD_KEYS[0]]
    up, down = sd[f"{bad.Q}.lora_up.weight"].double(), sd[f"{bad.Q}.lora_down.weight"].double()
    expected = float(sd[f"{bad.Q}.alpha"]) / up.shape[1] * (up @ down)
    torch.testing.assert_close(layer.delta().double(), expected, rtol=1e-6, atol=1e-9)
    assert read_lora(mixed).source_dtypes == ("bfloat16", "float16", "float32")

    outs = []
    for src in (mixed, fp32):
        out = tmp_path / f"{src.stem}_sdxl.safetensors"
        code, stdout, err = _cli(capsys, *_transfer_args(models, src, out, cache_dir, "--threshold", "off"))
        assert code == 0, err
        outs.append(_deltas(out))
    assert outs[0].keys() == outs[1].keys() and outs[0]
    for key in outs[0]:
        torch.testing.assert_close(outs[0][key], outs[1][key], rtol=0, atol=0)


def test_weights_only_pickle_lora_transfers_like_its_safetensors_twin(models, cache_dir, tmp_path, capsys):
    st_path = bad.good_lora(tmp_path / "twin.safetensors", seed=4)
    for suffix in (".pt", ".ckpt", ".bin"):
        pt_path = tmp_path / f"twin{suffix}"
        torch.save(load_file(str(st_path)), str(pt_path))
        outs = []
        for src in (st_path, pt_path):
            out = tmp_path / f"{src.name}.out.safetensors"
            code, _, err = _cli(capsys, *_transfer_args(models, src, out, cache_dir, "--threshold", "off"))
            assert code == 0, err
            outs.append(_deltas(out))
        assert outs[0].keys() == outs[1].keys() and outs[0]
        for key in outs[0]:
            torch.testing.assert_close(outs[0][key], outs[1][key], rtol=0, atol=0)


def test_oversized_trigger_word_metadata_is_cut_to_the_most_frequent_tags(models, cache_dir, tmp_path, capsys):
    # 300k distinct tags (about 7 M characters) plus the real trigger words, most frequent first
    tags = {f"rare_tag_{i:06d}": 1 for i in range(300_000)} | {"lrxstyle": 500, "watercolor": 90}
    text = json.dumps({"10_lrxstyle": tags})
    assert len(text) > MAX_METADATA_VALUE_CHARS
    lora = bad.good_lora(tmp_path / "tags.safetensors", metadata={"ss_tag_frequency": text})
    out = tmp_path / "tags_sdxl.safetensors"
    code, _, err = _cli(capsys, *_transfer_args(models, lora, out, cache_dir, "--threshold", "off"))
    assert code == 0, err
    kept = json.loads(read_lora(out).metadata["ss_tag_frequency"])["10_lrxstyle"]
    assert len(json.dumps({"10_lrxstyle": kept})) <= MAX_METADATA_VALUE_CHARS
    assert kept["lrxstyle"] == 500 and kept["watercolor"] == 90
    assert 2 < len(kept) < len(tags) and all(kept[t] == 1 for t in kept if t.startswith("rare_tag_"))


def test_inspect_survives_hostile_trigger_word_metadata(tmp_path, capsys):
    """JSON allows Infinity, NaN and deep nesting; the metadata is the file author's, so none may crash."""
    for i, tags in enumerate(['{"a": {"lrxstyle": Infinity, "ink": NaN, "1girl": 3}}', "[" * 50_000]):
        path = bad.good_lora(tmp_path / f"tags{i}.safetensors", metadata={"ss_tag_frequency": tags})
        code, out, err = _cli(capsys, "inspect", path, "--json")
        assert code == 0, err
        words = json.loads(out)["trigger_words"]
        assert words == ([{"tag": "1girl", "count": 3}] if i == 0 else [])


# --- writing --------------------------------------------------------------------------------------------

def test_factors_beyond_float16_are_balanced_or_refused(tmp_path):
    """fp16 files hold at most 65504: a layer whose factors overflow alone but whose product fits is stored
    balanced (same update); one whose update itself is out of range is refused, never written as Inf."""
    from lorax_engine.errors import LoraFileError
    from lorax_engine.files.lora import LoraLayer, LoraModel
    from lorax_engine.files.lora_formats import write_lora

    key = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(640, 2, generator=g) * 1e6, torch.randn(2, 640, generator=g) * 1e-7
    lora = LoraModel({key: LoraLayer(up, down, 2.0, (640, 640))}, "sdxl")
    path = write_lora(lora, tmp_path / "balanced.safetensors", architecture="sdxl")
    stored = read_lora(path).layers[key]
    expected = up.double() @ down.double()
    torch.testing.assert_close(stored.delta().double(), expected, rtol=0, atol=2e-3 * float(expected.abs().max()))

    huge = LoraModel({key: LoraLayer(up * 1e4, down * 1e7, 2.0, (640, 640))}, "sdxl")
    target = tmp_path / "huge.safetensors"
    with pytest.raises(LoraFileError, match="tensors hold values too large for float16 .*lower the LoRA's strength"):
        write_lora(huge, target, architecture="sdxl")
    assert list(tmp_path.iterdir()) == [path]


# --- the checkpoints people have -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def old_ckpt(models, tmp_path_factory):
    """The tiny SD1.5 written the way v1-5-pruned-emaonly.ckpt was: a torch zip pickle with a ``state_dict``."""
    return bad.old_sd15_checkpoint(tmp_path_factory.mktemp("ckpt") / "v1-5-pruned-emaonly.ckpt",
                                   load_file(models[0]))


def test_old_sd15_ckpt_source_transfers_like_its_safetensors_twin(models, old_ckpt, cache_dir, tmp_path, capsys):
    lora = bad.good_lora(tmp_path / "g.safetensors", seed=9)
    outs = []
    for source in (models[0], old_ckpt):
        out = tmp_path / f"{os.path.basename(source)}.out.safetensors"
        args = list(_transfer_args(models, lora, out, cache_dir, "--threshold", "off"))
        args[args.index("--source-model") + 1] = str(source)
        code, _, err = _cli(capsys, *args)
        assert code == 0, err
        outs.append(read_lora(out))
    assert sorted(outs[0].layers) == sorted(outs[1].layers) and len(outs[0].layers) == len(bad.GOOD_KEYS)
    for key in outs[0].layers:
        torch.testing.assert_close(outs[1].layers[key].delta(), outs[0].layers[key].delta(), rtol=0, atol=0)
    assert outs[1].metadata["lorax.source_model"] == "v1-5-pruned-emaonly.ckpt"


def test_a_pickle_checkpoint_is_memory_mapped_not_read_whole(old_ckpt, models):
    """Opening the .ckpt reads none of its tensors; one weight costs one weight's pages."""
    import psutil

    from lorax_engine.files.base_weights import CheckpointWeights

    process = psutil.Process()
    before = process.memory_info().rss
    with CheckpointWeights(old_ckpt) as weights:
        opened = process.memory_info().rss - before
        key = bad.GOOD_KEYS[0]
        with CheckpointWeights(models[0]) as twin:
            torch.testing.assert_close(weights.matrix(key), twin.matrix(key), rtol=0, atol=0)
            assert weights.architecture == twin.architecture == "sd1"
            assert weights.keys() == twin.keys()
    size = os.path.getsize(old_ckpt)
    assert size > 200 * 2**20 and opened < 0.05 * size, (opened, size)
