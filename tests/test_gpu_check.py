"""``make gpu-check ARGS=--dry-run`` passes every step: where no GPU is lent it is the only run of
scripts/gpu_check.sh (the carried .gpu folder, its wheels, ComfyUI's import from the pruned tree, the cuda tests'
collection, the profile of a cold transfer), so it must not break unseen before a session that has a device.
Needs the test runtime (`make setup`) and PyPI for gpu_prepare.sh's wheels, as `make gpu-prepare` does."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS = ("environment", "wheels", "comfyui", "zoo", "cuda_tests", "profile")


@pytest.mark.slow
def test_the_gpu_checks_dry_run_passes_every_step(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "GPU_CHECK_SITE": str(tmp_path / "site")}
    prepare = subprocess.run(["bash", "scripts/gpu_prepare.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
    assert prepare.returncode == 0, prepare.stdout[-3000:] + prepare.stderr[-3000:]
    assert 'run(command="bash scripts/gpu_check.sh", carry=[".gpu"]' in prepare.stdout
    check = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=900)
    steps_log = (tmp_path / "out" / "steps.log").read_text()
    assert check.returncode == 0, check.stdout[-3000:] + steps_log[-5000:]
    summary = dict(line.split(": ", 1) for line in (tmp_path / "out" / "summary.txt").read_text().splitlines())
    for step in STEPS:
        assert summary.get(step, "missing").startswith("ok in "), (step, summary)
    # the cuda tests were collected (and skipped here), not missing
    assert re.search(r"^\d+ skipped in ", steps_log, re.MULTILINE), steps_log[-3000:]
    # the profile is of a transfer that ran through the engine
    profile = (tmp_path / "out" / "profile_defaults.txt").read_text()
    assert "lorax_engine" in profile and "compute_basis" in profile
