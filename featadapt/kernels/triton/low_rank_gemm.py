"""Low-rank-augmented GEMM (LoRA and LoRFA) as torch custom ops: the forward,
the dx of backward and du/dC from one read of dy. The kernels and what they
compute: jit/low_rank_gemm.py."""

from typing import Optional, Tuple

import torch
from torch.library import triton_op

from . import INTERPRET, TunedKernel, allow_tf32, launch_grid, tile_configs, unit_stride
from .jit import low_rank_gemm as jit
from .jit.configs import dy_grads_configs

_forward = TunedKernel("low_rank_gemm_forward", jit.forward_kernel, tile_configs(),
                       key=["M_BUCKET", "N", "K", "R"], operand="x_ptr", few_tokens=True)
_dx = TunedKernel("low_rank_gemm_dx", jit.dx_kernel, tile_configs(),
                  key=["M_BUCKET", "N", "K", "R"], operand="dy_ptr", few_tokens=True)
_dy_grads = TunedKernel("low_rank_dy_grads", jit.dy_grads_kernel, dy_grads_configs(),
                        key=["M_BUCKET", "N", "R", "M_CHUNK"], operand="dy_ptr")


@triton_op("featadapt::low_rank_gemm", mutates_args={})
def low_rank_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """y = x weightᵀ + u cᵀ + bias for x (M, K), weight (N, K), u (M, r), c (N, r),
    all of x's dtype (c already carries γ); y has x's dtype."""
    (bias,) = unit_stride(bias)
    m = x.shape[0]
    n = c.shape[0]
    y = x.new_empty((m, n))
    if m * n == 0:
        return y
    _forward.launch(launch_grid(m, n), jit.forward_args(x, weight, bias, u, c, y, allow_tf32()))
    return y


@triton_op("featadapt::low_rank_gemm_dx", mutates_args={})
def low_rank_gemm_dx(dy: torch.Tensor, weight: torch.Tensor, du: torch.Tensor, a: torch.Tensor,
                     keep: Optional[torch.Tensor], keep_scale: float) -> torch.Tensor:
    """dx = dy weight + (du a) ⊙ keep · keep_scale (without keep: dy weight + du a).

    dy (M, N), weight (N, K), du (M, r), a (r, K), of one dtype, and the
    keep mask (M, K) of dropout; dx has dy's dtype.
    """
    m = dy.shape[0]
    k = weight.shape[1]
    dx = dy.new_empty((m, k))
    if m * k == 0:
        return dx
    _dx.launch(launch_grid(m, k), jit.dx_args(dy, weight, du, a, keep, keep_scale, dx, allow_tf32()))
    return dx


def _sm_count(device):
    return 1 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count


@triton_op("featadapt::low_rank_dy_grads", mutates_args={})
def low_rank_dy_grads(dy: torch.Tensor, u: torch.Tensor, c: torch.Tensor, scaling: float,
                      need_du: bool, need_dc: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(du, dc) = (dy c, scaling · dyᵀ u), reading dy once for both.

    dy (M, N), u (M, r) and c (N, r), of one dtype; c already carries γ (as in
    low_rank_gemm), so scaling = γ applies to dc only; c is read only when du
    is asked for. Both come out float32, each empty unless asked for.
    """
    m, n = dy.shape
    r = u.shape[1]
    sm_count = _sm_count(dy.device)
    du_shape, dc_shape = jit.dy_grads_partial_shapes(m, n, r, sm_count)
    du_part = dy.new_empty(du_shape if need_du else (0,), dtype=torch.float32)
    dc_part = dy.new_empty(dc_shape if need_dc else (0,), dtype=torch.float32)
    if m * n * r > 0 and (need_du or need_dc):
        grid, args = jit.dy_grads_args(dy, u, c, scaling, du_part if need_du else None,
                                       dc_part if need_dc else None, sm_count, allow_tf32())
        _dy_grads.launch(grid, args)
    # Fixed-order sums over the column tiles and the row chunks: the same bits on every run.
    du = du_part.sum(0) if need_du else du_part
    dc = dc_part.sum(0) if need_dc else dc_part
    return du, dc


