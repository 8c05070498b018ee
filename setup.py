"""Build script: the Python package, plus the CUDA extension featadapt._C
(the kernels in csrc/) when a CUDA toolkit and a CUDA build of torch are there.
The GEMMs are CUTLASS's: its headers come from the nvidia-cutlass package
(`pip install --no-deps nvidia-cutlass`, pinned in requirements/build-files.in).

Without them the package installs as pure Python and the `cuda` backend says
why it is unavailable (`python -m featadapt.info`). Build with
`pip install --no-build-isolation .` so the build sees the installed torch.

Environment:
  FEATADAPT_CUDA_ARCHS        compute capabilities to compile for, e.g. "9.0" or
                              "8.0;9.0" (default "8.0;9.0"): 8.x builds CUTLASS's
                              Ampere kernels (with PTX for the lowest, which newer
                              GPUs JIT-compile), 9.0 its Hopper ones (sm_90a)
  FEATADAPT_CUTLASS_INCLUDE   CUTLASS's include folder (default: the one the
                              installed nvidia-cutlass package ships)
  FEATADAPT_SKIP_CUDA_BUILD=1 build the pure-Python package even with a toolkit
  FEATADAPT_DEBUG=1           device debug info (-G) and no optimisation
  FEATADAPT_PTXAS_VERBOSE=1   ptxas prints each kernel's registers, spills, stack and shared
                              memory (-Xptxas -v); tools/cuda_resources.py reads the same
                              numbers back from the built extension
  MAX_JOBS                    parallel compile jobs (torch's ninja build reads it)
  CUDA_HOME                   the toolkit; torch's guess from nvcc's location can be wrong
"""

import glob
import importlib.util
import os
import re
import sys

from setuptools import setup

DEFAULT_ARCHS = "8.0;9.0"
SUPPORTED_ARCHS = ("8.0", "8.6", "8.7", "8.9", "9.0")
SOURCES = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))


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
    "or point FEATADAPT_CUTLASS_INCLUDE at a CUTLASS include folder, or build without the extension "
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


def why_no_cuda_build():
    """None when the extension can be built here, else the reason it is not."""
    if os.environ.get("FEATADAPT_SKIP_CUDA_BUILD", "0") == "1":
        return "FEATADAPT_SKIP_CUDA_BUILD=1"
    if not SOURCES:
        return "no sources in csrc/"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as error:
        return f"torch is not importable at build time ({error}); build with --no-build-isolation"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        return f"no CUDA toolkit found (CUDA_HOME={CUDA_HOME!r} has no include/cuda_runtime.h); set CUDA_HOME"
    return None


def extension_modules():
    why = why_no_cuda_build()
    if why is not None:
        _note(f"building without the CUDA extension: {why}")
        return []
    from torch.utils.cpp_extension import CUDAExtension

    archs = cuda_archs(os.environ.get("FEATADAPT_CUDA_ARCHS", DEFAULT_ARCHS))
    debug = os.environ.get("FEATADAPT_DEBUG", "0") == "1"
    arch_list = ",".join(a.replace(".", "") for a in archs)
    include = cutlass_include()
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
    return [
        CUDAExtension(
            name="featadapt._C",
            sources=SOURCES,
            include_dirs=[include],
            # For ops.cpp (c++) only: nvcc splits a -D value at commas, and torch
            # 2.11 hands define_macros to nvcc too ("macro names must be identifiers").
            # -fopenmp: at::parallel_for in the CPU kernels runs its threads
            # only when compiled with OpenMP (else it is a serial loop); the
            # extension then shares the OpenMP runtime torch has loaded.
            extra_compile_args={"cxx": [*cxx, "-fopenmp", f"-DFEATADAPT_CUDA_ARCH_LIST={arch_list}"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    ]


def build_commands():
    if why_no_cuda_build() is not None:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension}


setup(ext_modules=extension_modules(), cmdclass=build_commands())
