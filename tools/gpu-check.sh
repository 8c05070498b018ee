#!/usr/bin/env bash
# Everything a GPU machine has to tell us, in one command that cannot overrun:
#
#   tools/gpu-check.sh RESULTS_DIR            (make gpu-check RESULTS=RESULTS_DIR)
#   tools/gpu-check.sh --dry-run RESULTS_DIR  on a machine without a GPU: every step
#                                             runs, skipping only what needs the GPU
#
# Needs: the project's tree, Python with torch (CUDA build) and triton, pytest,
# pytest-benchmark, transformers and peft importable (offline is fine: the
# set-up falls back to `pip install --no-deps -e .`), nvcc in CUDA_HOME and
# compute-sanitizer. Writes into RESULTS_DIR as it goes, so a stage cut off
# by its cap leaves the others' results: setup.log, <stage>.log, junit
# XML per test stage, bench-headline.json and bench-rest.json, summary.txt.
#
# Time estimate on one H200 machine (16 cores), from counts; [caps]. A Triton
# compile takes 0.3-8.5 s on the CPU machine's cores (the 3.8 sweep), ~1 s for
# the small fixed configurations (tools/triton_aot.py check); assumed no slower
# on the GPU machine's cores.
#   setup     the extension for sm_90 only: 4 sources compiled in parallel,
#             the longest (ops.cpp, torch's headers) ~90 s                 [120 s]
#   gpu-tests 342 gpu tests, autotuning off (one fixed configuration per
#             kernel): ~150 distinct compiles (5 kernels × ~6 dtype/flag
#             cases × ~5 shape specializations) × ~0.8 s + 342 × ~0.1 s
#             ≈ 155 s                                                       [170 s]
#   headline  autotuning over at most 3 kept configurations a kernel:
#             2 dtypes × 5 kernels × 3 = 30 compiles × ~2 s = 60 s, plus
#             2 dtypes × 14 layers × 3 modes = 84 timings × ~0.5 s = 42 s   [130 s]
#   sanitize  137 odd-shape cuda tests under memcheck, ~0.25 s each ≈ 35 s  [ 40 s]
#   rest      the other GPU benchmarks, as many as fit                      [ 20 s]
#   total: the caps add up to 480 s = 8 min, plus seconds for the summary.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
RESULTS=${1:?usage: tools/gpu-check.sh [--dry-run] RESULTS_DIR}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
PY=${PY:-.venv/bin/python}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export FEATADAPT_CUDA_ARCHS=${FEATADAPT_CUDA_ARCHS:-9.0}
export PYTHONUNBUFFERED=1

CAP_SETUP=${CAP_SETUP:-120}
CAP_TESTS=${CAP_TESTS:-170}
CAP_HEADLINE=${CAP_HEADLINE:-130}
CAP_SANITIZE=${CAP_SANITIZE:-40}
CAP_REST=${CAP_REST:-20}
# The benchmarks autotune over the first few configurations the pruning rule
# keeps (the large tiles come first), so compiling stays within the caps.
export FEATADAPT_AUTOTUNE_CONFIGS=${FEATADAPT_AUTOTUNE_CONFIGS:-3}

STAGES=()
# stage NAME CAP COMMAND...: runs COMMAND for at most CAP seconds (SIGINT first,
# so pytest still writes its junit XML and the benchmark JSON), logs to NAME.log.
stage() {
    local name=$1 cap=$2
    shift 2
    local start=$SECONDS
    echo "== $name (cap ${cap}s): $*" | tee "$RESULTS/$name.log"
    timeout --signal=INT --kill-after=15 "$cap" "$@" >>"$RESULTS/$name.log" 2>&1
    local rc=$?
    local took=$((SECONDS - start))
    [[ $rc -eq 124 ]] && echo "== $name: cut off by its ${cap}s cap" | tee -a "$RESULTS/$name.log"
    STAGES+=("$name $rc $took")
    echo "== $name: exit $rc after ${took}s" | tee -a "$RESULTS/$name.log"
}

echo "featadapt gpu-check into $RESULTS (dry run: $DRY_RUN)"
if [[ $DRY_RUN -eq 0 ]] && ! command -v nvidia-smi >/dev/null; then
    echo "no nvidia-smi: is this a GPU machine? (--dry-run runs without one)" >&2
fi
command -v nvidia-smi >/dev/null && nvidia-smi >"$RESULTS/nvidia-smi.txt" 2>&1

# The extension, built on all cores (make setup is a no-op when it is up to date).
stage setup "$CAP_SETUP" make setup PYTHON="${PYTHON:-python3}"
"$PY" -m featadapt.info >"$RESULTS/featadapt-info.txt" 2>&1
"$PY" -m pip list --format=freeze >"$RESULTS/pip-freeze.txt" 2>/dev/null

PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rfE)
# (a) the gpu tests, autotuning off: the pruning rule's fixed configuration per
# kernel (tests/conftest.py sets FEATADAPT_AUTOTUNE=0; one test turns it on).
stage gpu-tests "$CAP_TESTS" "${PYTEST[@]}" tests -m gpu --junitxml="$RESULTS/gpu-tests.xml"

# (b) the headline benchmarks, then (d) the rest; the dry run collects the GPU
# sets and runs the tiny set through the same reporting instead.
BENCH=("$PY" -m pytest benchmarks -p no:cacheprovider -q)
if [[ $DRY_RUN -eq 1 ]]; then
    stage headline "$CAP_HEADLINE" bash -c "${BENCH[*]} --bench-set gpu-headline --collect-only >/dev/null && \
        ${BENCH[*]} --bench-set tiny --benchmark-disable --bench-results '$RESULTS/bench-headline.json' \
        --junitxml='$RESULTS/headline.xml'"
else
    stage headline "$CAP_HEADLINE" "${BENCH[@]}" --bench-set gpu-headline \
        --bench-results "$RESULTS/bench-headline.json" --junitxml="$RESULTS/headline.xml"
fi

# (c) compute-sanitizer's memcheck over the odd-shape cuda tests.
if [[ $DRY_RUN -eq 1 ]]; then
    stage sanitize "$CAP_SANITIZE" env FEATADAPT_DRY_RUN=1 PY="$PY" tools/sanitize-gpu-tests.sh \
        --junitxml="$RESULTS/sanitize.xml"
else
    stage sanitize "$CAP_SANITIZE" env PY="$PY" tools/sanitize-gpu-tests.sh --junitxml="$RESULTS/sanitize.xml"
fi

if [[ $DRY_RUN -eq 1 ]]; then
    stage rest "$CAP_REST" "${BENCH[@]}" --bench-set gpu-rest --collect-only --junitxml="$RESULTS/rest.xml"
else
    stage rest "$CAP_REST" "${BENCH[@]}" --bench-set gpu-rest \
        --bench-results "$RESULTS/bench-rest.json" --junitxml="$RESULTS/rest.xml"
fi

printf '%s\n' "${STAGES[@]}" >"$RESULTS/stages.txt"
"$PY" tools/gpu_check_summary.py "$RESULTS" | tee "$RESULTS/summary.txt"
