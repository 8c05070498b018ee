#!/usr/bin/env bash
# compute-sanitizer over tools/sanitize_cases.py (every fused op on odd shapes,
# forward and backward): memcheck (out-of-bounds and misaligned accesses),
# racecheck (shared-memory hazards) and synccheck (barrier misuse), each a
# separate run; any report fails it. Run on a GPU machine, after `make setup`.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}
# Without the caching allocator every tensor is its own allocation, so memcheck sees its bounds.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
status=0
for tool in memcheck racecheck synccheck; do
    echo "== compute-sanitizer --tool $tool"
    "$SANITIZER" --tool "$tool" --error-exitcode 1 --target-processes all "$PY" tools/sanitize_cases.py || status=1
done
exit $status
