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

du = dy Cγ and dC = γ dyᵀ u: one kernel that reads each dy tile once for
both. A program owns one column tile of dy (BLOCK_N columns of N) and one
chunk of rows; it adds dy_tileᵀ u_tile into its dC tile (float32, in
registers) and writes dy_tile Cγ_tile, its share of du, to a float32 buffer of
one (M, r) slice per column tile. Torch sums the du slices, and the dC
partials of the row chunks, in a fixed order: the same bits on every run, no
atomics. The rank is padded to a power of two ≥ 16 (tl.dot's minimum) and
masked, so any r works.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import INTERPRET, unit_stride, accumulate_dot, autotune, input_precision, launch_grid, m_bucket, output_tile, rank_block


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
    _, rows, cols, row_ok, col_ok = output_tile(M, N, BLOCK_M, BLOCK_C, GROUP_M)

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
    _, rows, cols, row_ok, col_ok = output_tile(M, K, BLOCK_M, BLOCK_C, GROUP_M)
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
    (bias,) = unit_stride(bias)
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


# BLOCK_N and the row chunk size the partial buffers, so the caller fixes them
# (below); only BLOCK_M and the pipelining are tuned. Every BLOCK_M divides
# the row chunk, so a chunk is a whole number of row tiles.
_DY_GRADS_TILES = [(32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 4, 3), (128, 8, 3), (128, 8, 4)]
_DY_GRADS_MAX_BLOCK_M = 128
# Interpreter: two row tiles per chunk and 16-wide column tiles, so the tests'
# small odd shapes get several chunks, tiles and masked tails.
_DY_GRADS_INTERPRETER_BLOCK_M = 16


def _dy_grads_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": _DY_GRADS_INTERPRETER_BLOCK_M}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s) for m, w, s in _DY_GRADS_TILES]


def dy_grads_blocks(m, n, r, device):
    """(BLOCK_N, BLOCK_R, rows per program, programs along M) for dy (m, n) on device and rank r."""
    block_r = max(triton.next_power_of_2(r), 16)
    if INTERPRET:
        block_n, chunk = 16, 2 * _DY_GRADS_INTERPRETER_BLOCK_M
    else:
        # the dC and Cγ tiles stay at most 128×64; split M until there are a
        # few programs per SM (the column tiles alone are too few when N is small)
        block_n = max(16, min(128, 8192 // block_r))
        n_tiles = triton.cdiv(n, block_n)
        wanted = triton.cdiv(4 * torch.cuda.get_device_properties(device).multi_processor_count, n_tiles)
        chunk = max(triton.cdiv(triton.cdiv(m, wanted), _DY_GRADS_MAX_BLOCK_M), 1) * _DY_GRADS_MAX_BLOCK_M
    return block_n, block_r, chunk, triton.cdiv(m, chunk)


@triton.autotune(configs=_dy_grads_configs(), key=["M_BUCKET", "N", "R", "M_CHUNK"])
@triton.jit
def _dy_grads_kernel(
    dy_ptr, u_ptr, c_ptr, du_part_ptr, dc_part_ptr,
    M, N, R, M_BUCKET, M_CHUNK, scaling,
    stride_dym, stride_dyn, stride_um, stride_ur, stride_cn, stride_cr,
    WRITE_DU: tl.constexpr, WRITE_DC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R).to(tl.int64)
    col_ok = cols < N
    rank_ok = ranks < R
    if WRITE_DU:
        c = tl.load(c_ptr + cols[:, None] * stride_cn + ranks[None, :] * stride_cr,
                    mask=col_ok[:, None] & rank_ok[None, :], other=0.0)

    dc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    first_row = pid_s * M_CHUNK
    end_row = tl.minimum(first_row + M_CHUNK, M)
    for m0 in range(first_row, end_row, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end_row
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if WRITE_DU:
            du = tl.dot(dy, c, input_precision=INPUT_PRECISION)
            tl.store(du_part_ptr + (pid_n * M + rows)[:, None] * R + ranks[None, :], du,
                     mask=row_ok[:, None] & rank_ok[None, :])
        if WRITE_DC:
            u = tl.load(u_ptr + rows[:, None] * stride_um + ranks[None, :] * stride_ur,
                        mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            dc = tl.dot(tl.trans(dy), u, dc, input_precision=INPUT_PRECISION)
    if WRITE_DC:
        tl.store(dc_part_ptr + (pid_s * N + cols)[:, None] * R + ranks[None, :], dc * scaling,
                 mask=col_ok[:, None] & rank_ok[None, :])


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
    block_n, block_r, chunk, m_splits = dy_grads_blocks(m, n, r, dy.device)
    n_tiles = triton.cdiv(n, block_n)
    du_part = dy.new_empty((n_tiles, m, r) if need_du else (0,), dtype=torch.float32)
    dc_part = dy.new_empty((m_splits, n, r) if need_dc else (0,), dtype=torch.float32)
    if m * n * r > 0 and (need_du or need_dc):
        wrap_triton(_dy_grads_kernel)[(n_tiles, m_splits)](
            dy, u, c, du_part, dc_part,
            m, n, r, m_bucket(m), chunk, scaling,
            dy.stride(0), dy.stride(1), u.stride(0), u.stride(1), c.stride(0), c.stride(1),
            WRITE_DU=need_du, WRITE_DC=need_dc, INPUT_PRECISION=input_precision(dy.dtype),
            BLOCK_N=block_n, BLOCK_R=block_r,
        )
    # Fixed-order sums over the column tiles and the row chunks: the same bits on every run.
    du = du_part.sum(0) if need_du else du_part
    dc = dc_part.sum(0) if need_dc else dc_part
    return du, dc
