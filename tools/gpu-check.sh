#!/usr/bin/env bash
# Everything a GPU machine has to tell us, in one device command of at most
# about six and a half minutes on a cold H100/H200, offline:
#
#   tools/gpu-check.sh RESULTS_DIR            (make gpu-check RESULTS=RESULTS_DIR)
#   tools/gpu-check.sh --dry-run RESULTS_DIR  on a machine without a GPU: every stage
#                                             runs its CPU-side part, skipping the GPU
#
# Stages, each capped (SIGINT first, so pytest still writes its XML), each
# logging to RESULTS_DIR/<stage>.log, pytest stages with -x so one illegal
# address does not poison the rest:
#   setup      (background) the package and the CUDA extension (CUTLASS's
#              sm_80 and sm_90a kernels), offline: from the wheel in dist/
#              when one was carried (`make wheel`: no compiling), else
#              built, with CUTLASS's headers from the nvidia-cutlass wheel
#              in build/wheels (`make setup` downloads it; carry it too);
#              the Triton stages run from the tree meanwhile            [200 s]
#   self-check featadapt.check_backends for torch and triton: bfloat16 and
#              float16, odd shapes and the production shape, every
#              configuration the pruning rule keeps; 4 processes side by
#              side (tools/gpu_self_check.py: a process compiles serially) [110 s]
#   headline   the headline benchmarks (every method and backend against
#              the floor and PEFT), each fused layer's output and dx
#              checked against the torch backend in the same run         [100 s]
#   cuda-check the self-check of the cuda backend, once the build is in  [ 30 s]
#   cuda-bench the headline benchmarks of the cuda backend against torch,
#              numerics checked as in headline (the extension was not
#              built yet when headline ran)                             [ 40 s]
#   sanitize   compute-sanitizer memcheck, racecheck and synccheck over
#              tools/sanitize_cases.py (odd shapes, every fused op)      [ 45 s]
#   gpu-tests  the gpu-marked tests, as many as fit                      [ 40 s]
# then the dispatch table from what was measured (tools/write_dispatch_table.py)
# and summary.txt. The caps after setup add up to 365 s; setup overlaps them.
# Outputs: self-check.json, bench-headline.json, self-check-cuda.json,
# bench-cuda.json, dispatch_table.json,
# junit XML per pytest stage, nvidia-smi.txt, featadapt-info.txt, summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
RESULTS=${1:?usage: tools/gpu-check.sh [--dry-run] RESULTS_DIR}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
PY=${PY:-.venv/bin/python}
PYTHON=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# Both CUTLASS builds: the sm_80 kernels run on the Hopper GPU from their PTX
# when FEATADAPT_CUTLASS_ARCH=sm80 (tests/test_cuda.py), so both are checked.
export FEATADAPT_CUDA_ARCHS=${FEATADAPT_CUDA_ARCHS:-8.0;9.0}
export PYTHONUNBUFFERED=1
# Offline: no package index to try, and no retries or back-off against one.
export PIP_NO_INDEX=${PIP_NO_INDEX:-1} PIP_RETRIES=0 PIP_DISABLE_PIP_VERSION_CHECK=1
# Until the set-up finishes, the stages import featadapt from the tree.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# The dry run's CPU (2 cores, Triton's interpreter) is far slower than the
# GPU machine: its caps are four times as long.
SLOWER=1
[[ $DRY_RUN -eq 1 ]] && SLOWER=4
CAP_SETUP=${CAP_SETUP:-$((200 * SLOWER))}
CAP_SELF_CHECK=${CAP_SELF_CHECK:-$((110 * SLOWER))}
CAP_HEADLINE=${CAP_HEADLINE:-$((100 * SLOWER))}
CAP_CUDA_CHECK=${CAP_CUDA_CHECK:-$((30 * SLOWER))}
CAP_CUDA_BENCH=${CAP_CUDA_BENCH:-$((40 * SLOWER))}
CAP_SANITIZE=${CAP_SANITIZE:-$((45 * SLOWER))}
CAP_TESTS=${CAP_TESTS:-$((40 * SLOWER))}
# The benchmarks autotune over the first few kept configurations (the large
# tiles come first): the self-check has already run every one of them.
export FEATADAPT_AUTOTUNE_CONFIGS=${FEATADAPT_AUTOTUNE_CONFIGS:-3}

STAGES=()
# stage NAME CAP COMMAND...: runs COMMAND for at most CAP seconds, logs to NAME.log.
stage() {
    local name=$1 cap=$2
    shift 2
    local start=$SECONDS
    echo "== $name (cap ${cap}s): $*" | tee "$RESULTS/$name.log"
    timeout --signal=INT --kill-after=10 "$cap" "$@" >>"$RESULTS/$name.log" 2>&1
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

# A prebuilt wheel carried along (`make wheel` on the CPU machine: dist/) saves
# the build: its library goes into the tree, which every stage imports, and
# the set-up installs the package without compiling. Else the set-up builds.
WHEEL=$(ls -t dist/featadapt-*-cp39-abi3-*.whl 2>/dev/null | head -1 || true)
if [[ -n "$WHEEL" && "${FEATADAPT_GPU_CHECK_BUILD:-0}" != 1 ]]; then
    echo "featadapt gpu-check: using the prebuilt $WHEEL (FEATADAPT_GPU_CHECK_BUILD=1 builds instead)"
    "$PYTHON" -m zipfile -e "$WHEEL" build/gpu-check-wheel
    rm -f featadapt/_C*.so  # (an older build's library would shadow the wheel's)
    cp build/gpu-check-wheel/featadapt/_C*.so featadapt/
    export FEATADAPT_SKIP_EXTENSION=1
    echo "$WHEEL" >"$RESULTS/wheel.txt"
fi

# setup, in the background: the extension takes longest to build. Until it
# is done the stages run the machine's Python on the tree (no featadapt._C
# unless a wheel brought it: the cuda backend waits for its own stage).
SETUP_START=$SECONDS
( timeout --kill-after=10 "$CAP_SETUP" make setup PYTHON="$PYTHON" >"$RESULTS/setup.log" 2>&1
  echo "$? $((SECONDS - SETUP_START))" >"$RESULTS/setup.rc" ) &
SETUP_PID=$!
EARLY_PY=$PYTHON
[[ -x "$PY" ]] && EARLY_PY=$PY  # a machine set up before (this one, in a dry run)
DRY=()
[[ $DRY_RUN -eq 1 ]] && DRY=(--dry-run)

stage self-check "$CAP_SELF_CHECK" "$EARLY_PY" tools/gpu_self_check.py "$RESULTS" "${DRY[@]}"

# headline benchmarks; every fused layer's output and dx checked against torch's.
BENCH=("$EARLY_PY" -m pytest benchmarks/test_layers.py -p no:cacheprovider -q -x)
if [[ $DRY_RUN -eq 1 ]]; then
    stage headline "$CAP_HEADLINE" env TRITON_INTERPRET=1 "${BENCH[@]}" --bench-set tiny --benchmark-disable \
        --bench-results "$RESULTS/bench-headline.json" --junitxml="$RESULTS/headline.xml"
else
    stage headline "$CAP_HEADLINE" "${BENCH[@]}" --bench-set gpu-headline \
        --bench-results "$RESULTS/bench-headline.json" --junitxml="$RESULTS/headline.xml"
fi

wait "$SETUP_PID"
STAGES+=("setup $(cat "$RESULTS/setup.rc" 2>/dev/null || echo "1 $((SECONDS - SETUP_START))")")
[[ -x "$PY" ]] || PY=$PYTHON
"$PY" -m featadapt.info >"$RESULTS/featadapt-info.txt" 2>&1
"$PY" -m pip list --format=freeze >"$RESULTS/pip-freeze.txt" 2>/dev/null

# the cuda backend, now that the extension is built.
if [[ $DRY_RUN -eq 1 ]]; then
    stage cuda-check "$CAP_CUDA_CHECK" "$PY" -m featadapt.info
else
    stage cuda-check "$CAP_CUDA_CHECK" "$PY" -m featadapt.info --check --backends cuda --dtypes bfloat16,float16 \
        --production --json "$RESULTS/self-check-cuda.json"
fi

# the cuda backend's headline timings, with torch's in the same run (the ratio's baseline).
CUDA_BENCH=("$PY" -m pytest benchmarks/test_layers.py -p no:cacheprovider -q -x -k "cuda or torch")
if [[ $DRY_RUN -eq 1 ]]; then
    stage cuda-bench "$CAP_CUDA_BENCH" "${CUDA_BENCH[@]}" --bench-set tiny --benchmark-disable \
        --bench-results "$RESULTS/bench-cuda.json" --junitxml="$RESULTS/cuda-bench.xml"
else
    stage cuda-bench "$CAP_CUDA_BENCH" "${CUDA_BENCH[@]}" --bench-set gpu-headline \
        --bench-results "$RESULTS/bench-cuda.json" --junitxml="$RESULTS/cuda-bench.xml"
fi

# compute-sanitizer: memcheck, racecheck and synccheck over one small script.
if [[ $DRY_RUN -eq 1 ]]; then
    stage sanitize "$CAP_SANITIZE" env TRITON_INTERPRET=1 "$PY" tools/sanitize_cases.py
else
    stage sanitize "$CAP_SANITIZE" env PY="$PY" tools/sanitize-gpu-tests.sh
fi

# the gpu tests, as many as fit.
GPU_TESTS=("$PY" -m pytest -p no:cacheprovider -q -x -rfE tests -m gpu --junitxml="$RESULTS/gpu-tests.xml")
if [[ $DRY_RUN -eq 1 ]]; then
    stage gpu-tests "$CAP_TESTS" "${GPU_TESTS[@]}" --collect-only
else
    stage gpu-tests "$CAP_TESTS" "${GPU_TESTS[@]}"
fi

"$PY" tools/write_dispatch_table.py "$RESULTS" >"$RESULTS/dispatch-table.log" 2>&1
printf '%s\n' "${STAGES[@]}" >"$RESULTS/stages.txt"
"$PY" tools/gpu_check_summary.py "$RESULTS" | tee "$RESULTS/summary.txt"
