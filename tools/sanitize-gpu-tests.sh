#!/usr/bin/env bash
# compute-sanitizer's memcheck over the cuda backend's GPU tests: out-of-bounds
# and misaligned accesses in the kernels fail the run. The largest shapes are
# left out (memcheck slows kernels down many times; the odd shapes are where
# bounds go wrong). Run on a GPU machine, after `make setup`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}
# FEATADAPT_DRY_RUN=1 (tools/gpu-check.sh --dry-run): the same tests, no sanitizer.
if [[ "${FEATADAPT_DRY_RUN:-0}" == 1 ]]; then
    SANITIZER_ARGS=()
else
    SANITIZER_ARGS=("$SANITIZER" --tool memcheck --error-exitcode 1 --target-processes all)
fi
# Without the caching allocator every tensor is its own allocation, so memcheck sees its bounds.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
exec "${SANITIZER_ARGS[@]}" "$PY" -m pytest tests/test_cuda.py -m gpu -q -p no:cacheprovider \
    -k "not large_shapes and not 2_pow_31 and not compile and not M8192" "$@"
