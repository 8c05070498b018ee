"""The compiled extension featadapt._C (csrc/), loaded once for the CPU and
the CUDA kernels.

A source build has the CPU kernel wherever torch was importable at build
time, and the CUDA kernels where a CUDA toolkit and a CUDA build of torch
were there too (setup.py). `LOAD_ERROR` says why the library is missing or
does not load; `NO_CUDA_REASON` why a loaded library has no CUDA kernels.
"""

import importlib.util

NOT_BUILT = (
    "the extension featadapt._C is not built: install from source with torch importable "
    "(pip install --no-build-isolation .) and without FEATADAPT_SKIP_EXTENSION=1; its CUDA kernels also "
    "need a CUDA toolkit (CUDA_HOME) and a CUDA build of torch (see docs/cuda-extension.md)"
)


def _load():
    """(the extension module, None) or (None, why it is not there)."""
    if importlib.util.find_spec("featadapt._C") is None:
        return None, NOT_BUILT
    try:
        from .. import _C
    except ImportError as error:
        return None, load_failure(error)
    return _C, None


def load_failure(error):
    """What to say when the built library does not load, and what to do."""
    if any(name in str(error) for name in ("libtorch_cuda", "libc10_cuda", "libcudart")):
        advice = ("it was built with CUDA and this torch has no CUDA libraries: install a CUDA build of torch, "
                  "or build featadapt here (with a CPU-only torch the build makes the CPU kernel alone)")
    else:  # e.g. a torch older than 2.10, whose stable ABI lacks what the library calls
        advice = "rebuild it against this torch (it needs torch 2.10 or newer)"
    return f"featadapt._C is built but does not load ({error}): {advice}"


_C, LOAD_ERROR = _load()
CUDA_ARCHS = tuple(getattr(_C, "cuda_archs", ()))  # compute capabilities of its CUDA kernels, e.g. (80, 90)
NO_CUDA_REASON = None if _C is None or CUDA_ARCHS else getattr(_C, "no_cuda_reason", "") or "unknown"
