"""Triton kernels for many adapters in one batch: row i uses adapter ids[i]
of n adapters stacked along a leading dimension, and id -1 the base layer.

Only triton is imported here (see __init__.py); the torch custom ops that
launch the kernels are featadapt/kernels/triton/indexed_ops.py. Rows are not sorted or segmented: every row tile
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

from .configs import gather_tile_configs, input_precision, m_bucket, tile_configs
from .specs import ACTIVATION_DTYPES, ALLOW_TF32, PARAMETER_DTYPES, KernelSpec, cases_over, tensor
from .tiles import indexed_low_rank_term, output_tile, row_adapters

# shrink's blocks: one program per (row tile, rank); a short row tile, a long reduction step.
SHRINK_BLOCKS = (32, 128)
SHRINK_INTERPRETER_BLOCKS = (16, 16)
# The number of adapters the ahead-of-time cases stack (it only sets shapes).
_AOT_ADAPTERS = 8


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
    adapter, active = row_adapters(ids_ptr, rows, row_ok)

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
    adapter, active = row_adapters(ids_ptr, rows, row_ok)

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
def low_rank_forward(
    x_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, gamma_ptr, ids_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_um, stride_ur, stride_ba, stride_bd, stride_br,
    stride_ym, stride_yn,
    LORFA: tl.constexpr, HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
):
    _, rows, cols, row_ok, col_ok = output_tile(M, N, BLOCK_M, BLOCK_C, GROUP_M)
    adapter, active = row_adapters(ids_ptr, rows, row_ok)
    gamma = tl.load(gamma_ptr + adapter, mask=active, other=0.0).to(tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D).to(tl.int64)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if LORFA:  # x̃ = x + γ_a u_i B_aᵀ, B (n, K, r)
            x_tilde = indexed_low_rank_term(x.to(tl.float32), u_ptr, b_ptr, rows, row_ok, gamma, adapter, active,
                                            ks, k_ok, R, stride_um, stride_ur, stride_ba, stride_bd, stride_br)
            x = x_tilde.to(x.dtype)
        w = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
    if not LORFA:  # + γ_a u_i B_aᵀ, B (n, N, r)
        acc = indexed_low_rank_term(acc, u_ptr, b_ptr, rows, row_ok, gamma, adapter, active,
                                    cols, col_ok, R, stride_um, stride_ur, stride_ba, stride_bd, stride_br)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# -- launch arguments (what indexed_ops.py passes) ----------------------------------


def _strides2(t):
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def vefa_forward_args(x, weight, bias, scale, shift, ids, y, allow_tf32):
    """vefa_forward's arguments: x (M, K), weight (N, K), scale and shift (n, K)
    (shift and bias may be None; bias with unit stride), ids (M,) int64, y (M, N)."""
    m, k = x.shape
    n = weight.shape[0]
    stride_sa, stride_sk = _strides2(scale)
    stride_ta, stride_tk = _strides2(shift)
    return dict(
        x_ptr=x, w_ptr=weight, bias_ptr=bias, scale_ptr=scale, shift_ptr=shift, ids_ptr=ids, y_ptr=y,
        M=m, N=n, K=k, M_BUCKET=m_bucket(m),
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_sa=stride_sa, stride_sk=stride_sk, stride_ta=stride_ta, stride_tk=stride_tk,
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        HAS_BIAS=bias is not None, HAS_SHIFT=shift is not None,
        INPUT_PRECISION=input_precision(str(x.dtype), allow_tf32),
    )


def shrink_args(x, lora_A, ids, u, blocks=SHRINK_BLOCKS):
    """shrink's arguments (with its fixed blocks): x (M, K), lora_A (n, r, K), ids (M,), u (M, r)."""
    m, k = x.shape
    return dict(
        x_ptr=x, a_ptr=lora_A, ids_ptr=ids, u_ptr=u, M=m, K=k,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_aa=lora_A.stride(0), stride_ar=lora_A.stride(1), stride_ak=lora_A.stride(2),
        stride_um=u.stride(0), stride_ur=u.stride(1),
        BLOCK_M=blocks[0], BLOCK_D=blocks[1],
    )


def low_rank_forward_args(x, weight, bias, u, lora_B, scaling, ids, y, lorfa, allow_tf32):
    """low_rank_forward's arguments: x (M, K), weight (N, K), u (M, r), lora_B
    (n, K, r) for LoRFA or (n, N, r) for LoRA, scaling (n,), ids (M,), y (M, N)."""
    m, k = x.shape
    n = weight.shape[0]
    return dict(
        x_ptr=x, w_ptr=weight, bias_ptr=bias, u_ptr=u, b_ptr=lora_B, gamma_ptr=scaling, ids_ptr=ids, y_ptr=y,
        M=m, N=n, K=k, R=u.shape[1], M_BUCKET=m_bucket(m),
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_um=u.stride(0), stride_ur=u.stride(1),
        stride_ba=lora_B.stride(0), stride_bd=lora_B.stride(1), stride_br=lora_B.stride(2),
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        LORFA=lorfa, HAS_BIAS=bias is not None, INPUT_PRECISION=input_precision(str(x.dtype), allow_tf32),
    )


# -- ahead-of-time compile specs (tools/triton_aot.py) ---------------------------


def _vefa_forward_cases(shape):
    m, k, n, a = shape.m, shape.k, shape.n, _AOT_ADAPTERS
    for act in ACTIVATION_DTYPES:
        for c in cases_over(param=PARAMETER_DTYPES[act], shift=(None, *PARAMETER_DTYPES[act]),
                            bias=(False, True), allow_tf32=ALLOW_TF32):
            yield dict(x=tensor(act, m, k), weight=tensor(act, n, k), bias=tensor(act if c["bias"] else None, n),
                       scale=tensor(c["param"], a, k), shift=tensor(c["shift"], a, k), ids=tensor("int64", m),
                       y=tensor(act, m, n), allow_tf32=c["allow_tf32"])


def _shrink_cases(shape):
    m, k, r, a = shape.m, shape.k, shape.r, _AOT_ADAPTERS
    for act in ACTIVATION_DTYPES:
        for param in PARAMETER_DTYPES[act]:
            yield dict(x=tensor(act, m, k), lora_A=tensor(param, a, r, k), ids=tensor("int64", m),
                       u=tensor(act, m, r))


def _low_rank_forward_cases(shape):
    m, k, n, r, a = shape.m, shape.k, shape.n, shape.r, _AOT_ADAPTERS
    for act in ACTIVATION_DTYPES:
        for c in cases_over(param=PARAMETER_DTYPES[act], lorfa=(False, True), bias=(False, True),
                            allow_tf32=ALLOW_TF32):
            depth = k if c["lorfa"] else n
            yield dict(x=tensor(act, m, k), weight=tensor(act, n, k), bias=tensor(act if c["bias"] else None, n),
                       u=tensor(act, m, r), lora_B=tensor(c["param"], a, depth, r), scaling=tensor("float32", a),
                       ids=tensor("int64", m), y=tensor(act, m, n), lorfa=c["lorfa"], allow_tf32=c["allow_tf32"])


def shrink_configs():
    """shrink is not tuned: its one configuration (blocks are launch arguments)."""
    return [triton.Config({}, num_warps=4, num_stages=1)]


AOT_KERNELS = [
    KernelSpec("indexed_vefa_forward", vefa_forward, vefa_forward_args, _vefa_forward_cases,
               lambda: gather_tile_configs(interpret=False)),
    KernelSpec("indexed_shrink", shrink, shrink_args, _shrink_cases, shrink_configs),
    KernelSpec("indexed_low_rank_forward", low_rank_forward, low_rank_forward_args, _low_rank_forward_cases,
               lambda: tile_configs(interpret=False)),
]
