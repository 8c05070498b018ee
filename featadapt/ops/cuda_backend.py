"""The `cuda` backend: the fused autograd Functions (fused.py) over the CUDA
C++ kernels of csrc/ (featadapt.kernels.cuda): CUTLASS GEMMs with
featadapt's epilogues, sm_90a kernels on Hopper and sm_80 ones elsewhere.

Automatic dispatch picks it only where the dispatch table lists a
measurement that shows it correct and faster (dispatch_table.py); its
kernels have not yet run on a GPU (docs/cuda-extension.md).

What CUTLASS cannot take is reported here, before anything launches
(`layout_reasons`), and `make test` checks it against the extension's own
plan (CUTLASS's can_implement, `kernels.plan`): 16-bit dtypes only, K and N
multiples of 8, x row-major with 16-byte rows, a contiguous weight.
"""

import torch

from ..kernels import cuda as kernels
from .dispatch import Backend  # dispatch imports this module last, once Backend exists
from .fused import KernelSet, dtype_reasons, fused_ops
from .kernel_fallback import with_fallback

KERNELS = KernelSet(
    kernels.scaled_gemm,
    kernels.scaled_gemm_backward,
    kernels.low_rank_gemm,
    kernels.low_rank_gemm_dx,
    kernels.low_rank_dy_grads,
)


def unavailable_reason():
    if kernels.IMPORT_ERROR is not None:
        return kernels.IMPORT_ERROR
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def runs_on_capability(capability, built):
    """None when an extension built for `built` (e.g. (80, 90)) has kernels for a
    GPU of `capability` (e.g. 90), else why not. sm_90a code runs on 9.0 only;
    the sm_80 kernels run on any later GPU (cubins within 8.x, PTX beyond)."""
    if not built:
        return None
    ampere = [a for a in built if 80 <= a < 90]
    if (capability == 90 and 90 in built) or (ampere and capability >= min(ampere)):
        return None
    listed = ", ".join(f"{a // 10}.{a % 10}" for a in built)
    wanted = f"{capability // 10}.{capability % 10}" if capability < 90 else "8.0"
    return (f"featadapt._C was compiled for compute capabilities {listed}, which have no kernels for "
            f"{capability // 10}.{capability % 10}: rebuild with FEATADAPT_CUDA_ARCHS={wanted}")


def _runs_on(device):
    major, minor = torch.cuda.get_device_capability(device)
    return runs_on_capability(10 * major + minor, kernels.CUDA_ARCHS)


CUTLASS_DTYPES = (torch.float16, torch.bfloat16)
ALIGNMENT = 8  # elements of a 16-bit dtype in 16 bytes: TMA's and cp.async's row unit


def _aligned(t):
    # The allocator's blocks start 16-byte aligned (512 in practice), so the
    # offset decides; unlike data_ptr() this also works on fake tensors.
    return t.storage_offset() * t.element_size() % 16 == 0


def dtype_reasons_16bit(tensors):
    """Why the CUTLASS kernels cannot take these dtypes ([] when they can)."""
    reasons = dtype_reasons("cuda", tensors)
    if reasons:
        return reasons
    activation = tensors[0].dtype
    if activation not in CUTLASS_DTYPES:
        return [f"{activation} activations run on backend='torch': the cuda backend's CUTLASS kernels "
                "multiply float16 or bfloat16 (TF32 would change float32's numerics)"]
    return []


def layout_reasons(x, weight):
    """Why CUTLASS's kernels cannot take x (..., K) and weight (N, K) as they
    are laid out ([] when they can). Device-free: the tests compare it with
    the extension's plan (CUTLASS's can_implement) on any machine."""
    n, k = weight.shape
    reasons = []
    need = (f"is not a multiple of {ALIGNMENT}: CUTLASS's kernels move 16-byte rows "
            f"({ALIGNMENT} elements of a 16-bit dtype)")
    if k % ALIGNMENT:
        reasons.append(f"K = {k} {need}")
    if n % ALIGNMENT:
        reasons.append(f"N = {n} {need}")
    row_major = x.is_contiguous() or (x.dim() == 2 and x.stride(1) == 1 and x.stride(0) % ALIGNMENT == 0)
    if not row_major:
        reasons.append(f"x (shape {tuple(x.shape)}, strides {x.stride()}) is not row-major with 16-byte rows: "
                       "the kernels would need a copy of it")
    if not weight.is_contiguous():
        reasons.append(f"weight (strides {weight.stride()}) is not contiguous: the kernels would need a copy "
                       "of it on every call (a transposed view, e.g. GPT-2's Conv1D, runs on torch)")
    for name, t in (("x", x), ("weight", weight)):
        if not _aligned(t):
            reasons.append(f"{name} starts {t.storage_offset()} elements into its storage, not at a 16-byte "
                           "boundary (TMA needs one)")
    return reasons


def not_supported_reasons(op, tensors):
    present = [t for t in tensors if t is not None]
    reasons = []
    device = present[0].device
    if device.type != "cuda":
        reasons.append(f"tensors on {device.type} are not supported: the kernels run on CUDA")
    else:
        why = _runs_on(device)
        if why is not None:
            reasons.append(why)
    reasons += dtype_reasons_16bit(present)
    if op in ("vefa", "lorfa", "lora"):
        reasons += layout_reasons(tensors[0], tensors[1])
    return reasons


BACKEND = Backend(
    name="cuda",
    summary="fused CUDA C++ kernels (the featadapt._C extension); CUDA",
    ops=fused_ops(KERNELS),
    auto_ops=fused_ops(with_fallback("cuda", KERNELS)),
    needs_measurement=True,
    auto_priority=5,
    unavailable_reason=unavailable_reason,
    not_supported_reasons=not_supported_reasons,
)
