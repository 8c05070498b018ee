"""The `triton` backend: the fused autograd Functions (fused.py) over the
Triton kernels.

The kernels live in featadapt.kernels.triton and are registered as torch
custom ops (featadapt::scaled_gemm, ...). They run on CUDA tensors, or on CPU
tensors under TRITON_INTERPRET=1 (set before importing featadapt), which is
how the tests check them without a GPU; automatic dispatch never sends CPU
tensors to the interpreter, only backend="triton" does. On CUDA, automatic
dispatch picks it only where the dispatch table lists a measurement
(dispatch_table.py).

Calls with adapter_index= (many adapters in one batch) run the indexed forward
kernels (featadapt.kernels.triton.indexed_ops) and the torch backend's
backward (triton_indexed.py).
"""

import torch

from .dispatch import Backend  # dispatch imports this module last, once Backend exists
from .fused import KernelSet, dtype_reasons, float64_refusal, fused_ops
from .kernel_fallback import with_fallback
from .triton_indexed import indexed_fused_ops

try:
    from ..kernels.triton import INTERPRET
    from ..kernels.triton.low_rank_gemm import low_rank_dy_grads, low_rank_gemm, low_rank_gemm_dx
    from ..kernels.triton.scaled_gemm import scaled_gemm, scaled_gemm_backward
    from ..kernels.triton import indexed_ops as INDEXED_KERNELS
except Exception as error:  # a missing or broken triton must not break `import featadapt`
    _IMPORT_ERROR = f"triton is not importable ({type(error).__name__}: {error})"
    KERNELS = INDEXED_KERNELS = None
else:
    _IMPORT_ERROR = None
    KERNELS = KernelSet(scaled_gemm, scaled_gemm_backward, low_rank_gemm, low_rank_gemm_dx, low_rank_dy_grads)

FLOAT64 = float64_refusal("triton")

# -- what it can run -----------------------------------------------------------


def unavailable_reason():
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not INTERPRET and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU for testing)"
    return None


def not_supported_reasons(op, tensors):
    present = [t for t in tensors if t is not None]
    reasons = []
    device = present[0].device
    if device.type != "cuda" and not (INTERPRET and device.type == "cpu"):
        reasons.append(f"tensors on {device.type} are not supported: the kernels run on CUDA "
                       "(or on CPU under TRITON_INTERPRET=1, for testing)")
    reasons += dtype_reasons("triton", present)
    if INTERPRET and any(t.dtype == torch.bfloat16 for t in present):
        reasons.append("bfloat16 arithmetic is wrong in Triton's CPU interpreter; run on a CUDA device")
    return reasons


def auto_skip_reasons(op, tensors):
    if tensors[0].device.type == "cpu":
        return ["CPU tensors run the kernels in Triton's interpreter, for testing only: "
                "ask for backend='triton' by name"]
    return []


BACKEND = Backend(
    name="triton",
    summary="fused Triton kernels; CUDA (CPU only under TRITON_INTERPRET=1, by name)",
    ops={**fused_ops(KERNELS), **indexed_fused_ops(INDEXED_KERNELS)},
    auto_priority=10,
    unavailable_reason=unavailable_reason,
    not_supported_reasons=not_supported_reasons,
    auto_skip_reasons=auto_skip_reasons,
    needs_measurement=True,
    auto_ops={**fused_ops(with_fallback("triton", KERNELS)),
              **indexed_fused_ops(with_fallback("triton", INDEXED_KERNELS))},
)
