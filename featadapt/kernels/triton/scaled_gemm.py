"""Scaled GEMM (VeFA) as torch custom ops: y = (x ⊙ s + t) W0ᵀ + b, and its
backward. The kernels and what they compute: jit/scaled_gemm.py."""

from typing import Optional, Tuple

import torch
import triton
from torch.library import triton_op

from . import TunedKernel, allow_tf32, launch_grid, partial_block_m, tile_configs, unit_stride
from .jit import scaled_gemm as jit

_forward = TunedKernel("scaled_gemm_forward", jit.forward_kernel, tile_configs(),
                       key=["M_BUCKET", "N", "K"], operand="x_ptr", few_tokens=True)
_backward = TunedKernel("scaled_gemm_backward", jit.backward_kernel, tile_configs(with_block_m=False),
                        key=["M_BUCKET", "N", "K"], operand="dy_ptr")


@triton_op("featadapt::scaled_gemm", mutates_args={})
def scaled_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                scale: torch.Tensor, shift: Optional[torch.Tensor]) -> torch.Tensor:
    """y = (x ⊙ scale + shift) weightᵀ + bias for x (M, K), weight (N, K); y has x's dtype."""
    bias, scale, shift = unit_stride(bias, scale, shift)
    m = x.shape[0]
    n = weight.shape[0]
    y = x.new_empty((m, n))
    if m * n == 0:
        return y
    _forward.launch(launch_grid(m, n), jit.forward_args(x, weight, bias, scale, shift, y, allow_tf32()))
    return y


@triton_op("featadapt::scaled_gemm_backward", mutates_args={})
def scaled_gemm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                         need_dx: bool, need_dscale: bool, need_dshift: bool
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dscale, dshift) of scaled_gemm for the output gradient dy (M, N).

    dx has x's dtype; dscale and dshift are float32 (K,). Each is empty
    unless asked for.
    """
    (scale,) = unit_stride(scale)
    m, k = x.shape
    row_tiles = triton.cdiv(m, partial_block_m(m))
    dx = x.new_empty((m, k) if need_dx else (0,))
    dscale_part = x.new_empty((row_tiles, k) if need_dscale else (0,), dtype=torch.float32)
    dshift_part = x.new_empty((row_tiles, k) if need_dshift else (0,), dtype=torch.float32)
    if m * k > 0 and (need_dx or need_dscale or need_dshift):
        args = jit.backward_args(dy, x, weight, scale, dx if need_dx else None,
                                 dscale_part if need_dscale else None, dshift_part if need_dshift else None,
                                 allow_tf32())
        _backward.launch(launch_grid(m, k), args)
    # A fixed-order sum over the row tiles: the same bits on every run.
    dscale = dscale_part.sum(0) if need_dscale else dscale_part
    dshift = dshift_part.sum(0) if need_dshift else dshift_part
    return dx, dscale, dshift
