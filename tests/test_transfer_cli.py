"""``python -m lorax_engine transfer | similarity | batch`` on real files (zoo checkpoints, LoRAs on disk)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import lora_factory
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lorax_engine.analysis.subspaces import SubspaceCache
from lorax_engine.cli import main
from lorax_engine.files.base_weights import CheckpointWeights
from lorax_engine.files.lora_formats import read_lora
from lorax_engine.projection.operators import DEFAULT_MODE
from lorax_engine.projection.transfer import TransferOptions, transfer

KEYS = [
    "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
    "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_v.weight",
    "diffusion_model.input_blocks.4.1.proj_out.weight",
    "clip_l.transformer.text_model.encoder.layers.2.self_attn.out_proj.weight",
]
TAGS = json.dumps({"5_lrxstyle": {"lrxstyle": 9}})


def _write_lora(path, seed=0, arch="sd1", keys=KEYS):
    factors = lora_factory.random_factors(arch, rank=4, seed=seed, alpha=2.0, targets=keys)
    save_file(lora_factory.lora_state_dict(factors, arch, "kohya_diffusers" if arch == "sd1" else "kohya"),
              str(path), metadata={"ss_tag_frequency": TAGS, "ss_base_model_version": "sd_v1"})
    return path


@pytest.fixture(scope="module")
def sd15_path(zoo):
    return str(zoo.checkpoint("sd15"))


@pytest.fixture(scope="module")
def finetune_path(zoo):
    return str(zoo.checkpoint("sd15_finetune"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lorax_cache")


def test_transfer_writes_lora_report_and_plot_and_reuses_the_cache(sd15_path, finetune_path, cache_dir, tmp_path,
                                                                   capsys):
    lora_path = _write_lora(tmp_path / "style.safetensors")
    out, report, plot = tmp_path / "out.safetensors", tmp_path / "r.json", tmp_path / "p.png"
    args = ["transfer", "--source-model", sd15_path, "--target-model", finetune_path, "--lora", str(lora_path),
            "--out", str(out), "--report", str(report), "--plot", str(plot), "--cache-dir", str(cache_dir),
            "--exact", "--quiet"]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out}" in stdout and "4/4 layers applied" in stdout

    # the file holds what the engine computes in-process (fp16 on disk)
    lora = read_lora(lora_path)
    with CheckpointWeights(sd15_path) as w, CheckpointWeights(finetune_path) as t:
        expected, _ = transfer(lora, w, t, TransferOptions(method="exact"), cache=SubspaceCache(cache_dir))
    written = read_lora(out)
    assert sorted(written.layers) == sorted(expected.layers) == sorted(KEYS)
    for key, layer in expected.layers.items():
        torch.testing.assert_close(written.layers[key].delta(), layer.to(dtype=torch.float16).delta(),
                                   rtol=1e-3, atol=1e-6)
    meta = written.metadata
    assert meta["ss_tag_frequency"] == TAGS and meta["ss_base_model_version"] == "sd_v1"
    assert meta["lorax.layers_applied"] == "4" and meta["lorax.mode"] == DEFAULT_MODE
    # provenance users can check: the files read with their sha256, and the written file's own hashes
    assert meta["lorax.source_lora"] == "style.safetensors"
    assert meta["lorax.source_model"] == os.path.basename(sd15_path)
    assert meta["lorax.target_model"] == os.path.basename(finetune_path)
    assert meta["lorax.source_lora_sha256"] == hashlib.sha256(lora_path.read_bytes()).hexdigest()
    data_bytes = out.read_bytes()
    tensor_data = data_bytes[8 + int.from_bytes(data_bytes[:8], "little"):]
    assert meta["sshs_model_hash"] == hashlib.sha256(tensor_data).hexdigest()
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]
    assert json.loads(meta["lorax.options"])["method"] == "exact"
    assert json.loads(meta["lorax.summary"])["applied"] == 4
    assert main(["inspect", "--json", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)["metadata"]
    assert shown["lorax.source_lora_sha256"] == meta["lorax.source_lora_sha256"]
    assert shown["sshs_model_hash"] == meta["sshs_model_hash"]

    data = json.loads(report.read_text())
    assert data["options"]["method"] == "exact"
    assert data["provenance"]["lorax.source_model_sha256"] == meta["lorax.source_model_sha256"]
    assert data["summary"]["applied"] == 4 and len(data["layers"]) == 4
    assert {t["target_key"] for t in data["targets"]} == set(KEYS)
    # the fine-tune's every weight moved: each applied pair scored exactly on spectra of both weights
    assert data["work"]["scored_exactly"] >= 4 and data["work"]["identical_by_value"] == 0
    assert data["cache"]["similarity"]["computed"] + data["cache"]["projection"]["computed"] >= 8
    img = Image.open(plot)
    assert img.format == "PNG" and img.size[0] >= 480

    # second run: every basis and similarity comes from the disk cache
    assert main(args) == 0
    again = json.loads(report.read_text())
    assert again["cache"]["similarity"]["computed"] == 0 and again["cache"]["projection"]["computed"] == 0
    assert again["cache"]["projection"]["disk_hits"] + again["cache"]["projection"]["memory_hits"] >= 8
    assert again["work"] == data["work"]
    # what the report says of the applied pairs does not depend on what the cache held
    applied = [{(layer["source_key"], c["target_key"]): (c["similarity"], c["energy_in_target"], c["energy_kept"])
                for layer in run["layers"] for c in layer["candidates"] if c["applied"]} for run in (data, again)]
    assert applied[0] == applied[1] and len(applied[0]) == 4
    assert all(energy is not None and 0 < energy <= 1 for _, energy, _ in applied[0].values())


def test_similarity_command_writes_map_and_plot(sd15_path, cache_dir, tmp_path, capsys):
    lora_path = _write_lora(tmp_path / "style.safetensors")
    report, plot = tmp_path / "map.json", tmp_path / "map.png"
    assert main(["similarity", "--source-model", sd15_path, "--target-model", sd15_path, "--lora", str(lora_path),
                 "--report", str(report), "--plot", str(plot), "--cache-dir", str(cache_dir), "--quiet"]) == 0
    assert "4 source layers, 4 with candidates; best score >= threshold 0.05: 4" in capsys.readouterr().out
    data = json.loads(report.read_text())
    order = [layer["source_key"] for layer in data["layers"]]
    assert sorted(order) == sorted(KEYS) and order[0].startswith("clip_l.")     # text encoder first
    for layer in data["layers"]:
        own = [c for c in layer["candidates"] if c["target_key"] == layer["source_key"]]
        assert own and own[0]["similarity"]["score"] == pytest.approx(1.0, abs=1e-6)
    assert Image.open(plot).format == "PNG"


def test_batch_carries_on_past_bad_files_and_reports_failures(sd15_path, cache_dir, tmp_path, capsys):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    _write_lora(folder / "a.safetensors", seed=1)
    _write_lora(folder / "b.safetensors", seed=2)
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    _write_lora(folder / "xl.safetensors", arch="sdxl",
                keys=["diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"])
    (folder / "notes.txt").write_text("ignored")
    code = main(["batch", "--source-model", sd15_path, "--target-model", sd15_path, "--lora-dir", str(folder),
                 "--out-dir", str(out), "--report-dir", str(tmp_path / "reports"), "--cache-dir", str(cache_dir),
                 "--exact"])
    captured = capsys.readouterr()
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.safetensors", "b.safetensors"]
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["a.json", "b.json"]
    assert "batch: 2 of 4 converted, 1 skipped, 1 failed" in captured.out
    assert "FAILED broken.safetensors:" in captured.out
    assert (f"skipped xl.safetensors: {folder / 'xl.safetensors'} is an SDXL LoRA, but the source model "
            f"{os.path.basename(sd15_path)} is SD1.5: pick the SDXL checkpoint it was trained on\n") in captured.out
    assert "[2/4] b.safetensors [" in captured.err and "100.0%" in captured.err      # progress on stderr
    assert load_file(str(out / "a.safetensors"))      # a real safetensors file


def test_errors_are_one_line_without_traceback(sd15_path, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lorax_engine", "transfer", "--source-model", sd15_path,
                           "--target-model", sd15_path, "--lora", str(tmp_path / "missing.safetensors"),
                           "--out", str(tmp_path / "o.safetensors")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "missing.safetensors" in proc.stderr


def test_the_command_delivers_all_it_says_and_writes_though_it_exits_without_teardown(sd15_path, finetune_path,
                                                                                      tmp_path, capsys):
    """``python -m lorax_engine`` leaves by ``os._exit`` (no interpreter teardown): its piped, block-buffered stdout
    and its files must still arrive whole, with the exit status of ``main``. Both runs are cold (caches of their own),
    so their reports agree."""
    lora_path = _write_lora(tmp_path / "style.safetensors")
    args = ["transfer", "--source-model", sd15_path, "--target-model", finetune_path, "--lora", str(lora_path),
            "--table", "--quiet"]

    def run(name):
        return ["--out", str(tmp_path / f"{name}.safetensors"), "--report", str(tmp_path / f"{name}.json"),
                "--cache-dir", str(tmp_path / f"{name}_cache")]

    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}   # as users run it
    proc = subprocess.run([sys.executable, "-m", "lorax_engine", *args, *run("cli")], capture_output=True, text=True,
                          env=buffered, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert main([*args, *run("in")]) == 0
    in_process = capsys.readouterr().out.replace(str(tmp_path / "in."), str(tmp_path / "cli."))
    timeless = lambda text: re.sub(r"\d+\.\d s\b", "_ s", text)  # noqa: E731
    assert timeless(proc.stdout) == timeless(in_process)
    assert proc.stdout.rstrip().splitlines()[-1].startswith(f"wrote {tmp_path / 'cli.safetensors'}: 4/4 layers")
    assert json.loads((tmp_path / "cli.json").read_text())["layers"] == \
        json.loads((tmp_path / "in.json").read_text())["layers"]
    written, expected = read_lora(tmp_path / "cli.safetensors"), read_lora(tmp_path / "in.safetensors")
    assert sorted(written.layers) == sorted(expected.layers) == sorted(KEYS)
    for key, layer in expected.layers.items():
        torch.testing.assert_close(written.layers[key].delta(), layer.delta(), rtol=0, atol=0)


def test_nothing_to_write_and_bad_options_are_clear_errors(sd15_path, zoo, cache_dir, tmp_path, capsys):
    lora_path = _write_lora(tmp_path / "l.safetensors",
                            keys=["diffusion_model.output_blocks.10.1.transformer_blocks.0.attn1.to_q.weight"])
    base = ["transfer", "--source-model", sd15_path, "--lora", str(lora_path), "--out", str(tmp_path / "o.safetensors"),
            "--cache-dir", str(cache_dir), "--quiet"]
    # SD1.5's 320-channel attention has no SDXL counterpart: nothing to write, said in one line
    assert main(base + ["--target-model", str(zoo.checkpoint("sdxl"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: nothing to write") and "1 no counterpart" in err and err.count("\n") == 1
    assert not (tmp_path / "o.safetensors").exists()
    same = base + ["--target-model", sd15_path]
    report = tmp_path / "r.json"
    assert main(same + ["--mode", "direct", "--threshold", "off", "--report", str(report)]) == 0   # by name
    options = json.loads(report.read_text())["options"]
    assert (options["method"], options["threshold"], options["mode"]) == ("fast", "-inf", "direct")
    assert main(same + ["--rank", "0"]) == 2
    assert "rank must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(same + ["--threshold", "high"])
    assert exc.value.code == 2


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_report_is_replaced_whole_or_not_at_all(sd15_path, cache_dir, tmp_path, monkeypatch, capsys, failure):
    """A failed or interrupted --report write keeps the previous report and leaves no temporary file."""
    lora = _write_lora(tmp_path / "in.safetensors")
    report = tmp_path / "report.json"
    report.write_text('{"previous": true}')
    args = ["transfer", "--lora", str(lora), "--source-model", sd15_path, "--target-model", sd15_path,
            "--out", str(tmp_path / "out.safetensors"), "--report", str(report), "--cache-dir", str(cache_dir),
            "--quiet"]

    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(report):
            raise failure
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    if isinstance(failure, KeyboardInterrupt):
        assert main(args) == 130 and "interrupted" in capsys.readouterr().err
    else:
        assert main(args) == 2 and "report.json: cannot be written" in capsys.readouterr().err
    assert report.read_text() == '{"previous": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "out.safetensors", "report.json"]
