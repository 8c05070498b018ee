#!/usr/bin/env bash
# The wheel `make wheel` built, installed into a fresh virtual environment per
# torch version and checked there (tools/wheel_check.py), from outside the
# source tree (`make wheel-check`):
#
#   tools/wheel-check.sh PYTHON WHEEL [TORCH_VERSION ...]     (default: 2.14.1 2.11.0)
#
# 2.14.1 is CI's torch, 2.11.0 the GPU machine's. The environments are kept
# in build/wheel-check/torch-<version> and reused (torch and its CUDA
# packages take a minute or two to install); only featadapt is reinstalled.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:?usage: tools/wheel-check.sh PYTHON WHEEL [TORCH_VERSION ...]}
wheel=$(realpath "${2:?usage: tools/wheel-check.sh PYTHON WHEEL [TORCH_VERSION ...]}")
shift 2
versions=("$@")
[[ ${#versions[@]} -eq 0 ]] && versions=(2.14.1 2.11.0)
check=$(realpath tools/wheel_check.py)
# featadapt's one dependency besides torch, and numpy (torch warns without it), at their pins
pins=($(grep -E '^(safetensors|numpy)==' requirements/constraints.txt))

for version in "${versions[@]}"; do
    start=$SECONDS
    venv=build/wheel-check/torch-$version
    if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$version')" 2>/dev/null; then
        rm -rf "$venv"
        "$py" -m venv "$venv"
        "$venv/bin/python" -m pip install -q "torch==$version" "${pins[@]}"
    fi
    "$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$wheel"
    # from a folder outside the tree, so that `import featadapt` finds the installed wheel
    (cd "$(mktemp -d)" && "$OLDPWD/$venv/bin/python" "$check")
    echo "== torch $version: the wheel passed its checks ($((SECONDS - start)) s)"
done
