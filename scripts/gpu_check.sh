#!/usr/bin/env bash
# make gpu-check: the checks that need a CUDA GPU, for the lent GPU machine (run through the device tool with
# .gpu carried: `make gpu-prepare` builds it and prints the call). Each step appends its output to $OUT/steps.log
# and a line to $OUT/summary.txt, also when an earlier step failed; the whole run stays within $GPU_CHECK_BUDGET
# seconds (default 540, under the tool's 600 s per command). Few files, as the device tool returns at most 8:
# summary.txt, steps.log, bench.json (the bench's JSON line), profile_defaults.txt. Exit status: 0 when every
# step passed.
#
#   scripts/gpu_check.sh            the GPU run: wheels, ComfyUI link, zoo, cuda tests (also --lowvram), bench,
#                                   a profile of a cold shipped-defaults transfer
#   scripts/gpu_check.sh --dry-run  what a CPU machine can check of it: the carried folder, the wheels, ComfyUI's
#                                   import from the pruned tree, the cuda tests' collection (they skip), the
#                                   profile on the tiny models; no bench
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
: >"$OUT/steps.log"
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
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/steps.log"
    timeout --kill-after=10 "$limit" bash -c 'set -euo pipefail; "$@"' "$name" "$@" >>"$OUT/steps.log" 2>&1 || rc=$?
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

# the naive reference was measured on an H200 once (75 s); the node phase, what ComfyUI users run, takes its time
bench() {
    "$PY" bench/run_bench.py --device cuda --skip step,trained,naive --no-record --work /tmp/lorax-bench
}

# py-spy's folded stacks (every thread) of one cold transfer with the shipped defaults: where a GPU run's time goes
profile() {
    local source=$1 target=$2 device=$3 work=/tmp/lorax-profile
    rm -rf "$work" && mkdir -p "$work"
    "$PY" -m lorax_zoo lora --cover full --rank 32 "$work/lora.safetensors"
    "$SITE/bin/py-spy" record --rate 50 --threads --nonblocking --format raw -o "$OUT/profile_defaults.txt" -- \
        "$PY" -m lorax_engine transfer --source-model "$("$PY" -c "import lorax_zoo; print(lorax_zoo.checkpoint('$source'))")" \
        --target-model "$("$PY" -c "import lorax_zoo; print(lorax_zoo.checkpoint('$target'))")" \
        --lora "$work/lora.safetensors" --out "$work/out.safetensors" --cache-dir "$work/cache" --device "$device" --quiet
    [[ -f $work/out.safetensors ]] || { echo "profile: the transfer failed (py-spy exits 0 all the same)"; return 1; }
    # the 30 functions most often on a stack (each counted once per stack, line numbers dropped)
    "$PY" - "$OUT/profile_defaults.txt" <<'EOF'
import collections, re, sys
total, on_stack = 0, collections.Counter()
for line in open(sys.argv[1]):
    stack, _, count = line.rstrip().rpartition(" ")
    total += int(count)
    for frame in {re.sub(r":\d+\)$", ")", f) for f in stack.split(";")[1:]}:
        on_stack[frame] += int(count)
print(f"profile: {total} samples at 50 Hz over all threads; share of samples with the function on the stack:")
for frame, n in on_stack.most_common(30):
    print(f"{n / total:6.1%}  {frame}")
EOF
}

[[ -d .gpu/comfyui && -d .gpu/wheels ]] || { echo "gpu-check: .gpu is missing: run 'make gpu-prepare' here and carry .gpu" \
                                             | tee -a "$OUT/summary.txt" >&2; exit 1; }
export PY SITE OUT PYTHONUNBUFFERED=1 PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export -f environment install_wheels link_comfyui bench profile      # step runs each under timeout, in a child bash
step environment 60 environment
step wheels 120 install_wheels
step comfyui 120 link_comfyui
if ((DRY)); then
    step zoo 300 "$PY" -m lorax_zoo build tiny_sd15 tiny_sdxl
    step cuda_tests 300 "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider
    step profile 120 profile tiny_sd15_trained demo_sdxl_trained cpu
else
    step zoo 200 "$PY" -m lorax_zoo build tiny_sd15 tiny_sdxl demo_sdxl sd15 sdxl sd15_trained sdxl_trained
    step cuda_tests 150 "$PY" -m pytest -m cuda tests/test_cuda.py -v -p no:cacheprovider
    step cuda_lowvram 100 env LORAX_TEST_LOWVRAM=1 "$PY" -m pytest -m cuda tests/test_cuda.py -v -p no:cacheprovider \
        -k workflow
    step bench 330 bench
    # the bench's result: its JSON line, with the GPU's name under machine.gpu
    grep '^{"' "$OUT/steps.log" | tail -n 1 >"$OUT/bench.json" || echo "bench: no JSON line" >>"$OUT/summary.txt"
    step profile 90 profile sd15_trained sdxl_trained cuda
fi
echo "bench phases step, trained: skipped (trained_accuracy computes on the CPU: it takes no device); naive: skipped (measured once)" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
exit "$failed"
