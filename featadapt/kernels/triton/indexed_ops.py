"""Launchers for the indexed kernels of jit/indexed.py, registered as torch
custom ops: featadapt::indexed_scaled_gemm, featadapt::indexed_shrink and
featadapt::indexed_low_rank_gemm. Every op takes x flattened to (M, K) and
ids (M,) int64 with -1 for rows without an adapter; rows need not be sorted.
"""

from typing import Optional

import torch
import triton
from torch.library import triton_op

from . import INTERPRET, TunedKernel, allow_tf32, launch_fixed, launch_grid, tile_configs, unit_stride
from .jit import indexed as jit
from .jit.configs import gather_tile_configs

_vefa_forward = TunedKernel("indexed_vefa_forward", jit.vefa_forward, gather_tile_configs(),
                            key=["M_BUCKET", "N", "K"], operand="x_ptr", few_tokens=True)
_low_rank_forward = TunedKernel("indexed_low_rank_forward", jit.low_rank_forward, tile_configs(),
                                key=["M_BUCKET", "N", "K", "R"], operand="x_ptr", few_tokens=True)
_SHRINK_BLOCKS = jit.SHRINK_INTERPRETER_BLOCKS if INTERPRET else jit.SHRINK_BLOCKS


@triton_op("featadapt::indexed_scaled_gemm", mutates_args={})
def indexed_scaled_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        scale: torch.Tensor, shift: Optional[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """y_i = (x_i ⊙ scale[a] + shift[a]) weightᵀ + bias with a = ids[i] (x_i weightᵀ + bias for -1);
    scale and shift (n, K); y has x's dtype."""
    (bias,) = unit_stride(bias)
    m = x.shape[0]
    n = weight.shape[0]
    y = x.new_empty((m, n))
    if m * n == 0:
        return y
    _vefa_forward.launch(launch_grid(m, n), jit.vefa_forward_args(x, weight, bias, scale, shift, ids, y, allow_tf32()))
    return y


@triton_op("featadapt::indexed_shrink", mutates_args={})
def indexed_shrink(x: torch.Tensor, lora_A: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """u_i = lora_A[a] x_i with a = ids[i] (0 for -1): x (M, K), lora_A (n, r, K);
    u (M, r) in x's dtype, accumulated in float32."""
    m = x.shape[0]
    r = lora_A.shape[1]
    u = x.new_empty((m, r))
    if m * r == 0:
        return u
    launch_fixed(jit.shrink, (triton.cdiv(m, _SHRINK_BLOCKS[0]), r), jit.shrink_args(x, lora_A, ids, u, _SHRINK_BLOCKS))
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
    m = x.shape[0]
    n = weight.shape[0]
    y = x.new_empty((m, n))
    if m * n == 0:
        return y
    args = jit.low_rank_forward_args(x, weight, bias, u, lora_B, scaling, ids, y, lorfa, allow_tf32())
    _low_rank_forward.launch(launch_grid(m, n), args)
    return y
