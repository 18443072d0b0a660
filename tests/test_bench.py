"""``make bench ARGS=--quick`` runs every phase end to end (it broke unseen once: the sampling-step phase handed
Load Source LoRA a path outside the loras folders). Figures are not asserted: benchmarks measure, tests check that
they run and report what they must."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_quick_bench_runs_every_phase(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run_bench.py"), "--quick", "--no-record",
                           "--work", str(tmp_path / "bench")], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["runs"]) == {"defaults", "stress"}
    for run in result["runs"].values():
        assert {"cold_s", "warm_s", "batch_marginal_s_per_lora", "cold_peak_rss_gb", "layers_applied",
                "work", "bases_computed"} <= set(run)
    # the shipped defaults on the trained pair: the text encoder on identical weights, found by value
    assert result["runs"]["defaults"]["work"]["identical_by_value"] == 66
    # what a ComfyUI user runs: the one-node loader in ComfyUI, cold and after a restart, then a strength change
    node = result["runs"]["defaults"]
    assert {"node_cold_s", "node_restart_s", "node_again_s", "node_comfy_load_s", "node_peak_rss_gb"} <= set(node)
    assert node["node_again_reused"] and node["node_verdict"].startswith("WEAK: ")
    for phase in ("naive_s", "trained_max_score_err", "continuity", "step_overhead", "sim_max_abs_err"):
        assert phase in result, phase
    assert result["step_outputs_max_abs_diff"] == 0.0 and result["trained_flips"] == 0
    assert result["machine"]["cpu_flags"] is not None
