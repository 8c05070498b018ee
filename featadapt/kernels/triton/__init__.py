"""Triton kernels for the `triton` backend, and what they share.

Two kernel families cover the three methods (DESIGN.md §1):
`scaled_gemm` (VeFA) and `low_rank_gemm` (LoRA and LoRFA). Each kernel
computes one output tile of BLOCK_M rows (tokens) by BLOCK_C columns, reducing
over a depth in steps of BLOCK_D (and over the rank in steps of BLOCK_R), with
float32 accumulation and masked tails, so any M, N, K and strides work.
Offsets are 64-bit: M·K above 2³¹ is safe.

On CUDA the tile sizes are autotuned per (M bucket, N, K, dtypes). Under
TRITON_INTERPRET=1 (CPU tensors, for the tests) the same autotuned kernels run
with a single small configuration, so nothing is benchmarked. Whether the
kernels are interpreted is decided when this package is imported: set the
variable before importing featadapt.
"""

import torch
import triton
import triton.language as tl

# Decided by triton itself when the kernels below are decorated.
INTERPRET = bool(triton.knobs.runtime.interpret)

GROUP_M = 8  # output tiles are visited GROUP_M row-tiles at a time, for L2 reuse of the column operand


def unit_stride(*vectors):
    """The (N,) or (K,) vectors (bias, scale, shift) with unit stride: the kernels
    index them as contiguous. None stays None; a contiguous vector is not copied."""
    return tuple(None if v is None else v.contiguous() for v in vectors)


def input_precision(dtype):
    """tl.dot's precision for float32 operands: true float32 unless torch allows TF32."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored by tl.dot for half-precision operands


def m_bucket(m):
    """The autotuning key for the token count: retuning for every distinct M
    (every sequence length) would be too slow, so M is rounded up to a power of two."""
    return min(triton.next_power_of_2(max(m, 1)), 1 << 16)


def rank_block(r):
    """BLOCK_R for rank r: r rounded up to a power of two, at least 16 (tl.dot's minimum)."""
    return 16 if INTERPRET else min(max(triton.next_power_of_2(r), 16), 64)


def partial_block_m(m):
    """BLOCK_M of a kernel that writes one partial sum per row tile: fixed by the
    caller (it sizes the partials buffer), so it is not autotuned."""
    return 32 if INTERPRET else min(max(triton.next_power_of_2(m), 16), 128)


# (BLOCK_M, BLOCK_C, BLOCK_D, num_warps, num_stages). Large tiles for the
# compute-bound shapes (Hopper and Ampere alike; the autotuner drops any that
# do not fit a device's shared memory), small BLOCK_M ones for few tokens.
_CUDA_TILES = [
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 32, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (32, 128, 64, 4, 4),
    (32, 64, 128, 4, 4),
    (16, 128, 128, 4, 3),
    (16, 64, 128, 4, 4),
]
# Small tiles keep the interpreter fast while still giving several tiles and
# several reduction steps on the tests' odd shapes.
_INTERPRETER_TILE = (32, 32, 16, 1, 1)
_INTERPRETER_GROUP_M = 2


def _config(block_m, block_c, block_d, warps, stages, group_m, with_block_m):
    kwargs = {"BLOCK_C": block_c, "BLOCK_D": block_d, "GROUP_M": group_m}
    if with_block_m:
        kwargs["BLOCK_M"] = block_m
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


def tile_configs(with_block_m=True, interpret=INTERPRET):
    """The configurations the kernels are tuned over (a single one under the interpreter).

    with_block_m=False: BLOCK_M is passed by the caller (see partial_block_m)
    and only the other tile sizes are tuned.
    """
    if interpret:
        return [_config(*_INTERPRETER_TILE, _INTERPRETER_GROUP_M, with_block_m)]
    configs = [_config(*tile, GROUP_M, with_block_m) for tile in _CUDA_TILES]
    # without BLOCK_M some tiles coincide: keep one of each
    unique = {(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages): c for c in configs}
    return list(unique.values())


def prune_for_few_tokens(configs, named_args, **kwargs):
    """Row tiles much taller than M waste the tile; keep those that fit (or all, if none does)."""
    m = named_args["M_BUCKET"]
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] <= max(m, 16)]
    return fitting or configs


def autotune(key, with_block_m=True):
    """triton.autotune over tile_configs(with_block_m), keyed on the argument names in `key`."""
    prune = {"early_config_prune": prune_for_few_tokens} if with_block_m and not INTERPRET else None
    return triton.autotune(configs=tile_configs(with_block_m), key=key, prune_configs_by=prune)


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


def launch_grid(rows, cols):
    """The 1-D grid over output tiles, for an autotuned kernel."""
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_C"]),)
