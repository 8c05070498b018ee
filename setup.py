"""Build script: the Python package, plus the extension featadapt._C (the
kernels in csrc/):
  - with a CUDA toolkit and a CUDA build of torch: the CPU kernel and the CUDA
    kernels, whose GEMMs are CUTLASS's (headers from the nvidia-cutlass package,
    `pip install --no-deps nvidia-cutlass`, pinned in requirements/build-files.in);
  - otherwise the CPU kernel alone (a C++ compiler is all it needs), and the
    `cuda` backend says why it is unavailable (`python -m featadapt.info`);
  - without torch at build time, pure Python.
Build with `pip install --no-build-isolation .` so the build sees the installed torch.

The library is on PyTorch's stable ABI (torch/csrc/stable, targeting torch 2.10:
one build loads under every torch since) and Python's limited API (an abi3
module for Python >= 3.9).

Environment:
  FEATADAPT_CUDA_ARCHS        compute capabilities to compile for, e.g. "9.0" or
                              "8.0;9.0" (default "8.0;9.0"): 8.x builds CUTLASS's
                              Ampere kernels (with PTX for the lowest, which newer
                              GPUs JIT-compile), 9.0 its Hopper ones (sm_90a)
  FEATADAPT_CUTLASS_INCLUDE   CUTLASS's include folder (default: the one the
                              installed nvidia-cutlass package ships)
  FEATADAPT_SKIP_CUDA_BUILD=1 the CPU kernel only, even with a toolkit
  FEATADAPT_SKIP_EXTENSION=1  no extension at all: the pure-Python package
  FEATADAPT_DEBUG=1           device debug info (-G) and no optimisation
  FEATADAPT_PTXAS_VERBOSE=1   ptxas prints each kernel's registers, spills, stack and shared
                              memory (-Xptxas -v); tools/cuda_resources.py reads the same
                              numbers back from the built extension
  MAX_JOBS                    parallel compile jobs (torch's ninja build reads it)
  CUDA_HOME                   the toolkit; torch's guess from nvcc's location can be wrong
"""

import glob
import importlib.util
import json
import os
import re
import sys

from setuptools import setup

DEFAULT_ARCHS = "8.0;9.0"
# The oldest torch whose stable ABI the library may use (TORCH_TARGET_VERSION:
# major << 56 | minor << 48), and the oldest Python of the abi3 module.
TORCH_TARGET = (2, 10)
STABLE_ABI = [f"-DTORCH_TARGET_VERSION={(TORCH_TARGET[0] << 56) | (TORCH_TARGET[1] << 48):#018x}"]
PYTHON_ABI3 = "cp39"
SUPPORTED_ARCHS = ("8.0", "8.6", "8.7", "8.9", "9.0")
SOURCES = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
CPU_SOURCES = ["csrc/cpu_vefa.cpp", "csrc/module.cpp"]  # what a build without CUDA compiles
GENERATED = os.path.join("build", "generated")  # featadapt_build_config.h (csrc/build_info.h)


def _note(message):
    print(f"featadapt setup: {message}", file=sys.stderr)


def cuda_archs(spec):
    """["8.0", "9.0"] from "8.0;9.0" (also accepts spaces or commas between them)."""
    archs = [a for a in re.split(r"[;,\s]+", spec.strip()) if a]
    if not archs:
        raise ValueError(f"FEATADAPT_CUDA_ARCHS must list compute capabilities like '8.0;9.0', got {spec!r}")
    for arch in archs:
        if not re.fullmatch(r"\d+\.\d", arch):
            raise ValueError(f"FEATADAPT_CUDA_ARCHS: expected entries like '9.0', got {arch!r} in {spec!r}")
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(
                f"FEATADAPT_CUDA_ARCHS: the CUTLASS kernels are built for {', '.join(SUPPORTED_ARCHS)} "
                f"(sm_80 kernels for 8.x, sm_90a for 9.0; newer GPUs run the sm_80 PTX), got {arch!r}"
            )
    return sorted(set(archs), key=float)


def gencode_flags(archs):
    """nvcc flags: a cubin per architecture (9.0 as sm_90a, whose wgmma and TMA
    code runs on 9.0 only) and PTX of the lowest 8.x one, which any newer GPU
    can JIT-compile."""
    flags = []
    for arch in archs:
        sm = arch.replace(".", "")
        if sm == "90":
            flags += ["-gencode", "arch=compute_90a,code=sm_90a"]
        else:
            flags += ["-gencode", f"arch=compute_{sm},code=sm_{sm}"]
    ampere = [a.replace(".", "") for a in archs if a.startswith("8.")]
    if ampere:
        flags += ["-gencode", f"arch=compute_{ampere[0]},code=compute_{ampere[0]}"]
    return flags


CUTLASS_MISSING = (
    "the CUDA extension's GEMMs need CUTLASS's headers: install them with "
    "`pip install --no-deps nvidia-cutlass==4.2.0.0` (the version requirements/build-files.in pins), "
    "or point FEATADAPT_CUTLASS_INCLUDE at a CUTLASS include folder, or build the CPU kernel alone "
    "(FEATADAPT_SKIP_CUDA_BUILD=1)"
)


def cutlass_include():
    """CUTLASS's include folder: FEATADAPT_CUTLASS_INCLUDE, else the nvidia-cutlass
    package's (found without importing it). Raises with what to do when there is none."""
    folder = os.environ.get("FEATADAPT_CUTLASS_INCLUDE")
    if folder is None:
        spec = importlib.util.find_spec("cutlass_library")
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        folder = os.path.join(locations[0], "source", "include") if locations else ""
    if not os.path.exists(os.path.join(folder, "cutlass", "cutlass.h")):
        where = f" (looked in {folder!r})" if folder else ""
        raise RuntimeError(f"featadapt setup: {CUTLASS_MISSING}{where}")
    return os.path.abspath(folder)


def why_no_torch():
    """None when torch is importable at build time, else why not."""
    try:
        import torch  # noqa: F401
    except ImportError as error:
        return f"torch is not importable at build time ({error}); build with --no-build-isolation"
    return None


def why_no_cuda_build():
    """None when the CUDA kernels can be built here, else the reason they are not."""
    if os.environ.get("FEATADAPT_SKIP_CUDA_BUILD", "0") == "1":
        return "FEATADAPT_SKIP_CUDA_BUILD=1"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        return f"no CUDA toolkit found (CUDA_HOME={CUDA_HOME!r} has no include/cuda_runtime.h); set CUDA_HOME"
    return None


def write_build_config(archs, no_cuda_reason):
    """build/generated/featadapt_build_config.h: what this build decided, for
    the library to report (csrc/build_info.h); rewritten only when it changes,
    so an unchanged build does not recompile. Returns its folder."""
    text = (
        "// Written by setup.py for this build; csrc/build_info.h reads it.\n#pragma once\n"
        f"#define FEATADAPT_CUDA_ARCH_LIST {', '.join(a.replace('.', '') for a in archs)}\n"
        f"#define FEATADAPT_NO_CUDA_REASON {json.dumps(no_cuda_reason)}\n"
    )
    os.makedirs(GENERATED, exist_ok=True)
    path = os.path.join(GENERATED, "featadapt_build_config.h")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)
    return os.path.abspath(GENERATED)


def skip_extension():
    return os.environ.get("FEATADAPT_SKIP_EXTENSION", "0") == "1"


def cpu_extension(why_no_cuda):
    """featadapt._C with the CPU kernel alone: a C++ compiler and torch's headers suffice."""
    from torch.utils.cpp_extension import CppExtension

    _note(f"building featadapt._C with the CPU kernel only: {why_no_cuda}")
    generated = write_build_config([], why_no_cuda)
    debug = os.environ.get("FEATADAPT_DEBUG", "0") == "1"
    return CppExtension(
        name="featadapt._C",
        sources=CPU_SOURCES,
        include_dirs=[generated],
        # (no OpenMP: the CPU kernel's threads are torch's, through the stable parallel_for)
        extra_compile_args=(["-O0", "-g"] if debug else ["-O3"]) + STABLE_ABI,
        py_limited_api=True,
    )


def cuda_extension():
    """featadapt._C with the CPU kernel and the CUDA kernels."""
    from torch.utils.cpp_extension import CUDAExtension

    archs = cuda_archs(os.environ.get("FEATADAPT_CUDA_ARCHS", DEFAULT_ARCHS))
    debug = os.environ.get("FEATADAPT_DEBUG", "0") == "1"
    include = cutlass_include()
    generated = write_build_config(archs, "")
    _note(f"building featadapt._C for compute capabilities {', '.join(archs)} (CUTLASS from {include})")
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # (The C++ standard is torch's choice: its headers need their own.)
    # -DNDEBUG: CUTLASS's device asserts are calls, and a call between wgmma
    # instructions makes ptxas serialise them (its C7510 warning).
    nvcc = (["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo", "-DNDEBUG"]) + [
        "--expt-relaxed-constexpr",
        *gencode_flags(archs),
    ]
    if os.environ.get("FEATADAPT_PTXAS_VERBOSE", "0") == "1":
        nvcc += ["-Xptxas", "-v"]
    return CUDAExtension(
        name="featadapt._C",
        sources=SOURCES,
        include_dirs=[include, generated],
        extra_compile_args={"cxx": cxx + STABLE_ABI, "nvcc": nvcc},
        py_limited_api=True,
    )


def extension_modules():
    if skip_extension():
        _note("building the pure-Python package: FEATADAPT_SKIP_EXTENSION=1")
        return []
    why = why_no_torch()
    if why is not None:
        _note(f"building the pure-Python package: {why}")
        return []
    why_no_cuda = why_no_cuda_build()
    return [cpu_extension(why_no_cuda) if why_no_cuda is not None else cuda_extension()]


def build_commands():
    if skip_extension() or why_no_torch() is not None:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension}


def wheel_options():
    """An abi3 wheel when it carries the library (its only Python is the limited API)."""
    if skip_extension() or why_no_torch() is not None:
        return {}
    return {"bdist_wheel": {"py_limited_api": PYTHON_ABI3}}


setup(ext_modules=extension_modules(), cmdclass=build_commands(), options=wheel_options())
