"""Faults on the command line and in the engine's caches: Ctrl-C mid-transfer and mid-write, failing writes
(disk full, permission denied), corrupted cache entries, a batch over good and bad files, and two processes
sharing one cache directory. After each: no partial output, no temporary files, the previous file of that
name untouched, and the next run equal to an undisturbed one.

The UI side of cancelling (POST /interrupt) and of concurrent prompts is in test_reliability_server.py.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import bad_inputs as bad
import pytest
import safetensors.torch
import torch
from comfy_harness import REPO_ROOT
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import lorax_zoo
from lorax_engine.cli import main
from lorax_engine.files.lora_formats import read_lora
from lorax_engine.files.safetensors_file import SafetensorsFile

# one layer of SD1.5's first attention stage: its 26 candidates in the tiny SDXL keep every run short
KEYS = bad.GOOD_KEYS[:1]
PREVIOUS = b"the previous file of this name"


def _lora(path, seed=0) -> Path:
    return bad.lf.save(bad.good_state_dict(seed=seed, keys=KEYS), path)


@pytest.fixture(scope="module")
def models(zoo):
    return str(zoo.checkpoint(bad.SOURCE_MODEL)), str(zoo.checkpoint(bad.TARGET_MODEL))


def _args(models, lora, out, cache=None, *extra):
    cache_args = ["--cache-dir", str(cache)] if cache is not None else ["--no-cache"]
    return ["transfer", "--source-model", models[0], "--target-model", models[1], "--lora", str(lora),
            "--out", str(out), "--rank", "8", "--threshold", "off", "--quiet", *cache_args, *extra]


def _cli(capsys, args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    return _lora(tmp_path_factory.mktemp("lora") / "style.safetensors")


@pytest.fixture(scope="module")
def reference(models, lora_file, tmp_path_factory):
    """The undisturbed result: a run without any cache."""
    out = tmp_path_factory.mktemp("reference") / "style_sdxl.safetensors"
    assert main(_args(models, lora_file, out)) == 0
    return load_file(str(out))


@pytest.fixture(scope="module")
def warm_cache(models, lora_file, tmp_path_factory):
    """A cache directory holding every basis, pair score and digest memo the transfer needs."""
    cache = tmp_path_factory.mktemp("warm") / "cache"
    assert main(_args(models, lora_file, cache.parent / "out.safetensors", cache)) == 0
    assert {p.name for p in cache.iterdir()} == {"bases", "pairs", "fingerprints"}
    return cache


def assert_same_tensors(path, reference):
    got = load_file(str(path))
    assert sorted(got) == sorted(reference) and got
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=0, atol=0, msg=key)


def temp_files(folder) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.name.endswith(".tmp"))


def assert_cache_entries_valid(cache):
    for entry in (Path(cache) / "bases").rglob("*.safetensors"):
        with SafetensorsFile(entry) as f:
            assert f.metadata["lorax.cache_key"].startswith("lorax-subspace-")
            assert all(torch.isfinite(f.get(k)).all() for k in f.keys())


# --- Ctrl-C ----------------------------------------------------------------------------------------------

def test_ctrl_c_mid_transfer(models, tmp_path, capsys):
    """A real SIGINT to a real process once the first basis is cached, while most of the work remains: a LoRA
    over every SD1.5 layer, so hundreds of bases follow the first (the one-layer LoRA of the other tests is
    done within milliseconds of its first basis)."""
    lora = lorax_zoo.make_sd15_lora(tmp_path / "full.safetensors", rank=4, seed=3, cover="full")
    expected = tmp_path / "expected.safetensors"
    assert main([str(a) for a in _args(models, lora, expected)]) == 0      # undisturbed, without a cache
    capsys.readouterr()
    cache, out = tmp_path / "cache", tmp_path / "out" / "style_sdxl.safetensors"
    out.parent.mkdir()
    args = _args(models, lora, out, cache)
    # default SIGINT handling in the child: a suite started as a background job (`make test &`, nohup) passes
    # SIGINT down as ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "lorax_engine", *map(str, args)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not list((cache / "bases").rglob("*.safetensors")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no cache entry was written"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr == "error: interrupted\n" and stdout == ""
    assert list(out.parent.iterdir()) == []
    assert temp_files(tmp_path) == []
    assert_cache_entries_valid(cache)
    left = len(list((cache / "bases").rglob("*.safetensors")))
    # the next run finishes from the cache it left, with the undisturbed result
    code, _, err = _cli(capsys, args)
    assert code == 0, err
    assert_same_tensors(out, load_file(str(expected)))
    assert left < len(list((cache / "bases").rglob("*.safetensors")))     # it was stopped mid-way


# where a Ctrl-C can land while files are written: (folder of the file, the operation it interrupts)
WRITES = {
    "output LoRA, while writing": ("out", "save_file"),
    "output LoRA, before the rename": ("out", "replace"),
    "cache entry, while writing": ("bases", "save_file"),
    "cache entry, before the rename": ("bases", "replace"),
    "similarity store, before the rename": ("pairs", "replace"),
    "digest memo, before the rename": ("fingerprints", "replace"),
}


def _inject(monkeypatch, folder_name: str, operation: str, exc: BaseException):
    """Raise ``exc`` when ``operation`` touches a file in a folder named ``folder_name`` (after writing some
    bytes, for save_file): what Ctrl-C or a full disk does at that moment."""
    real_save, real_replace = safetensors.torch.save_file, os.replace

    def hit(path) -> bool:
        return Path(path).parent.name == folder_name or Path(path).parent.parent.name == folder_name

    def save_file_(tensors, filename, metadata=None):
        if hit(filename):
            Path(filename).write_bytes(b"partial bytes")
            raise exc
        return real_save(tensors, filename, metadata=metadata)

    def replace_(src, dst, **kw):
        if hit(dst) and Path(src).name.endswith(".tmp"):
            raise exc
        return real_replace(src, dst, **kw)

    if operation == "save_file":
        monkeypatch.setattr(safetensors.torch, "save_file", save_file_)
    else:
        monkeypatch.setattr(os, "replace", replace_)


@pytest.mark.parametrize("where", WRITES)
def test_ctrl_c_while_writing(models, lora_file, reference, warm_cache, tmp_path, capsys, monkeypatch, where):
    folder_name, operation = WRITES[where]
    cache = tmp_path / "cache"
    # the file being written is new work: everything else comes from the warm cache
    shutil.copytree(warm_cache, cache, ignore=shutil.ignore_patterns(folder_name))
    out = tmp_path / "out" / "style_sdxl.safetensors"
    out.parent.mkdir()
    out.write_bytes(PREVIOUS)
    with monkeypatch.context() as patch:
        _inject(patch, folder_name, operation, KeyboardInterrupt())
        code, stdout, err = _cli(capsys, _args(models, lora_file, out, cache))
    assert (code, stdout, err) == (130, "", "error: interrupted\n")
    assert out.read_bytes() == PREVIOUS
    assert temp_files(tmp_path) == []
    assert_cache_entries_valid(cache)
    code, _, err = _cli(capsys, _args(models, lora_file, out, cache))
    assert code == 0, err
    assert_same_tensors(out, reference)


# --- failing writes ------------------------------------------------------------------------------------

# what safetensors' own writer raises when the disk fills up mid-write (seen on this VM's full disk)
SAFETENSORS_DISK_FULL = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("error, reason", [
    *((OSError(e, os.strerror(e)), os.strerror(e)) for e in (errno.ENOSPC, errno.EACCES, errno.EROFS)),
    (SAFETENSORS_DISK_FULL, "No space left on device (os error 28)")])
def test_failing_output_write_is_one_clear_error(models, lora_file, warm_cache, tmp_path, capsys, monkeypatch,
                                                 error, reason):
    out = tmp_path / "out" / "style_sdxl.safetensors"
    out.parent.mkdir()
    out.write_bytes(PREVIOUS)
    _inject(monkeypatch, "out", "save_file", error)
    code, stdout, err = _cli(capsys, _args(models, lora_file, out, warm_cache))
    assert code == 2 and stdout == ""
    assert err == f"error: {out}: cannot be written ({reason})\n"
    assert out.read_bytes() == PREVIOUS
    assert sorted(out.parent.iterdir()) == [out] and temp_files(tmp_path) == []


@pytest.mark.parametrize("folder_name, error", [
    ("bases", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))), ("bases", SAFETENSORS_DISK_FULL),
    ("pairs", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
    ("fingerprints", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))])
def test_a_full_cache_disk_costs_speed_never_the_result(models, lora_file, reference, tmp_path, capsys,
                                                        monkeypatch, folder_name, error):
    cache = tmp_path / "cache"
    out = tmp_path / "style_sdxl.safetensors"
    operation = "save_file" if folder_name == "bases" else "replace"
    _inject(monkeypatch, folder_name, operation, error)
    code, _, err = _cli(capsys, _args(models, lora_file, out, cache))
    assert code == 0 and err == ""
    assert_same_tensors(out, reference)
    assert temp_files(tmp_path) == []


def test_save_node_reports_a_full_disk(comfy, tmp_path, monkeypatch, reference):
    """The Save node in-process (what the UI shows): the message, no file, no temporary file."""
    import comfy_harness

    pack = comfy_harness.load_pack()
    monkeypatch.setattr(comfy.folder_paths, "output_directory", str(tmp_path))
    projected = bad.lf.save(reference, tmp_path / "projected.safetensors")
    lora = read_lora(projected)
    _inject(monkeypatch, "loras", "save_file", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    node = pack.NODE_CLASS_MAPPINGS["LoRAX_SaveLoRA"]()
    with pytest.raises(Exception) as info:
        node.save(projected_lora=lora, filename_prefix="loras/full_disk", save_to="output")
    assert type(info.value).__name__ == "NodeError"
    folder = tmp_path / "loras"
    assert str(info.value) == "output/loras/full_disk_00001_.safetensors: cannot be written (No space left on device)"
    assert list(folder.iterdir()) == []


# --- corrupted cache entries ----------------------------------------------------------------------------

def _load_entries(cache):
    out = []
    for entry in sorted((cache / "bases").rglob("*.safetensors")):
        with SafetensorsFile(entry) as f:
            out.append((entry, {k: f.get(k).clone() for k in f.keys()}, dict(f.metadata)))
    return out


def _flip_signs(cache):
    """One entry of each basis negated: still unit columns, finite, the right shapes; only the content is wrong."""
    for entry, tensors, meta in _load_entries(cache):
        tensors["u" if "u" in tensors else "v"][0, 0] *= -1
        save_file(tensors, str(entry), metadata=meta)


def _swap_contents(cache):
    """Every entry given the tensors of another weight's entry of the same shapes (its own metadata kept)."""
    groups = {}
    for item in _load_entries(cache):
        groups.setdefault(tuple((k, tuple(t.shape)) for k, t in sorted(item[1].items())), []).append(item)
    swapped = 0
    for group in (g for g in groups.values() if len(g) > 1):
        for (entry, _, meta), (_, tensors, _) in zip(group, group[1:] + group[:1], strict=True):
            save_file(tensors, str(entry), metadata=meta)
            swapped += 1
    assert swapped > 10


@pytest.mark.parametrize("corruption", ["truncated", "garbage", "flipped sign", "another weight's basis",
                                        "pair scores altered", "pair store garbage"])
def test_corrupted_cache_entries_are_never_used(models, lora_file, reference, warm_cache, tmp_path, capsys,
                                                corruption):
    cache = tmp_path / "cache"
    shutil.copytree(warm_cache, cache)
    entries = sorted((cache / "bases").rglob("*.safetensors"))
    pairs = sorted((cache / "pairs").rglob("*.json"))
    if corruption == "truncated":
        for e in entries:
            e.write_bytes(e.read_bytes()[: e.stat().st_size // 2])
    elif corruption == "garbage":
        for e in entries:
            e.write_bytes(os.urandom(256))
    elif corruption == "flipped sign":
        _flip_signs(cache)
    elif corruption == "another weight's basis":
        _swap_contents(cache)
    elif corruption == "pair scores altered":
        # every stored score claims a perfect match: the "best" target would change if these were believed
        import json
        for p in pairs:
            data = json.loads(p.read_text())
            data["pairs"] = {t: [1.0 if isinstance(x, float) else x for x in row] for t, row in data["pairs"].items()}
            p.write_text(json.dumps(data))
    else:
        for p in pairs:
            p.write_bytes(b"\x00{]")
    out = tmp_path / "style_sdxl.safetensors"
    report = tmp_path / "report.json"
    code, _, err = _cli(capsys, _args(models, lora_file, out, cache, "--report", report))
    assert code == 0, err
    assert_same_tensors(out, reference)
    assert temp_files(tmp_path) == []


# --- batch -----------------------------------------------------------------------------------------------

ODD_NAMES = {"CON.safetensors": "CON_.safetensors", "nul.safetensors": "nul_.safetensors",
             "line\nbreak.safetensors": "line_break.safetensors", "..\\..\\up.safetensors": "up.safetensors",
             "weights_only.pt": "weights_only.safetensors",
             "caf\udce9.safetensors": "caf.safetensors"}       # a Latin-1 file name: byte 0xE9 is not UTF-8


def test_batch_converts_every_good_file_and_lists_every_failure(models, warm_cache, tmp_path, capsys):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for name in ODD_NAMES:
        if name.endswith(".pt"):
            torch.save(bad.good_state_dict(seed=7, keys=KEYS), str(folder / name))
        else:
            _lora(folder / name, seed=len(name))
    failing = {name: case for name, case in bad.LORA_CASES.items()
               if case.stage == "transfer" or name.endswith((".safetensors", ".ckpt", ".pt", ".bin"))}
    for name in failing:
        bad.make(bad.LORA_CASES, name, folder)
    code, stdout, err = _cli(capsys, ["batch", "--source-model", models[0], "--target-model", models[1],
                                      "--lora-dir", folder, "--out-dir", out, "--rank", "8", "--threshold", "off",
                                      "--cache-dir", warm_cache, "--quiet"])
    assert code == 1, err
    assert sorted(p.name for p in out.iterdir()) == sorted(ODD_NAMES.values())
    for name, written in ODD_NAMES.items():
        assert read_lora(out / written).layers, name
    inputs = sorted(p for p in folder.iterdir() if p.is_file() and p.name in failing)
    lines = stdout.splitlines()
    [summary] = [i for i, line in enumerate(lines) if line.startswith("batch: ")]
    skipped = sorted(name for name in failing if "SDXL LoRA" in failing[name].problem)    # nothing to convert
    assert skipped == ["sdxl_lora.safetensors"]
    assert lines[summary].startswith(f"batch: {len(ODD_NAMES)} of {len(ODD_NAMES) + len(inputs)} converted, "
                                     f"{len(skipped)} skipped, {len(inputs) - len(skipped)} failed, ")
    listed = lines[summary + 1:]
    assert len(listed) == len(inputs)
    for path in inputs:
        label = "skipped" if path.name in skipped else "failed"
        [line] = [entry for entry in listed if entry.startswith(f"  {label} {path.name}: ")]
        assert failing[path.name].problem in line, line
        assert not bad.code_marker(path).exists()
    assert temp_files(tmp_path) == []


def test_batch_skips_sdxl_loras_with_the_reason_and_goes_on(models, warm_cache, tmp_path, capsys):
    """A library holds SDXL LoRAs beside SD1.5 ones: each is skipped with one line saying it is already an SDXL
    LoRA (it fits the SD1.5 source in part: SDXL's CLIP-L is SD1.5's), the rest are converted, and a batch with
    nothing failed exits 0."""
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    _lora(folder / "a_sd15.safetensors", seed=1)
    xl = bad.make(bad.LORA_CASES, "sdxl_lora.safetensors", folder)
    _lora(folder / "z_sd15.safetensors", seed=2)
    code, stdout, err = _cli(capsys, ["batch", "--source-model", models[0], "--target-model", models[1],
                                      "--lora-dir", folder, "--out-dir", out, "--rank", "8", "--threshold", "off",
                                      "--cache-dir", warm_cache, "--quiet"])
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a_sd15.safetensors", "z_sd15.safetensors"]
    reason = (f"{xl}: this is already an SDXL LoRA: use Load LoRA (or any SDXL LoRA loader) instead; LoRA-X carries "
              "SD1.5 LoRAs to SDXL")
    lines = stdout.splitlines()
    assert lines[0].startswith("ok     a_sd15.safetensors -> a_sd15.safetensors: ")
    assert lines[1] == f"skipped sdxl_lora.safetensors: {reason}"
    assert lines[2].startswith("ok     z_sd15.safetensors -> z_sd15.safetensors: ")
    assert lines[3].startswith("batch: 2 of 3 converted, 1 skipped, 0 failed, ")
    assert lines[4:] == [f"  skipped sdxl_lora.safetensors: {reason}"]


# --- two processes, one cache ---------------------------------------------------------------------------

def test_two_processes_sharing_one_cache_directory(models, reference, tmp_path):
    cache = tmp_path / "cache"
    loras = [_lora(tmp_path / f"lora{i}.safetensors") for i in range(2)]     # the same LoRA, twice
    outs = [tmp_path / f"out{i}.safetensors" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "lorax_engine", *_args(models, lora, out, cache)],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for lora, out in zip(loras, outs, strict=True)]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (_stdout, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stderr
    for out in outs:
        assert_same_tensors(out, reference)
    assert temp_files(tmp_path) == []
    assert_cache_entries_valid(cache)
