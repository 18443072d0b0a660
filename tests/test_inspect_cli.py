"""``python -m lorax_engine inspect`` run as a real subprocess, in text and JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lora_factory as lf
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TAGS = {"10_lrxstyle": {"lrxstyle": 24, "watercolor": 7}, "5_extra": {"watercolor": 3, "1girl": 12, " ink ": 1}}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lorax_engine", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    factors = lf.random_factors("sdxl", rank=4, alpha=2.0)
    factors.update(lf.random_factors("sdxl", rank=8, alpha=8.0, targets=[
        "diffusion_model.output_blocks.1.1.transformer_blocks.5.attn2.to_v.weight"]))
    path = tmp_path_factory.mktemp("inspect") / "style.safetensors"
    return lf.save(lf.lora_state_dict(factors, "sdxl", "kohya_diffusers", dtype=torch.bfloat16),
                   path, {"ss_tag_frequency": json.dumps(TAGS), "ss_output_name": "style", "long": "x" * 1000})


def test_json_report(sdxl_file):
    proc = _cli("inspect", str(sdxl_file), "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["file"] == str(sdxl_file) and r["bytes"] == sdxl_file.stat().st_size
    assert r["format"] == "kohya-locon"
    assert r["architecture"] == "sdxl" and "2048-wide" in r["evidence"]
    assert (r["layers"], r["unet_layers"], r["text_encoder_layers"]) == (10, 8, 2)
    assert r["ranks"] == {"min": 4, "max": 8, "histogram": {"4": 9, "8": 1}}
    assert r["alphas"] == {"2": 9, "8": 1}
    assert r["dtypes"] == ["bfloat16"]
    # counts summed over the training folders, most frequent first
    assert r["trigger_words"] == [{"tag": "lrxstyle", "count": 24}, {"tag": "1girl", "count": 12},
                                  {"tag": "watercolor", "count": 10}, {"tag": "ink", "count": 1}]
    assert r["metadata"]["long"].startswith("x" * 160) and r["metadata"]["long"].endswith("(1000 chars)")
    stages = {(s["section"], s.get("level"), s.get("channels"), s.get("name")): (s.get("blocks"), s["layers"])
              for s in r["stages"]}
    assert stages == {
        ("input_blocks", 0, 320, None): ([1], 1),
        ("input_blocks", 1, 640, None): ([4], 2),
        ("input_blocks", 2, 1280, None): ([7], 1),
        ("middle_block", None, 1280, None): ([], 1),
        ("output_blocks", 2, 1280, None): ([0, 1, 2], 3),
        ("text encoder", None, None, "CLIP-L (clip_l)"): ([], 1),
        ("text encoder", None, None, "OpenCLIP-G (clip_g)"): ([], 1),
    }


def test_text_report(sdxl_file):
    proc = _cli("inspect", str(sdxl_file))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "format:        kohya-locon" in out
    assert "architecture:  sdxl — cross-attention to_k/to_v read a 2048-wide context" in out
    assert "layers:        10 (UNet 8, text encoders 2)" in out
    assert "ranks:         4 ×9, 8 ×1  (min 4, max 8)" in out
    assert "trigger words: lrxstyle (24), 1girl (12), watercolor (10), ink (1)" in out
    lines = out.splitlines()
    assert any(line.split()[:4] == ["output_blocks", "level", "2", "(1280"] and line.split()[-1] == "3"
               for line in lines)
    assert "  ss_output_name: style" in lines


def test_loha_report_mentions_refactorisation(tmp_path):
    sd, _ = lf.loha_state_dict("sd1", ["clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"])
    proc = _cli("inspect", str(lf.save(sd, tmp_path / "loha.safetensors")), "--json")
    r = json.loads(proc.stdout)
    assert r["format"] == "lycoris-loha" and r["architecture"] == "sd1"
    assert "single 768-wide text encoder" in r["evidence"]
    assert any("re-factorised by truncated SVD" in n for n in r["notes"])
    assert r["trigger_words"] == []


@pytest.mark.parametrize("make, problem", [
    (lambda p: p, "file not found"),
    (lambda p: (p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}"), p)[1], "truncated"),
    (lambda p: lf.save({"model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3)}, p),
     "holds no LoRA weights"),
])
def test_errors_are_one_line_with_exit_status_2(tmp_path, make, problem):
    path = make(tmp_path / "bad.safetensors")
    proc = _cli("inspect", str(path), *(["--json"] if problem == "truncated" else []))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {path}: ")
    assert problem in proc.stderr and "Traceback" not in proc.stderr


def test_usage():
    assert "inspect" in _cli("--help").stdout
    proc = _cli()
    assert proc.returncode == 2 and "COMMAND" in proc.stderr
