#!/usr/bin/env bash
# Set up everything wf-pipeline needs on a fresh Debian machine, quietly and idempotently:
#  1. the dependencies, and only them, in a virtual environment cached under ~/.cache/wf-pipeline
#     (WF_VENV_CACHE), keyed by the dependency pins and the Python version: built once per machine
#     (about a minute from the local wheel store), shared by every checkout;
#  2. .venv in this checkout: a small environment layered on the cached one that runs THIS checkout's
#     code (two .pth files), with its own wf-pipeline, wf-torchrun and torchrun commands; a second
#     clone gets its own .venv and never runs the first clone's code;
#  3. the Fashion-MNIST Debian package.
set -euo pipefail
cd "$(dirname "$0")/.."
checkout=$(pwd -P)

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
# The interpreter itself, not a shim (pyenv), so both environments point at the same one.
PYTHON=$("$PYTHON" -c "import sys; print(sys.executable)")

# Dependency pins: the project's dependencies plus its test and research extras, straight from pyproject.toml.
deps=$("$PYTHON" - <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project.get("optional-dependencies", {})
print("\n".join(project["dependencies"] + extras.get("test", []) + extras.get("research", [])))
PY
)
key=$( (echo "dependencies-only v2"; echo "$deps"; "$PYTHON" --version) | sha256sum | cut -c1-16)
cache_root=${WF_VENV_CACHE:-$HOME/.cache/wf-pipeline}
deps_venv="$cache_root/deps-$key"
mkdir -p "$cache_root"

site_packages() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }

build_dependencies() {
    echo "[setup] building the dependency environment $deps_venv (first run on this machine: about a minute)"
    rm -rf "$deps_venv"
    "$PYTHON" -m venv "$deps_venv"
    printf '%s\n' "$deps" > "$deps_venv/requirements.txt"
    local log="$deps_venv/pip.log"
    # pip's output goes to a log, shown only if the install fails.
    if ! { "$deps_venv/bin/pip" install --disable-pip-version-check --upgrade pip \
           && "$deps_venv/bin/pip" install --disable-pip-version-check -r "$deps_venv/requirements.txt"; } >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "[setup] dependency install failed (full log: $log)" >&2
        exit 1
    fi
    "$deps_venv/bin/python" -c "import torch, torchvision, onnx, onnxruntime, typer, pydantic, yaml, rich, matplotlib, sklearn, pytest, curvlinops" \
        || { echo "[setup] dependency install failed: an import does not work" >&2; exit 1; }
    touch "$deps_venv/.complete"
}

if [ ! -f "$deps_venv/.complete" ]; then
    # One builder at a time: checkouts set up side by side wait for the first build, then reuse it.
    exec 9>"$cache_root/.build.lock"
    flock 9
    [ -f "$deps_venv/.complete" ] || build_dependencies
    flock -u 9
fi

# .venv: this checkout's layer. An older set-up linked .venv to a shared environment: replace the link.
[ -L .venv ] && rm .venv
if [ -e .venv ] && [ ! -f .venv/.wf-layer ]; then
    echo "[setup] .venv exists but was not made by this script; move it away and run again" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    rm -rf .venv
    "$PYTHON" -m venv --without-pip .venv
fi
layer_site=$(site_packages .venv/bin/python)
deps_site=$(site_packages "$deps_venv/bin/python")
# addsitedir (not a bare path) so the dependencies' own .pth files are processed too.
echo "import site; site.addsitedir('$deps_site')" > "$layer_site/_wf_dependencies.pth"
echo "$checkout" > "$layer_site/_wf_checkout.pth"
write_command() {  # name, module, function
    printf '#!%s\nimport sys\nfrom %s import %s\nsys.exit(%s())\n' "$checkout/.venv/bin/python" "$2" "$3" "$3" > ".venv/bin/$1"
    chmod +x ".venv/bin/$1"
}
write_command wf-pipeline wf_pipeline.cli main
write_command wf-torchrun wf_pipeline.runtime.launch main
write_command torchrun torch.distributed.run main
echo "$deps_venv" > .venv/.wf-layer

found=$(cd / && env -u PYTHONPATH "$checkout/.venv/bin/python" -c \
    "import wf_pipeline, os; print(os.path.dirname(os.path.dirname(os.path.realpath(wf_pipeline.__file__))))")
[ "$found" = "$checkout" ] || { echo "[setup] .venv imports wf_pipeline from $found, not from $checkout" >&2; exit 1; }

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    echo "[setup] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
echo "[setup] ready: .venv runs $checkout with the dependencies of $deps_venv"
