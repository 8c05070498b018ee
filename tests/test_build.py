"""Packaging: the wheel carries the compiled extension when a toolkit is
there, the CPU kernel alone when there is none, and is pure Python when told
to skip the extension; bad architecture lists are refused before anything
compiles.

Each build runs on a copy of the project's files (what git tracks or would
track), so the tests see what a fresh clone would build and leave no build
directories behind.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from helpers import toolkit_present

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI_ARCHS = "8.0"  # one architecture, and its cheapest: CUTLASS's sm_90a kernels take minutes more
WHEEL_TORCH_VERSIONS = ("2.14.1", "2.11.0")  # CI's torch and the GPU machine's (the Makefile's wheel-check too)


needs_toolkit = pytest.mark.skipif(
    not toolkit_present() or torch.version.cuda is None,
    reason="needs a CUDA toolkit in CUDA_HOME and a CUDA build of torch (the Makefile sets CUDA_HOME)",
)


def project_copy(tmp_path):
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    copy = tmp_path / "featadapt-src"
    for name in filter(None, listed):
        source = os.path.join(ROOT, name)
        if os.path.isfile(source):
            target = copy / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return copy


def build_wheel(tmp_path, **env):
    source = project_copy(tmp_path)
    out = tmp_path / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(out), "."],
        cwd=source, capture_output=True, text=True, timeout=1200, env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("featadapt-*.whl")
    return wheel, zipfile.ZipFile(wheel).namelist()


@pytest.fixture(scope="module")
def cuda_wheel(tmp_path_factory):
    """The wheel `make wheel` builds (tools/build-wheel.sh: abi3, auditwheel's
    manylinux tag), from a copy of the project, for CI_ARCHS."""
    tmp_path = tmp_path_factory.mktemp("cuda-wheel")
    source = project_copy(tmp_path)
    done = subprocess.run(["bash", "tools/build-wheel.sh", sys.executable, str(tmp_path / "dist"), str(source)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "FEATADAPT_CUDA_ARCHS": CI_ARCHS, "FEATADAPT_SKIP_CUDA_BUILD": "0"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    wheel = pathlib.Path(done.stdout.strip().splitlines()[-1])
    return wheel, zipfile.ZipFile(wheel).namelist()


@needs_toolkit
def test_the_wheel_contains_the_compiled_extension(cuda_wheel):
    wheel, names = cuda_wheel
    assert "-manylinux_" in wheel.name  # auditwheel's tag: only allowed libraries left to the system
    assert [n for n in names if n.startswith("featadapt/_C.") and n.endswith(".so")], names
    assert "featadapt/kernels/cuda.py" in names
    assert "-none-any" not in wheel.name  # a platform wheel, since it carries a binary
    assert "-cp39-abi3-" in wheel.name  # the stable ABI and Python's limited API: one wheel for them all


def test_skipping_the_extension_gives_a_pure_python_wheel(tmp_path):
    wheel, names = build_wheel(tmp_path, FEATADAPT_SKIP_EXTENSION="1")
    assert wheel.name.endswith("-py3-none-any.whl")
    assert not [n for n in names if n.endswith(".so")]
    assert "featadapt/ops/cuda_backend.py" in names


CPU_ONLY_CHECK = """
import torch
import featadapt
from featadapt.kernels import cpu, cuda
assert featadapt.__file__.startswith(UNPACKED), featadapt.__file__
assert cpu.BUILT and cpu.capability() in cpu.CAPABILITIES
assert not hasattr(torch.ops.featadapt, "cuda_scaled_gemm")
assert cuda.IMPORT_ERROR.startswith("featadapt._C was built without its CUDA kernels"), cuda.IMPORT_ERROR
assert "FEATADAPT_SKIP_CUDA_BUILD=1" in cuda.IMPORT_ERROR
g, x, scale = torch.randn(37, 24), torch.randn(37, 24), torch.randn(24)
expected_dx, expected_ds, expected_dt = g * scale, (g * x).sum(0), g.sum(0)
ds, dt = cpu.vefa_input_grads(g, x, scale, True)  # g becomes dx
torch.testing.assert_close(g, expected_dx)
torch.testing.assert_close(ds, expected_ds, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(dt, expected_dt, rtol=1e-5, atol=1e-5)
print("cpu-only ok")
"""


def test_without_cuda_the_wheel_carries_the_cpu_kernel(tmp_path):
    """No toolkit (here: FEATADAPT_SKIP_CUDA_BUILD=1): featadapt._C is built with
    the CPU kernel alone, which loads, registers its op and computes; the cuda
    backend says why it has no kernels."""
    wheel, names = build_wheel(tmp_path, FEATADAPT_SKIP_CUDA_BUILD="1")
    assert [n for n in names if n.startswith("featadapt/_C.") and n.endswith(".so")], names
    assert "-none-any" not in wheel.name
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(wheel).extractall(unpacked)
    done = subprocess.run([sys.executable, "-c", f"UNPACKED = {str(unpacked)!r}\n" + CPU_ONLY_CHECK],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(unpacked)})
    assert done.returncode == 0 and "cpu-only ok" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


@needs_toolkit
@pytest.mark.parametrize("archs,message", [
    ("7.5", "the CUTLASS kernels are built for 8.0, 8.6, 8.7, 8.9, 9.0"),
    ("10.0", "newer GPUs run the sm_80 PTX"),
    ("sm_90", "expected entries like '9.0'"),
    (" ; ", "must list compute capabilities"),
])
def test_bad_architecture_lists_are_refused(archs, message):
    done = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "FEATADAPT_CUDA_ARCHS": archs, "FEATADAPT_SKIP_CUDA_BUILD": "0"},
    )
    assert done.returncode != 0
    assert "FEATADAPT_CUDA_ARCHS" in done.stderr and message in done.stderr


@needs_toolkit
def test_a_build_without_cutlass_says_what_to_install(tmp_path):
    done = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "FEATADAPT_CUTLASS_INCLUDE": str(tmp_path), "FEATADAPT_SKIP_CUDA_BUILD": "0"},
    )
    assert done.returncode != 0
    assert "CUTLASS's headers" in done.stderr and "pip install --no-deps nvidia-cutlass==4.2.0.0" in done.stderr
    assert str(tmp_path) in done.stderr



@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_the_library_binds_only_to_the_stable_abi():
    """No symbol of ATen, c10 or torch's C++ API is left for the loader to
    find: what the library calls of torch is the stable C shim (aoti_*,
    torch_*), whose symbols every torch since 2.10 exports."""
    from featadapt.kernels import extension

    if extension.LOAD_ERROR is not None:
        pytest.skip(extension.LOAD_ERROR)
    undefined = subprocess.run(["nm", "-D", "--undefined-only", extension._C.__file__], capture_output=True,
                               text=True, check=True).stdout.split()
    unstable = [name for name in undefined if name.startswith(("_ZN2at", "_ZN3c10", "_ZN5torch", "_ZNK2at",
                                                                  "_ZNK3c10", "_ZNK5torch"))]
    assert not unstable, unstable[:10]
    assert any(name.startswith(("aoti_torch_", "torch_")) for name in undefined)


@needs_toolkit
def test_one_wheel_works_under_two_torch_versions(cuda_wheel):
    """The stable ABI's promise, kept: the same wheel installed into fresh
    environments with CI's torch and the GPU machine's loads, registers every
    op, computes with the CPU kernel and plans with CUTLASS (tools/wheel_check.py).
    The environments are cached in build/wheel-check."""
    wheel, _ = cuda_wheel
    done = subprocess.run(["bash", "tools/wheel-check.sh", sys.executable, str(wheel), *WHEEL_TORCH_VERSIONS],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for version in WHEEL_TORCH_VERSIONS:
        assert f"== torch {version}: the wheel passed its checks" in done.stdout
        assert f"torch {version}" in done.stdout
