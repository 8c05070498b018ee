"""Launchers for the indexed kernels of indexed_jit.py, registered as torch
custom ops: featadapt::indexed_scaled_gemm, featadapt::indexed_shrink and
featadapt::indexed_low_rank_gemm. Every op takes x flattened to (M, K) and
ids (M,) int64 with -1 for rows without an adapter; rows need not be sorted.
"""

from typing import Optional

import torch
import triton
from torch.library import triton_op, wrap_triton

from . import INTERPRET, autotune, input_precision, launch_grid, m_bucket, unit_stride
from . import indexed_jit

_vefa_forward = autotune(key=["M_BUCKET", "N", "K"])(indexed_jit.vefa_forward)
_low_rank_forward = autotune(key=["M_BUCKET", "N", "K", "R"])(indexed_jit.low_rank_forward)

# shrink: one program per (row tile, rank); a short row tile, a long reduction step.
_SHRINK_BLOCKS = (16, 16) if INTERPRET else (32, 128)


@triton_op("featadapt::indexed_scaled_gemm", mutates_args={})
def indexed_scaled_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        scale: torch.Tensor, shift: Optional[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """y_i = (x_i ⊙ scale[a] + shift[a]) weightᵀ + bias with a = ids[i] (x_i weightᵀ + bias for -1);
    scale and shift (n, K); y has x's dtype."""
    (bias,) = unit_stride(bias)
    m, k = x.shape
    n = weight.shape[0]
    y = x.new_empty((m, n))
    if m * n == 0:
        return y
    shift_strides = (shift.stride(0), shift.stride(1)) if shift is not None else (0, 0)
    wrap_triton(_vefa_forward)[launch_grid(m, n)](
        x, weight, bias, scale, shift, ids, y,
        m, n, k, m_bucket(m),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), scale.stride(0), scale.stride(1),
        *shift_strides, y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, HAS_SHIFT=shift is not None, INPUT_PRECISION=input_precision(x.dtype),
    )
    return y


@triton_op("featadapt::indexed_shrink", mutates_args={})
def indexed_shrink(x: torch.Tensor, lora_A: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """u_i = lora_A[a] x_i with a = ids[i] (0 for -1): x (M, K), lora_A (n, r, K);
    u (M, r) in x's dtype, accumulated in float32."""
    m, k = x.shape
    r = lora_A.shape[1]
    u = x.new_empty((m, r))
    if m * r == 0:
        return u
    block_m, block_d = _SHRINK_BLOCKS
    wrap_triton(indexed_jit.shrink)[(triton.cdiv(m, block_m), r)](
        x, lora_A, ids, u,
        m, k,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), lora_A.stride(2), u.stride(0), u.stride(1),
        BLOCK_M=block_m, BLOCK_D=block_d,
    )
    return u


@triton_op("featadapt::indexed_low_rank_gemm", mutates_args={})
def indexed_low_rank_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], u: torch.Tensor,
                          lora_B: torch.Tensor, scaling: torch.Tensor, ids: torch.Tensor, lorfa: bool
                          ) -> torch.Tensor:
    """Per row i with a = ids[i] (no low-rank term for -1), u (M, r) from indexed_shrink
    and scaling (n,):
    LoRFA (lorfa=True, lora_B (n, K, r)): y_i = (x_i + scaling[a] · lora_B[a] u_i) weightᵀ + bias;
    LoRA (lora_B (n, N, r)): y_i = x_i weightᵀ + bias + scaling[a] · lora_B[a] u_i.
    y has x's dtype."""
    (bias,) = unit_stride(bias)
    m, k = x.shape
    n = weight.shape[0]
    r = u.shape[1]
    y = x.new_empty((m, n))
    if m * n == 0:
        return y
    wrap_triton(_low_rank_forward)[launch_grid(m, n)](
        x, weight, bias, u, lora_B, scaling, ids, y,
        m, n, k, r, m_bucket(m),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), u.stride(0), u.stride(1),
        lora_B.stride(0), lora_B.stride(1), lora_B.stride(2), y.stride(0), y.stride(1),
        LORFA=lorfa, HAS_BIAS=bias is not None, INPUT_PRECISION=input_precision(x.dtype),
    )
    return y
