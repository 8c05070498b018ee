"""Low-rank-augmented GEMM (LoRA and LoRFA), forward and the dx of backward.

Both methods take the form y = x W0ᵀ + u Cγᵀ + b with u = x̂ Aᵀ (M×r) and
Cγ = γ·B (LoRA) or γ·W0 B (LoRFA), N×r (DESIGN.md §1); the callers compute u
and Cγ with small torch GEMMs.

Forward: one accumulator over the concatenated reduction [x | u]·[W0 | Cγ]ᵀ:
the loop over K, then the loop over r, then the bias.

dx = dy W0 + dropout_bwd(du A): one kernel, the loop over N, then the loop
over r. Without dropout both go into one accumulator; with it, the low-rank
part gets its own and is multiplied by the keep mask (scaled by 1/(1-p))
before it is added.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import accumulate_dot, autotune, grouped_tile, input_precision, launch_grid, m_bucket, rank_block


@autotune(key=["M_BUCKET", "N", "K", "R"])
@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, u_ptr, c_ptr, bias_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_um, stride_ur, stride_cn, stride_cr,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_C, GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < M
    col_ok = cols < N

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    acc = accumulate_dot(acc, x_ptr, w_ptr, rows, cols, row_ok, col_ok, K,
                         stride_xm, stride_xk, stride_wk, stride_wn, BLOCK_D, INPUT_PRECISION)
    acc = accumulate_dot(acc, u_ptr, c_ptr, rows, cols, row_ok, col_ok, R,
                         stride_um, stride_ur, stride_cr, stride_cn, BLOCK_R, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@autotune(key=["M_BUCKET", "N", "K", "R"])
@triton.jit
def _dx_kernel(
    dy_ptr, w_ptr, du_ptr, a_ptr, keep_ptr, dx_ptr,
    M, N, K, R, M_BUCKET, keep_scale,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dum, stride_dur, stride_ar, stride_ak,
    stride_keepm, stride_keepk, stride_dxm, stride_dxk,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Output tile: rows of M by columns of K; the reductions run over N and r.
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_C, GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < M
    col_ok = cols < K
    tile_ok = row_ok[:, None] & col_ok[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    acc = accumulate_dot(acc, dy_ptr, w_ptr, rows, cols, row_ok, col_ok, N,
                         stride_dym, stride_dyn, stride_wn, stride_wk, BLOCK_D, INPUT_PRECISION)
    if HAS_DROPOUT:
        low_rank = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        low_rank = accumulate_dot(low_rank, du_ptr, a_ptr, rows, cols, row_ok, col_ok, R,
                                  stride_dum, stride_dur, stride_ar, stride_ak, BLOCK_R, INPUT_PRECISION)
        keep = tl.load(keep_ptr + rows[:, None] * stride_keepm + cols[None, :] * stride_keepk,
                       mask=tile_ok, other=0.0)
        acc += low_rank * (keep.to(tl.float32) * keep_scale)
    else:
        acc = accumulate_dot(acc, du_ptr, a_ptr, rows, cols, row_ok, col_ok, R,
                             stride_dum, stride_dur, stride_ar, stride_ak, BLOCK_R, INPUT_PRECISION)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=tile_ok)


@triton_op("featadapt::low_rank_gemm", mutates_args={})
def low_rank_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """y = x weightᵀ + u cᵀ + bias for x (M, K), weight (N, K), u (M, r), c (N, r),
    all of x's dtype (c already carries γ); y has x's dtype."""
    m, k = x.shape
    n, r = c.shape
    y = x.new_empty((m, n))
    if m * n == 0:
        return y
    wrap_triton(_forward_kernel)[launch_grid(m, n)](
        x, weight, u, c, bias, y,
        m, n, k, r, m_bucket(m),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), u.stride(0), u.stride(1),
        c.stride(0), c.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, INPUT_PRECISION=input_precision(x.dtype), BLOCK_R=rank_block(r),
    )
    return y


@triton_op("featadapt::low_rank_gemm_dx", mutates_args={})
def low_rank_gemm_dx(dy: torch.Tensor, weight: torch.Tensor, du: torch.Tensor, a: torch.Tensor,
                     keep: Optional[torch.Tensor], keep_scale: float) -> torch.Tensor:
    """dx = dy weight + (du a) ⊙ keep · keep_scale (without keep: dy weight + du a).

    dy (M, N), weight (N, K), du (M, r), a (r, K), of one dtype, and the
    keep mask (M, K) of dropout; dx has dy's dtype.
    """
    m = dy.shape[0]
    n, k = weight.shape
    r = a.shape[0]
    dx = dy.new_empty((m, k))
    if m * k == 0:
        return dx
    keep_strides = (keep.stride(0), keep.stride(1)) if keep is not None else (0, 0)
    wrap_triton(_dx_kernel)[launch_grid(m, k)](
        dy, weight, du, a, keep, dx,
        m, n, k, r, m_bucket(m), keep_scale,
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), du.stride(0), du.stride(1),
        a.stride(0), a.stride(1), *keep_strides, dx.stride(0), dx.stride(1),
        HAS_DROPOUT=keep is not None, INPUT_PRECISION=input_precision(dy.dtype), BLOCK_R=rank_block(r),
    )
    return dx
