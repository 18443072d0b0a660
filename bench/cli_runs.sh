#!/usr/bin/env bash
# The bench's two transfers (bench/run_bench.py: `defaults` and `stress`) through the command line of any checkout,
# for before/after figures side by side: another revision's engine has no `--runs` of its own, but its CLI is the
# same. Prints one line per run: wall seconds and peak RSS of the process (GNU time).
#   bash bench/cli_runs.sh [CHECKOUT] [defaults,stress]     (CHECKOUT defaults to this one; its venv is this one's)
# Scratch in $LORAX_CLI_RUNS_DIR (default out/cli-runs; allow ~5 GB for defaults, ~10 GB more for stress: the
# subspace caches); zoo models from `python -m lorax_zoo build` (built on first use).
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
CHECKOUT="$(cd "${1:-$HERE}" && pwd)"
RUNS="${2:-defaults,stress}"
PY="$HERE/.venv/bin/python"
W="${LORAX_CLI_RUNS_DIR:-$HERE/out/cli-runs}"
rm -rf "$W" && mkdir -p "$W/loras"
cd "$HERE"
zoo() { "$PY" -m lorax_zoo build "$1" | awk '/safetensors/ {for (i = 1; i <= NF; i++) if ($i ~ /safetensors$/) print $i}' | tail -1; }
for i in $(seq 0 9); do
    "$PY" -c "import lorax_zoo, sys; lorax_zoo.make_sd15_lora(sys.argv[1], rank=32, seed=$i, cover='full')" \
        "$W/loras/lora0$i.safetensors"
done
timed() {   # label, then the CLI's arguments
    local label=$1; shift
    (cd "$CHECKOUT" && /usr/bin/time -f "$label wall %e s peak RSS %M KB" "$PY" -m lorax_engine "$@" --quiet \
        >"$W/$label.log" 2>&1) || { echo "$label failed: see $W/$label.log"; return 1; }
    tail -n 1 "$W/$label.log"
}
for run in ${RUNS//,/ }; do
    case $run in
        defaults) models=(sd15_trained sdxl_trained); extra=() ;;
        stress) models=(sd15 sdxl); extra=(--threshold off) ;;
        *) echo "unknown run: $run" >&2; exit 2 ;;
    esac
    common=(--source-model "$(zoo "${models[0]}")" --target-model "$(zoo "${models[1]}")" "${extra[@]}"
            --cache-dir "$W/$run-cache")
    timed "$run-cold" transfer "${common[@]}" --lora "$W/loras/lora00.safetensors" --out "$W/$run.safetensors" \
        --report "$W/$run-cold.json"
    timed "$run-warm" transfer "${common[@]}" --lora "$W/loras/lora00.safetensors" --out "$W/$run.safetensors" \
        --report "$W/$run-warm.json"
    for n in 1 10; do
        mkdir -p "$W/$run-in$n" "$W/$run-out$n"
        ls "$W"/loras/*.safetensors | head -n "$n" | xargs -I{} ln -f {} "$W/$run-in$n/"
        timed "$run-batch$n" batch "${common[@]}" --lora-dir "$W/$run-in$n" --out-dir "$W/$run-out$n"
    done
done
