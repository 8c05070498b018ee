"""Low-rank-augmented GEMM (LoRA and LoRFA): the kernels and their launch
arguments. Triton only (see __init__.py); the torch ops are
featadapt/kernels/triton/low_rank_gemm.py.

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

import triton
import triton.language as tl

from .configs import dy_grads_blocks, dy_grads_configs, input_precision, m_bucket, rank_block, tile_configs
from .specs import ACTIVATION_DTYPES, ALLOW_TF32, KEEP_MASK_DTYPE, KernelSpec, cases_over, tensor
from .tiles import accumulate_dot, output_tile


@triton.jit
def forward_kernel(
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


def forward_args(x, weight, bias, u, c, y, allow_tf32):
    """forward_kernel's arguments for y = x weightᵀ + u cᵀ + bias; x (M, K), weight (N, K),
    u (M, r), c (N, r); bias (unit stride) may be None."""
    m, k = x.shape
    n, r = c.shape
    return dict(
        x_ptr=x, w_ptr=weight, u_ptr=u, c_ptr=c, bias_ptr=bias, y_ptr=y,
        M=m, N=n, K=k, R=r, M_BUCKET=m_bucket(m),
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_um=u.stride(0), stride_ur=u.stride(1), stride_cn=c.stride(0), stride_cr=c.stride(1),
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        HAS_BIAS=bias is not None, INPUT_PRECISION=input_precision(str(x.dtype), allow_tf32),
        BLOCK_R=rank_block(r),
    )


@triton.jit
def dx_kernel(
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


def dx_args(dy, weight, du, a, keep, keep_scale, dx, allow_tf32):
    """dx_kernel's arguments for dx = dy weight + (du a) ⊙ keep · keep_scale; dy (M, N),
    weight (N, K), du (M, r), a (r, K), the dropout keep mask (M, K) or None."""
    m = dy.shape[0]
    n, k = weight.shape
    r = a.shape[0]
    keep_strides = (keep.stride(0), keep.stride(1)) if keep is not None else (0, 0)
    return dict(
        dy_ptr=dy, w_ptr=weight, du_ptr=du, a_ptr=a, keep_ptr=keep, dx_ptr=dx,
        M=m, N=n, K=k, R=r, M_BUCKET=m_bucket(m), keep_scale=keep_scale,
        stride_dym=dy.stride(0), stride_dyn=dy.stride(1), stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_dum=du.stride(0), stride_dur=du.stride(1), stride_ar=a.stride(0), stride_ak=a.stride(1),
        stride_keepm=keep_strides[0], stride_keepk=keep_strides[1], stride_dxm=dx.stride(0), stride_dxk=dx.stride(1),
        HAS_DROPOUT=keep is not None, INPUT_PRECISION=input_precision(str(dy.dtype), allow_tf32),
        BLOCK_R=rank_block(r),
    )


@triton.jit
def dy_grads_kernel(
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


def dy_grads_args(dy, u, c, scaling, du_part, dc_part, sm_count, allow_tf32):
    """dy_grads_kernel's arguments (and its grid) for dy (M, N), u (M, r), c (N, r):
    du_part (column tiles, M, r) and dc_part (row chunks, N, r) float32, each
    None when not wanted (c is read only for du). Returns (grid, arguments)."""
    m, n = dy.shape
    r = u.shape[1]
    block_n, block_r, chunk, m_splits = dy_grads_blocks(m, n, r, sm_count)
    grid = (triton.cdiv(n, block_n), m_splits)
    return grid, dict(
        dy_ptr=dy, u_ptr=u if dc_part is not None else None, c_ptr=c if du_part is not None else None,
        du_part_ptr=du_part, dc_part_ptr=dc_part,
        M=m, N=n, R=r, M_BUCKET=m_bucket(m), M_CHUNK=chunk, scaling=scaling,
        stride_dym=dy.stride(0), stride_dyn=dy.stride(1), stride_um=u.stride(0), stride_ur=u.stride(1),
        stride_cn=c.stride(0), stride_cr=c.stride(1),
        WRITE_DU=du_part is not None, WRITE_DC=dc_part is not None,
        INPUT_PRECISION=input_precision(str(dy.dtype), allow_tf32), BLOCK_N=block_n, BLOCK_R=block_r,
    )


def dy_grads_partial_shapes(m, n, r, sm_count):
    """Shapes of low_rank_dy_grads' float32 partial buffers: (du slices, dC partials)."""
    block_n, _, _, m_splits = dy_grads_blocks(m, n, r, sm_count)
    return (triton.cdiv(n, block_n), m, r), (m_splits, n, r)


# -- ahead-of-time compile specs (tools/triton_aot.py) ---------------------------

# The GPUs the sweep targets, by their multiprocessor count (sizes the row chunks).
SM_COUNT = 132  # H100/H200 SXM


def _forward_cases(shape):
    m, k, n, r = shape.m, shape.k, shape.n, shape.r
    for act in ACTIVATION_DTYPES:
        for c in cases_over(bias=(False, True), allow_tf32=ALLOW_TF32):
            yield dict(x=tensor(act, m, k), weight=tensor(act, n, k), bias=tensor(act if c["bias"] else None, n),
                       u=tensor(act, m, r), c=tensor(act, n, r), y=tensor(act, m, n), allow_tf32=c["allow_tf32"])


def _dx_cases(shape):
    m, k, n, r = shape.m, shape.k, shape.n, shape.r
    for act in ACTIVATION_DTYPES:
        for c in cases_over(dropout=(False, True), allow_tf32=ALLOW_TF32):
            yield dict(dy=tensor(act, m, n), weight=tensor(act, n, k), du=tensor(act, m, r), a=tensor(act, r, k),
                       keep=tensor(KEEP_MASK_DTYPE if c["dropout"] else None, m, k), keep_scale=1.0 / 0.9,
                       dx=tensor(act, m, k), allow_tf32=c["allow_tf32"])


def _dy_grads_cases(shape):
    m, n, r = shape.m, shape.n, shape.r
    du_shape, dc_shape = dy_grads_partial_shapes(m, n, r, SM_COUNT)
    for act in ACTIVATION_DTYPES:
        for c in cases_over(du=(False, True), dc=(False, True), allow_tf32=ALLOW_TF32):
            if not (c["du"] or c["dc"]):
                continue  # the launcher does not launch
            yield dict(dy=tensor(act, m, n), u=tensor(act, m, r), c=tensor(act, n if c["du"] else 0, r),
                       scaling=2.0, du_part=tensor("float32" if c["du"] else None, *du_shape),
                       dc_part=tensor("float32" if c["dc"] else None, *dc_shape), sm_count=SM_COUNT,
                       allow_tf32=c["allow_tf32"])


AOT_KERNELS = [
    KernelSpec("low_rank_gemm_forward", forward_kernel, forward_args, _forward_cases,
               lambda: tile_configs(interpret=False)),
    KernelSpec("low_rank_gemm_dx", dx_kernel, dx_args, _dx_cases,
               lambda: tile_configs(interpret=False), operand_dtype="dy"),
    KernelSpec("low_rank_dy_grads", dy_grads_kernel, lambda **kw: dy_grads_args(**kw)[1], _dy_grads_cases,
               lambda: dy_grads_configs(interpret=False), operand_dtype="dy"),
]
