#!/usr/bin/env bash
# make gpu-check: the checks that need a CUDA GPU, for the lent GPU machine (run through the device tool with
# .gpu carried: `make gpu-prepare` builds it and prints the call). Each step logs to $OUT/<step>.log and adds a
# line to $OUT/summary.txt, also when an earlier step failed; the whole run stays within $GPU_CHECK_BUDGET
# seconds (default 540, under the tool's 600 s per command). Exit status: 0 when every step passed.
#
#   scripts/gpu_check.sh            the GPU run: wheels, ComfyUI link, zoo, cuda tests (also --lowvram), bench
#   scripts/gpu_check.sh --dry-run  what a CPU machine can check of it: the carried folder, the wheels, ComfyUI's
#                                   import from the pruned tree, the cuda tests' collection (they skip); no bench
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
    "") ;;
    --dry-run) DRY=1 ;;
    *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
OUT="${OUT:-out/gpu-check}"
PY="${PYTHON:-python3}"
[[ $PY == */* && $PY != /* ]] && PY="$PWD/$PY"      # steps change folder
SITE="${GPU_CHECK_SITE:-/tmp/lorax-gpu-site}"
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-540}))
mkdir -p "$OUT"
: >"$OUT/summary.txt"
failed=0

# step NAME SECONDS COMMAND...: run with a timeout (never past the deadline), log, record, carry on
step() {
    local name=$1 limit=$2 rc=0 t0=$SECONDS
    shift 2
    local left=$((DEADLINE - SECONDS))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "$name: not run (time budget spent)" | tee -a "$OUT/summary.txt"
        failed=1
        return 0
    fi
    echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
    timeout --kill-after=10 "$limit" bash -c 'set -euo pipefail; "$@"' "$name" "$@" >>"$OUT/$name.log" 2>&1 || rc=$?
    local verdict=ok
    if ((rc == 124 || rc == 137)); then verdict="TIMED OUT"; elif ((rc != 0)); then verdict="FAILED (rc $rc)"; fi
    ((rc == 0)) || failed=1
    echo "$name: $verdict in $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
}

environment() {
    command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "no nvidia-smi"
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
EOF
}

install_wheels() {
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .gpu/wheels/*.whl
    ls "$SITE"
}

# the carried tree imports; it goes where the tests look for ComfyUI (tests/comfy_harness.py) unless one is there
link_comfyui() {
    (cd .gpu/comfyui && "$PY" -c "import torch; from comfy.cli_args import args; args.cpu = not torch.cuda.is_available()
import nodes, comfy.sd, comfy.model_management as mm; print('ComfyUI imports:', nodes.__file__, mm.get_torch_device())")
    if [[ ! -f .runtime/comfyui/main.py ]]; then
        mkdir -p .runtime
        ln -sfn ../.gpu/comfyui .runtime/comfyui
    fi
}

bench() {
    "$PY" bench/run_bench.py --device cuda --skip step,trained --no-record --work /tmp/lorax-bench
}

[[ -d .gpu/comfyui && -d .gpu/wheels ]] || { echo "gpu-check: .gpu is missing: run 'make gpu-prepare' here and carry .gpu" \
                                             | tee -a "$OUT/summary.txt" >&2; exit 1; }
export PY SITE PYTHONUNBUFFERED=1 PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export -f environment install_wheels link_comfyui bench      # step runs each under timeout, in a child bash
step environment 60 environment
step wheels 120 install_wheels
step comfyui 120 link_comfyui
if ((DRY)); then
    step zoo 300 "$PY" -m lorax_zoo build tiny_sd15 tiny_sdxl
    step cuda_tests 300 "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider
else
    step zoo 240 "$PY" -m lorax_zoo build tiny_sd15 tiny_sdxl demo_sdxl sd15 sdxl
    step cuda_tests 240 "$PY" -m pytest -m cuda tests/test_cuda.py -v -p no:cacheprovider
    step cuda_lowvram 150 env LORAX_TEST_LOWVRAM=1 "$PY" -m pytest -m cuda tests/test_cuda.py -v -p no:cacheprovider \
        -k workflow
    step bench 330 bench
    # the bench's result: its last line, with the GPU's name under machine.gpu
    tail -n 1 "$OUT/bench.log" | grep '^{' >"$OUT/bench.json" || echo "bench: no JSON line" >>"$OUT/summary.txt"
fi
echo "bench phases step, trained: skipped (trained_accuracy computes on the CPU: it takes no device)" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
exit "$failed"
