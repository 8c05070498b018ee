"""Scaled GEMM (VeFA): y = (x ⊙ s + t) W0ᵀ + b, and its backward.

Forward: the scale and shift are applied, in float32, to each x tile as it is
loaded; the result is rounded to x's dtype once (as the torch backend does)
and fed to tl.dot; the bias is added in the epilogue.

Backward: one GEMM g = dy W0 per (row tile, K tile). Its epilogue writes
dx = g ⊙ s and, per row tile, the float32 column sums of x ⊙ g and g into a
(row tiles, K) buffer that torch then sums: ds and dt come out the same on
every run (no atomics) and g never goes to memory.

Pre-scaling W0 once instead of x (cheaper when tokens far outnumber output
features) is not implemented: the issue asks to decide it by measurement on a GPU.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import unit_stride, accumulate_dot, autotune, input_precision, launch_grid, m_bucket, output_tile, partial_block_m


@autotune(key=["M_BUCKET", "N", "K"])
@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
):
    _, rows, cols, row_ok, col_ok = output_tile(M, N, BLOCK_M, BLOCK_C, GROUP_M)

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D).to(tl.int64)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        x_tilde = x.to(tl.float32) * tl.load(scale_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_SHIFT:
            x_tilde += tl.load(shift_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        w = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x_tilde.to(x.dtype), w, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@autotune(key=["M_BUCKET", "N", "K"], with_block_m=False)
@triton.jit
def _backward_kernel(
    dy_ptr, w_ptr, x_ptr, scale_ptr, dx_ptr, dscale_part_ptr, dshift_part_ptr,
    M, N, K, M_BUCKET,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_xm, stride_xk, stride_dxm, stride_dxk,
    WRITE_DX: tl.constexpr, WRITE_DSCALE: tl.constexpr, WRITE_DSHIFT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Output tile: rows of M by columns of K; the reduction runs over N.
    pid_m, rows, cols, row_ok, col_ok = output_tile(M, K, BLOCK_M, BLOCK_C, GROUP_M)

    g = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    g = accumulate_dot(g, dy_ptr, w_ptr, rows, cols, row_ok, col_ok, N,
                       stride_dym, stride_dyn, stride_wn, stride_wk, BLOCK_D, INPUT_PRECISION)

    tile_ok = row_ok[:, None] & col_ok[None, :]
    if WRITE_DX:
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk,
                 (g * scale[None, :]).to(dx_ptr.dtype.element_ty), mask=tile_ok)
    # Rows past M have g = 0 (their dy was loaded as 0), so they add nothing.
    partial = pid_m.to(tl.int64) * K + cols
    if WRITE_DSCALE:
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=tile_ok, other=0.0)
        tl.store(dscale_part_ptr + partial, tl.sum(x.to(tl.float32) * g, axis=0), mask=col_ok)
    if WRITE_DSHIFT:
        tl.store(dshift_part_ptr + partial, tl.sum(g, axis=0), mask=col_ok)


@triton_op("featadapt::scaled_gemm", mutates_args={})
def scaled_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                scale: torch.Tensor, shift: Optional[torch.Tensor]) -> torch.Tensor:
    """y = (x ⊙ scale + shift) weightᵀ + bias for x (M, K), weight (N, K); y has x's dtype."""
    bias, scale, shift = unit_stride(bias, scale, shift)
    m, k = x.shape
    n = weight.shape[0]
    y = x.new_empty((m, n))
    if m * n == 0:
        return y
    wrap_triton(_forward_kernel)[launch_grid(m, n)](
        x, weight, bias, scale, shift, y,
        m, n, k, m_bucket(m),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, HAS_SHIFT=shift is not None, INPUT_PRECISION=input_precision(x.dtype),
    )
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
    n = weight.shape[0]
    block_m = partial_block_m(m)
    row_tiles = triton.cdiv(m, block_m)
    dx = x.new_empty((m, k) if need_dx else (0,))
    dscale_part = x.new_empty((row_tiles, k) if need_dscale else (0,), dtype=torch.float32)
    dshift_part = x.new_empty((row_tiles, k) if need_dshift else (0,), dtype=torch.float32)
    if m * k > 0 and (need_dx or need_dscale or need_dshift):
        wrap_triton(_backward_kernel)[launch_grid(m, k)](
            dy, weight, x, scale, dx, dscale_part, dshift_part,
            m, n, k, m_bucket(m),
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), x.stride(0), x.stride(1),
            k, 1,
            WRITE_DX=need_dx, WRITE_DSCALE=need_dscale, WRITE_DSHIFT=need_dshift,
            INPUT_PRECISION=input_precision(x.dtype), BLOCK_M=block_m,
        )
    # A fixed-order sum over the row tiles: the same bits on every run.
    dscale = dscale_part.sum(0) if need_dscale else dscale_part
    dshift = dshift_part.sum(0) if need_dshift else dshift_part
    return dx, dscale, dshift
