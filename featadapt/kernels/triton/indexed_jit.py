"""Triton kernels for many adapters in one batch: row i uses adapter ids[i]
of n adapters stacked along a leading dimension, and id -1 the base layer.

Only triton is imported here (the launchers, autotuning and torch custom ops
are in indexed_ops.py). Rows are not sorted or segmented: every row tile
gathers each of its rows' own adapter factors (BGMV-style), so a tile may mix
adapters freely and the ids may come in any order.

- `vefa_forward`: the scaled GEMM whose prologue gathers each row's scale
  (and shift) as the x tile is loaded: (x_i ⊙ s_a + t_a) W0ᵀ + b.
- `shrink`: u[i, j] = Σ_k x̂[i, k] A[a, j, k], one program per (row tile,
  rank j).
- `low_rank_forward`: the frozen GEMM with each row's low-rank term, one rank
  at a time from u and the gathered B_a column: LoRFA in the prologue
  (x̃ = x + γ_a u_i B_aᵀ, rounded to x's dtype once, then tl.dot), LoRA in
  the epilogue (+ γ_a u_i B_aᵀ on the output tile).

The per-rank gathers are plain loads and multiply-adds, not tensor-core
dots: the kernels are not yet tuned on a GPU.
"""

import triton
import triton.language as tl

from . import output_tile


@triton.jit
def _row_adapters(ids_ptr, rows, row_ok):
    """(adapter index clamped to >= 0 as int64, whether the row has an adapter)."""
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=-1)
    active = (ids >= 0) & row_ok
    return tl.where(active, ids, 0).to(tl.int64), active


@triton.jit
def vefa_forward(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, ids_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sa, stride_sk, stride_ta, stride_tk,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
):
    _, rows, cols, row_ok, col_ok = output_tile(M, N, BLOCK_M, BLOCK_C, GROUP_M)
    adapter, active = _row_adapters(ids_ptr, rows, row_ok)

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D).to(tl.int64)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # rows without an adapter read scale 1 and shift 0
        params_ok = active[:, None] & k_ok[None, :]
        scale = tl.load(scale_ptr + adapter[:, None] * stride_sa + ks[None, :] * stride_sk,
                        mask=params_ok, other=1.0)
        x_tilde = x.to(tl.float32) * scale.to(tl.float32)
        if HAS_SHIFT:
            shift = tl.load(shift_ptr + adapter[:, None] * stride_ta + ks[None, :] * stride_tk,
                            mask=params_ok, other=0.0)
            x_tilde += shift.to(tl.float32)
        w = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x_tilde.to(x.dtype), w, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def shrink(
    x_ptr, a_ptr, ids_ptr, u_ptr,
    M, K,
    stride_xm, stride_xk, stride_aa, stride_ar, stride_ak, stride_um, stride_ur,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    rank = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    adapter, active = _row_adapters(ids_ptr, rows, row_ok)

    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D).to(tl.int64)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptr + adapter[:, None] * stride_aa + rank * stride_ar + ks[None, :] * stride_ak,
                    mask=active[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32) * a.to(tl.float32), axis=1)
    tl.store(u_ptr + rows * stride_um + rank * stride_ur, acc.to(u_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _low_rank_term(acc, u_ptr, b_ptr, rows, row_ok, gamma, adapter, active, depth, depth_ok, R,
                   stride_um, stride_ur, stride_ba, stride_bd, stride_br):
    """acc + γ_a Σ_j u[i, j] B[a, depth, j] for each row i (adapter a), one rank at a time."""
    for rank in range(0, R):
        u = tl.load(u_ptr + rows * stride_um + rank * stride_ur, mask=row_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + adapter[:, None] * stride_ba + depth[None, :] * stride_bd + rank * stride_br,
                    mask=active[:, None] & depth_ok[None, :], other=0.0)
        acc += (gamma * u)[:, None] * b.to(tl.float32)
    return acc


@triton.jit
def low_rank_forward(
    x_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, gamma_ptr, ids_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_um, stride_ur, stride_ba, stride_bd, stride_br,
    stride_ym, stride_yn,
    LORFA: tl.constexpr, HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
):
    _, rows, cols, row_ok, col_ok = output_tile(M, N, BLOCK_M, BLOCK_C, GROUP_M)
    adapter, active = _row_adapters(ids_ptr, rows, row_ok)
    gamma = tl.load(gamma_ptr + adapter, mask=active, other=0.0).to(tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D).to(tl.int64)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if LORFA:  # x̃ = x + γ_a u_i B_aᵀ, B (n, K, r)
            x_tilde = _low_rank_term(x.to(tl.float32), u_ptr, b_ptr, rows, row_ok, gamma, adapter, active,
                                     ks, k_ok, R, stride_um, stride_ur, stride_ba, stride_bd, stride_br)
            x = x_tilde.to(x.dtype)
        w = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
    if not LORFA:  # + γ_a u_i B_aᵀ, B (n, N, r)
        acc = _low_rank_term(acc, u_ptr, b_ptr, rows, row_ok, gamma, adapter, active,
                             cols, col_ok, R, stride_um, stride_ur, stride_ba, stride_bd, stride_br)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
