"""Device helpers shared by the kernels: which output tile a program owns, the
masked, int64-offset reduction loop, and the per-row adapter gathers of the
indexed kernels. Triton only (see __init__.py)."""

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid` for an n_rows × n_cols output,
    visited in groups of GROUP_M row tiles."""
    tiles_m = tl.cdiv(n_rows, BLOCK_M)
    tiles_c = tl.cdiv(n_cols, BLOCK_C)
    per_group = GROUP_M * tiles_c
    first_m = (pid // per_group) * GROUP_M
    group_size = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_c = (pid % per_group) // group_size
    return pid_m, pid_c


@triton.jit
def output_tile(n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile: (row tile index, int64 row and column offsets,
    and their in-bounds masks)."""
    pid_m, pid_c = grouped_tile(tl.program_id(0), n_rows, n_cols, BLOCK_M, BLOCK_C, GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    return pid_m, rows, cols, rows < n_rows, cols < n_cols


@triton.jit
def accumulate_dot(acc, a_ptr, b_ptr, rows, cols, row_ok, col_ok, depth,
                   stride_a_row, stride_a_depth, stride_b_depth, stride_b_col,
                   BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + A[rows, :depth] @ B[:depth, cols], stepping BLOCK_D along the depth;
    rows and cols are int64 offsets, masked by row_ok and col_ok."""
    for d0 in range(0, depth, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        d_ok = ds < depth
        a = tl.load(a_ptr + rows[:, None] * stride_a_row + ds[None, :] * stride_a_depth,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(b_ptr + ds[:, None] * stride_b_depth + cols[None, :] * stride_b_col,
                    mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


# -- many adapters in one batch (indexed.py): each row gathers its own adapter's values


@triton.jit
def row_adapters(ids_ptr, rows, row_ok):
    """(adapter index clamped to >= 0 as int64, whether the row has an adapter)."""
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=-1)
    active = (ids >= 0) & row_ok
    return tl.where(active, ids, 0).to(tl.int64), active


@triton.jit
def indexed_low_rank_term(acc, u_ptr, b_ptr, rows, row_ok, gamma, adapter, active, depth, depth_ok, R,
                   stride_um, stride_ur, stride_ba, stride_bd, stride_br):
    """acc + γ_a Σ_j u[i, j] B[a, depth, j] for each row i (adapter a), one rank at a time."""
    for rank in range(0, R):
        u = tl.load(u_ptr + rows * stride_um + rank * stride_ur, mask=row_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + adapter[:, None] * stride_ba + depth[None, :] * stride_bd + rank * stride_br,
                    mask=active[:, None] & depth_ok[None, :], other=0.0)
        acc += (gamma * u)[:, None] * b.to(tl.float32)
    return acc
