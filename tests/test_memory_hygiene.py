"""The disk cache's size bound (lorax_engine/analysis/disk_budget.py): least recently used bases go first, on
real files; reading a basis marks it used; the ``cache`` command shows the bound and evicts on request."""
from __future__ import annotations

import os

import pytest
import torch

from lorax_engine.analysis.disk_budget import bases_bytes, evict_to, parse_size
from lorax_engine.analysis.subspaces import SubspaceCache, SubspaceSpec
from lorax_engine.cli import main
from lorax_engine.files.base_weights import StateDictWeights


def _entry(directory, name, size, mtime):
    path = directory / "bases" / name[:2] / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    os.utime(path, (mtime, mtime))
    return path


def test_eviction_removes_the_least_recently_used_until_the_bound(tmp_path):
    paths = [_entry(tmp_path, f"{i:02d}entry", 1000, 1_000_000 + 10 * i) for i in range(6)]
    temp = paths[0].parent / ".00entry.safetensors.123.tmp"       # a write in progress is never touched
    temp.write_bytes(b"\0" * 5000)
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "p.json").write_text("{}")
    assert bases_bytes(tmp_path) == 6000
    assert evict_to(tmp_path, 3500) == (3, 3000)
    assert [p.exists() for p in paths] == [False, False, False, True, True, True]
    assert temp.exists() and (tmp_path / "pairs" / "p.json").exists()
    assert evict_to(tmp_path, 3000) == (0, 0)
    assert evict_to(tmp_path, 0) == (3, 3000) and bases_bytes(tmp_path) == 0


def test_reading_a_basis_marks_it_recently_used(tmp_path):
    g = torch.Generator().manual_seed(0)
    weights = StateDictWeights({f"w{i}": torch.randn(48, 40, generator=g) for i in range(3)}, architecture="x")
    spec = SubspaceSpec(8, "exact")
    SubspaceCache(tmp_path).get(weights, "w0", spec)
    SubspaceCache(tmp_path).get(weights, "w1", spec)
    SubspaceCache(tmp_path).get(weights, "w2", spec)
    files = sorted((tmp_path / "bases").rglob("*.safetensors"))
    for i, f in enumerate(files):
        os.utime(f, (1_000_000 + i, 1_000_000 + i))
    oldest = files[0]
    reader = SubspaceCache(tmp_path)
    for key in ("w0", "w1", "w2"):
        reader.get(weights, key, spec)
    assert reader.stats.disk_hits == 3
    assert all(f.stat().st_mtime > 2_000_000 for f in files)         # every read touched its entry
    one = oldest.stat().st_size
    os.utime(files[1], (1_000_000, 1_000_000))                       # now files[1] is the least recently used
    evict_to(tmp_path, bases_bytes(tmp_path) - one)
    assert oldest.exists() and not files[1].exists()


@pytest.mark.parametrize("text,expected", [("10GB", 10 * 2**30), ("500 MB", 500 * 2**20), ("0", 0),
                                           ("1.5g", int(1.5 * 2**30)), ("2048", 2048)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_cache_command_shows_the_bound_and_evicts(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORAX_DISK_CACHE_GB", "2")
    for i in range(4):
        _entry(tmp_path, f"{i:02d}entry", 2**20, 1_000_000 + i)
    assert main(["cache", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bound on bases: 2 GiB ($LORAX_DISK_CACHE_GB)" in out and "4 files" in out
    assert main(["cache", "--cache-dir", str(tmp_path), "--evict-to", "2MB"]) == 0
    assert "evicted 2 least recently used bases (2.0 MiB)" in capsys.readouterr().out
    assert bases_bytes(tmp_path) == 2 * 2**20
    with pytest.raises(SystemExit):
        main(["cache", "--cache-dir", str(tmp_path), "--evict-to", "lots"])
    monkeypatch.setenv("LORAX_DISK_CACHE_GB", "-1")
    assert main(["cache", "--cache-dir", str(tmp_path)]) == 2
    assert "LORAX_DISK_CACHE_GB must be a number >= 0" in capsys.readouterr().err
