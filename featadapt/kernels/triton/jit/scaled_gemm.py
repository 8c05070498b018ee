"""Scaled GEMM (VeFA): y = (x ⊙ s + t) W0ᵀ + b, and its backward — the kernels
and their launch arguments. Triton only (see __init__.py); the torch ops are
featadapt/kernels/triton/scaled_gemm.py.

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

import triton
import triton.language as tl

from .configs import input_precision, m_bucket, partial_block_m, tile_configs
from .specs import ACTIVATION_DTYPES, ALLOW_TF32, PARAMETER_DTYPES, KernelSpec, cases_over, tensor
from .tiles import accumulate_dot, output_tile


@triton.jit
def forward_kernel(
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


def forward_args(x, weight, bias, scale, shift, y, allow_tf32):
    """forward_kernel's arguments for y (M, N) = (x ⊙ scale + shift) weightᵀ + bias,
    x (M, K), weight (N, K); bias and shift may be None. The vectors must have unit stride."""
    m, k = x.shape
    n = weight.shape[0]
    return dict(
        x_ptr=x, w_ptr=weight, bias_ptr=bias, scale_ptr=scale, shift_ptr=shift, y_ptr=y,
        M=m, N=n, K=k, M_BUCKET=m_bucket(m),
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        HAS_BIAS=bias is not None, HAS_SHIFT=shift is not None,
        INPUT_PRECISION=input_precision(str(x.dtype), allow_tf32),
    )


@triton.jit
def backward_kernel(
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


def backward_args(dy, x, weight, scale, dx, dscale_part, dshift_part, allow_tf32):
    """backward_kernel's arguments: dy (M, N), x (M, K), weight (N, K); dx (M, K)
    contiguous, dscale_part and dshift_part (row tiles, K) float32 — each None
    when not wanted. The scale is read only for dx, and x only for dscale."""
    m, k = x.shape
    n = weight.shape[0]
    return dict(
        dy_ptr=dy, w_ptr=weight, x_ptr=x if dscale_part is not None else None,
        scale_ptr=scale if dx is not None else None,
        dx_ptr=dx, dscale_part_ptr=dscale_part, dshift_part_ptr=dshift_part,
        M=m, N=n, K=k, M_BUCKET=m_bucket(m),
        stride_dym=dy.stride(0), stride_dyn=dy.stride(1), stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_dxm=k, stride_dxk=1,
        WRITE_DX=dx is not None, WRITE_DSCALE=dscale_part is not None, WRITE_DSHIFT=dshift_part is not None,
        INPUT_PRECISION=input_precision(str(x.dtype), allow_tf32), BLOCK_M=partial_block_m(m),
    )


# -- ahead-of-time compile specs (tools/triton_aot.py) ---------------------------


def _forward_cases(shape):
    m, k, n = shape.m, shape.k, shape.n
    for act in ACTIVATION_DTYPES:
        for c in cases_over(param=PARAMETER_DTYPES[act], shift=(None, *PARAMETER_DTYPES[act]),
                            bias=(False, True), allow_tf32=ALLOW_TF32):
            yield dict(x=tensor(act, m, k), weight=tensor(act, n, k), bias=tensor(act if c["bias"] else None, n),
                       scale=tensor(c["param"], k), shift=tensor(c["shift"], k), y=tensor(act, m, n),
                       allow_tf32=c["allow_tf32"])


def _backward_cases(shape):
    m, k, n = shape.m, shape.k, shape.n
    row_tiles = triton.cdiv(m, partial_block_m(m, interpret=False))
    for act in ACTIVATION_DTYPES:
        for c in cases_over(param=PARAMETER_DTYPES[act], dx=(False, True), dscale=(False, True),
                            dshift=(False, True), allow_tf32=ALLOW_TF32):
            if not (c["dx"] or c["dscale"] or c["dshift"]):
                continue  # the launcher does not launch
            yield dict(dy=tensor(act, m, n), x=tensor(act, m, k), weight=tensor(act, n, k),
                       scale=tensor(c["param"], k), dx=tensor(act if c["dx"] else None, m, k),
                       dscale_part=tensor("float32" if c["dscale"] else None, row_tiles, k),
                       dshift_part=tensor("float32" if c["dshift"] else None, row_tiles, k),
                       allow_tf32=c["allow_tf32"])


AOT_KERNELS = [
    KernelSpec("scaled_gemm_forward", forward_kernel, forward_args, _forward_cases,
               lambda: tile_configs(interpret=False)),
    KernelSpec("scaled_gemm_backward", backward_kernel, backward_args, _backward_cases,
               lambda: tile_configs(with_block_m=False, interpret=False), operand_dtype="dy"),
]
