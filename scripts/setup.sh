#!/usr/bin/env bash
# Set up everything wf-pipeline needs on a fresh Debian machine: a Python 3.11 venv with the pinned
# dependencies (cached under ~/.cache, keyed by the pins, so repeat runs take seconds) and the
# Fashion-MNIST Debian package. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
pins_hash=$( (cat pyproject.toml; "$PYTHON" --version) | sha256sum | cut -c1-16)
cache_root=${WF_VENV_CACHE:-$HOME/.cache/wf-pipeline}
venv="$cache_root/venv-$pins_hash"

if [ ! -f "$venv/.complete" ]; then
    echo "[setup] building virtual environment $venv (first run on this machine: about a minute)"
    rm -rf "$venv"
    mkdir -p "$cache_root"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    # Installing the project's dependencies (not the project itself) keeps the cache independent of the checkout.
    "$venv/bin/pip" install --quiet --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
    "$venv/bin/python" -c "import torch, torchvision, onnx, onnxruntime, typer, pydantic, yaml, rich, matplotlib, sklearn, pytest" \
        || { echo "[setup] dependency install failed" >&2; exit 1; }
    touch "$venv/.complete"
fi

# .venv in the checkout points at the cached environment; the editable install points at this checkout.
if [ -L .venv ] || [ ! -e .venv ]; then
    ln -sfn "$venv" .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import wf_pipeline" || { echo "[setup] installing wf_pipeline failed" >&2; exit 1; }

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    echo "[setup] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
echo "[setup] ready: $(.venv/bin/wf-pipeline --help >/dev/null && echo 'wf-pipeline installed')"
