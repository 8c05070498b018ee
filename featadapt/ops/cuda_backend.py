"""The `cuda` backend: the fused autograd Functions (fused.py) over the CUDA
C++ kernels of csrc/ (featadapt.kernels.cuda).

Automatic dispatch picks it only where the dispatch table lists a
measurement that shows it correct and faster (dispatch_table.py); its
kernels have not yet run on a GPU (README, "CUDA extension").
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


def _runs_on(device):
    """None when the extension has code for this GPU, else why not. PTX of the
    newest built architecture lets newer GPUs compile it at load time."""
    major, minor = torch.cuda.get_device_capability(device)
    capability = 10 * major + minor
    built = kernels.CUDA_ARCHS
    if not built or capability in built or capability > max(built):
        return None
    listed = ", ".join(f"{a // 10}.{a % 10}" for a in built)
    return (f"featadapt._C was compiled for compute capabilities {listed}, not {major}.{minor}: "
            f"rebuild with FEATADAPT_CUDA_ARCHS={major}.{minor}")


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
    return reasons + dtype_reasons("cuda", present)


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
