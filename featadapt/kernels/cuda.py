"""The CUDA C++ kernels (csrc/), compiled into the extension featadapt._C:
CUTLASS GEMMs (sm_90a and sm_80) with featadapt's epilogues.

Loading an extension built with CUDA (featadapt.kernels.extension) registers
the ops featadapt::cuda_scaled_gemm, cuda_scaled_gemm_backward,
cuda_low_rank_gemm, cuda_low_rank_gemm_dx and cuda_low_rank_dy_grads for CUDA
tensors, and cuda_plan, which asks CUTLASS whether it can run a problem
without running anything (csrc/cuda_ops.cpp). This module registers the ops'
fake implementations (so torch.compile(fullgraph=True) can trace through
them) and presents them with the triton kernels' signatures. `IMPORT_ERROR`
says why they are missing (no extension, or one built without CUDA).
"""

import torch

from .extension import CUDA_ARCHS, LOAD_ERROR, NO_CUDA_REASON, NOT_BUILT, _C  # noqa: F401  (NOT_BUILT: re-exported)

OP_NAMES = (
    "cuda_scaled_gemm",
    "cuda_scaled_gemm_backward",
    "cuda_low_rank_gemm",
    "cuda_low_rank_gemm_dx",
    "cuda_low_rank_dy_grads",
)

if LOAD_ERROR is not None:
    IMPORT_ERROR = LOAD_ERROR
elif NO_CUDA_REASON is not None:
    IMPORT_ERROR = (f"featadapt._C was built without its CUDA kernels ({NO_CUDA_REASON}): rebuild it with a CUDA "
                    "toolkit (CUDA_HOME) and a CUDA build of torch (see docs/cuda-extension.md)")
else:
    IMPORT_ERROR = None


def _ops():
    return torch.ops.featadapt


# -- fake implementations: output shapes and dtypes only -----------------------

if IMPORT_ERROR is None:

    @torch.library.register_fake("featadapt::cuda_scaled_gemm")
    def _(x, weight, bias, scale, shift):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("featadapt::cuda_scaled_gemm_backward")
    def _(dy, x, weight, scale, need_dx, need_dscale, need_dshift):
        k = x.shape[1]
        return (
            x.new_empty(x.shape if need_dx else (0,)),
            x.new_empty((k,) if need_dscale else (0,), dtype=torch.float32),
            x.new_empty((k,) if need_dshift else (0,), dtype=torch.float32),
        )

    @torch.library.register_fake("featadapt::cuda_low_rank_gemm")
    def _(x, weight, bias, u, c):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("featadapt::cuda_low_rank_gemm_dx")
    def _(dy, weight, du, a, keep, keep_scale):
        return dy.new_empty((dy.shape[0], weight.shape[1]))

    @torch.library.register_fake("featadapt::cuda_low_rank_dy_grads")
    def _(dy, u, c, scaling, need_du, need_dc):
        m, n = dy.shape
        r = u.shape[1]
        return (
            dy.new_empty((m, r) if need_du else (0,), dtype=torch.float32),
            dy.new_empty((n, r) if need_dc else (0,), dtype=torch.float32),
        )


# -- the kernel set, with the triton kernels' signatures (featadapt/ops/fused.py)


def _float32(t):
    return None if t is None else t.to(torch.float32)


def scaled_gemm(x, weight, bias, scale, shift):
    # The kernels read the (K,) scale and shift as float32, whatever the adapter's dtype.
    return _ops().cuda_scaled_gemm(x, weight, bias, _float32(scale), _float32(shift))


def scaled_gemm_backward(dy, x, weight, scale, need_dx, need_dscale, need_dshift):
    return _ops().cuda_scaled_gemm_backward(dy, x, weight, _float32(scale), need_dx, need_dscale, need_dshift)


def low_rank_gemm(x, weight, bias, u, c):
    return _ops().cuda_low_rank_gemm(x, weight, bias, u, c)


def low_rank_gemm_dx(dy, weight, du, a, keep, keep_scale):
    return _ops().cuda_low_rank_gemm_dx(dy, weight, du, a, keep, keep_scale)


def low_rank_dy_grads(dy, u, c, scaling, need_du, need_dc):
    return _ops().cuda_low_rank_dy_grads(dy, u, c, scaling, need_du, need_dc)


PLAN_OPS = ("vefa_forward", "vefa_backward", "low_rank_forward", "low_rank_dx")


def plan(op, capability, dtype, m, n, k, x_row_stride=None):
    """What CUTLASS says of one GEMM of an op before anything runs, with no GPU
    needed: "" when its kernel for `capability` (80 or 90) can run it, else why
    not. x is (m, k) with rows x_row_stride apart (default k), the weight (n, k);
    for the backward ops the same sizes describe the forward they differentiate."""
    if IMPORT_ERROR is not None:
        raise RuntimeError(IMPORT_ERROR)
    row = k if x_row_stride is None else x_row_stride
    if op in ("vefa_backward", "low_rank_dx"):
        row = n if x_row_stride is None else x_row_stride  # dy (m, n) is what the GEMM reads
    return _ops().cuda_plan(op, capability, dtype, m, n, k, row)
