#!/usr/bin/env bash
# make gpu-prepare: builds .gpu/ (gitignored), what the lent GPU machine needs beside the working tree to import
# ComfyUI in-process: ComfyUI's tree from .runtime/comfyui, pruned to its code, and the wheels of the three
# packages its image lacks (COMFYUI.md §D), py-spy for the profile step and threadpoolctl (the engine uses it
# where present: kernels.py). Prints the device tool's call.
# Needs `make setup` (the runtime) and PyPI (pip download).
set -euo pipefail
cd "$(dirname "$0")/.."

LIMIT_MB=64                       # the device tool's carry limit, working tree included (MiB)
COMFY=.runtime/comfyui
DEST=.gpu
PIP="${PYTHON:-.venv/bin/python} -m pip"
# versions as in the test runtime (.venv); av's wheels are abi3 manylinux_2_28, so they install on Python 3.12
WHEELS=(av==18.1.0 torchsde==0.2.6 trampoline==0.1.2 py-spy==0.4.3 threadpoolctl==3.8.0)   # py-spy: gpu_check.sh's profile step
# not xxhash: its wheels are built per Python version (3.12 there, 3.11 for the dry run here); without it the
# weights' fingerprints are sha256 (lorax_engine/files/base_weights.py), which 16 threads hash in ~0.5 s there

[[ -f $COMFY/main.py ]] || { echo "gpu-prepare: $COMFY is missing; run 'make setup' first" >&2; exit 1; }
rm -rf "$DEST/comfyui"
mkdir -p "$DEST/comfyui" "$DEST/wheels"
# code only: no user data, models, tests, caches, API nodes (not imported in-process), or tokenizers of model
# families other than SD1.5/SDXL (those load from comfy/sd1_tokenizer)
tar -C "$COMFY" -cf - \
    --exclude=./user --exclude=./models --exclude=./input --exclude=./output --exclude='./tests*' \
    --exclude=./comfy_api_nodes --exclude=./.git --exclude=__pycache__ --exclude='*.pyc' \
    --exclude='./comfy/text_encoders/*_tokenizer' . | tar -C "$DEST/comfyui" -xf -
mkdir -p "$DEST/comfyui/models"           # folder_paths expects it

missing=()
for w in "${WHEELS[@]}"; do
    name=${w%%==*}
    ls "$DEST/wheels/${name//-/_}-${w##*==}-"*.whl >/dev/null 2>&1 || missing+=("$w")      # wheels write _ for -
done
if ((${#missing[@]})); then
    $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$DEST/wheels" "${missing[@]}"
fi

tree_kb=$(git ls-files -co --exclude-standard -z | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
gpu_kb=$(du -sk "$DEST" | cut -f1)
total_mb=$(( (tree_kb + gpu_kb + 1023) / 1024 ))
echo "gpu-prepare: $DEST/comfyui $(du -sh "$DEST/comfyui" | cut -f1), $DEST/wheels $(du -sh "$DEST/wheels" | cut -f1)" \
     "($(ls "$DEST/wheels" | tr '\n' ' ')); with the working tree ${total_mb} MiB of the ${LIMIT_MB} MiB carry limit"
if ((total_mb > LIMIT_MB)); then
    echo "gpu-prepare: over the carry limit; prune more of $DEST/comfyui" >&2
    exit 1
fi
cat <<EOF

Run it through the device tool (one call, ~7 minutes of the 15; what comes back lies under files_at):
  run(command="bash scripts/gpu_check.sh", carry=["$DEST"], timeout_s=600)
Then give_back, unless you rerun at once. Results: summary.txt, steps.log, bench.json (the bench's JSON line), profile_defaults.txt.
EOF
