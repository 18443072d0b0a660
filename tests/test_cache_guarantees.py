"""What the subspace cache promises, beyond tests/test_subspaces.py and tests/test_reliability_faults.py:
a rewritten checkpoint (one tensor changed, same size, mtime forged back) never gets an old basis through
the CLI's path (CheckpointWeights + digest memo + disk cache); every input of a basis is part of its key;
an interrupted write leaves nothing behind; processes racing on one cache directory never read a torn entry.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
from comfy_harness import REPO_ROOT
from safetensors.torch import save_file

from lorax_engine.analysis import subspaces
from lorax_engine.analysis.subspaces import SubspaceCache, SubspaceSpec, compute_basis
from lorax_engine.files.base_weights import CheckpointWeights, StateDictWeights
from lorax_zoo import spectral_matrix

KEYS = [f"diffusion_model.input_blocks.{i}.1.proj_in.weight" for i in (1, 2, 4)]
SPEC = SubspaceSpec(12, "exact")


def _matrix(seed, shape=(48, 40)):
    return spectral_matrix(*shape, torch.Generator().manual_seed(seed))


def _checkpoint(path, seeds):
    save_file({f"model.{k}": _matrix(s).half() for k, s in zip(KEYS, seeds, strict=True)}, str(path))
    return path


def _projector(x):
    return x.double() @ x.double().T


def _entries(cache_dir):
    return sorted((cache_dir / "bases").rglob("*.safetensors"))


def _leftovers(folder):
    return sorted(p for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp")


def test_a_rewritten_checkpoint_never_reuses_an_old_basis(tmp_path):
    ckpt, cache_dir = _checkpoint(tmp_path / "model.safetensors", (1, 2, 3)), tmp_path / "cache"

    def bases():
        cache = SubspaceCache(cache_dir)
        with CheckpointWeights(ckpt, fingerprint_dir=cache_dir / "fingerprints") as w:   # as the CLI opens it
            return {k: cache.get(w, k, SPEC) for k in KEYS}, cache.stats

    old, stats = bases()
    assert stats.computed == 3
    size, st = ckpt.stat().st_size, ckpt.stat()
    _checkpoint(ckpt, (1, 99, 3))                                   # one tensor changed, same shapes and dtype
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))            # and the mtime forged back
    assert ckpt.stat().st_size == size and ckpt.stat().st_mtime_ns == st.st_mtime_ns
    new, stats = bases()
    assert (stats.disk_hits, stats.computed) == (2, 1)              # only the changed weight is recomputed
    expected = compute_basis(_matrix(99).half(), SPEC)
    torch.testing.assert_close(_projector(new[KEYS[1]].u), _projector(expected.u), rtol=0, atol=1e-5)
    torch.testing.assert_close(_projector(new[KEYS[1]].v), _projector(expected.v), rtol=0, atol=1e-5)
    assert float((_projector(new[KEYS[1]].u) - _projector(old[KEYS[1]].u)).abs().max()) > 0.1
    for k in (KEYS[0], KEYS[2]):
        assert torch.equal(new[k].u, old[k].u)
    assert len(_entries(cache_dir)) == 4                            # the old entry stays, under its own key


def test_every_input_of_a_basis_is_part_of_its_key(tmp_path, monkeypatch):
    values = _matrix(5, (96, 80)).half().float()     # exactly representable in float16
    variants = [          # sketches first: a spectrum at hand would serve them
        (torch.float16, SubspaceSpec(12, "randomized", oversample=8, power_iters=1, seed=0)),   # a sketch
        (torch.float16, SubspaceSpec(13, "randomized", oversample=8, power_iters=1, seed=0)),   # its rank
        (torch.float16, SubspaceSpec(12, "randomized", oversample=9, power_iters=1, seed=0)),   # sketch size
        (torch.float16, SubspaceSpec(12, "randomized", oversample=8, power_iters=2, seed=0)),   # power iterations
        (torch.float16, SubspaceSpec(12, "randomized", oversample=8, power_iters=1, seed=1)),   # sketch seed
        (torch.float16, SPEC),
        (torch.float32, SPEC),                                       # same values, other stored dtype
        (torch.bfloat16, SPEC),
    ]
    cache = SubspaceCache(tmp_path)
    got = []
    for dtype, spec in variants:
        w = StateDictWeights({KEYS[0]: values.to(dtype)}, architecture="sd1")
        got.append(cache.get(w, KEYS[0], spec))
        assert got[-1].u.shape[1] == spec.effective(96, 80).rank and got[-1].method == spec.effective(96, 80).describe()
    assert cache.stats.computed == len(variants) and len(_entries(tmp_path)) == len(variants)
    # the same bytes stored with another tensor shape (a conv [96, 20, 2, 2], same matrix [96, 80])
    conv = StateDictWeights({KEYS[0]: values.half().reshape(96, 20, 2, 2)}, architecture="sd1")
    cache.get(conv, KEYS[0], SPEC)
    assert cache.stats.computed == len(variants) + 1
    # a spectrum serves every rank and the other spectrum method (one computation), and a sketch wider than the
    # weight is its spectrum (no second copy)
    w16 = StateDictWeights({KEYS[0]: values.half()}, architecture="sd1")
    spectrum16 = got[-3]
    assert cache.get(w16, KEYS[0], SubspaceSpec(40, "exact")) is spectrum16
    assert cache.get(w16, KEYS[0], SubspaceSpec(12, "gram")) is spectrum16
    assert cache.get(w16, KEYS[0], SubspaceSpec(12, "randomized", oversample=80)) is spectrum16
    assert cache.stats.computed == len(variants) + 1
    # a new algorithm version invalidates every entry on disk
    monkeypatch.setattr(subspaces, "ALGORITHM_VERSION", subspaces.ALGORITHM_VERSION + 1)
    fresh = SubspaceCache(tmp_path)
    fresh.get(w16, KEYS[0], SPEC)
    assert (fresh.stats.disk_hits, fresh.stats.computed) == (0, 1)


@pytest.mark.parametrize("when", ["mid-write", "before-rename"])
def test_an_interrupted_cache_write_leaves_no_entry_and_no_temporary_file(tmp_path, monkeypatch, when):
    w = StateDictWeights({KEYS[0]: _matrix(7).half()}, architecture="sd1")
    real_save, real_replace = safetensors.torch.save_file, os.replace

    def torn_save(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:                                # half the bytes are on disk...
            f.truncate(os.path.getsize(path) // 2)
        raise KeyboardInterrupt                                     # ...when the process is interrupted

    def no_replace(src, dst):
        raise KeyboardInterrupt

    if when == "mid-write":
        monkeypatch.setattr(safetensors.torch, "save_file", torn_save)
    else:
        monkeypatch.setattr(subspaces.os, "replace", no_replace)
    with pytest.raises(KeyboardInterrupt):
        SubspaceCache(tmp_path).get(w, KEYS[0], SPEC)
    assert _entries(tmp_path) == [] and _leftovers(tmp_path) == []
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    monkeypatch.setattr(subspaces.os, "replace", real_replace)
    cache = SubspaceCache(tmp_path)
    cache.get(w, KEYS[0], SPEC)
    again = SubspaceCache(tmp_path)
    again.get(w, KEYS[0], SPEC)
    assert cache.stats.computed == 1 and (again.stats.disk_hits, again.stats.discarded) == (1, 0)


_WORKER = textwrap.dedent("""
    import json, random, sys
    import torch
    from lorax_engine.files.base_weights import StateDictWeights
    from lorax_engine.analysis.subspaces import SubspaceCache, SubspaceSpec
    from lorax_zoo import spectral_matrix
    keys = [f"diffusion_model.input_blocks.{i}.1.proj_in.weight" for i in range(6)]
    w = StateDictWeights({k: spectral_matrix(64, 56, torch.Generator().manual_seed(i)).half()
                          for i, k in enumerate(keys)}, architecture="sd1")
    cache = SubspaceCache(sys.argv[1], memory_bytes=0)      # no memory cache: every get reads the disk
    order = keys * 15
    random.Random(int(sys.argv[2])).shuffle(order)
    out = {}
    for k in order:
        b = cache.get(w, k, SubspaceSpec(20, "exact"))
        out[k] = (b.u.double() @ b.u.double().T).sum().item()
    print(json.dumps({"stats": cache.stats.as_dict(), "sums": out}))
""")


def test_processes_racing_on_one_cache_directory_never_read_a_torn_entry(tmp_path):
    import json
    cache_dir = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(cache_dir), str(seed)], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in range(4)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        results.append(json.loads(stdout))
    for r in results:
        assert r["stats"]["discarded"] == 0                   # no reader ever saw a partial or foreign entry
        assert r["stats"]["computed"] + r["stats"]["disk_hits"] == 90
        assert r["sums"] == results[0]["sums"]               # every process got the same bases
    assert len(_entries(cache_dir)) == 6 and _leftovers(cache_dir) == []
    check = SubspaceCache(cache_dir)
    w = StateDictWeights({KEYS[0]: spectral_matrix(64, 56, torch.Generator().manual_seed(0)).half()},
                         architecture="sd1")
    check.get(w, KEYS[0], SubspaceSpec(20, "exact"))
    assert (check.stats.disk_hits, check.stats.discarded) == (1, 0)


def test_cache_command_reports_and_clears_only_its_own_folders(tmp_path, capsys):
    from lorax_engine.cli import main
    cache_dir = tmp_path / "cache"
    SubspaceCache(cache_dir).get(StateDictWeights({KEYS[0]: _matrix(3).half()}, architecture="sd1"), KEYS[0], SPEC)
    (cache_dir / "notes.txt").write_text("the user's own file")
    size = sum(f.stat().st_size for f in _entries(cache_dir))
    assert main(["cache", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert str(cache_dir) in out and f"{size / 2**20:9.1f} MiB" in out
    assert [line.split()[:2] for line in out.splitlines() if line.strip().startswith("bases")] == [["bases", "1"]]
    assert main(["cache", "--cache-dir", str(cache_dir), "--clear"]) == 0
    assert "cleared" in capsys.readouterr().out
    assert _entries(cache_dir) == [] and (cache_dir / "notes.txt").read_text() == "the user's own file"
    fresh = SubspaceCache(cache_dir)
    fresh.get(StateDictWeights({KEYS[0]: _matrix(3).half()}, architecture="sd1"), KEYS[0], SPEC)
    assert fresh.stats.computed == 1
