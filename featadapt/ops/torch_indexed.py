"""The `torch` backend for many adapters in one batch (``adapter_index=``).

Row i of x (M, K) uses adapter ids[i] of n adapters stacked along a leading
dimension; id -1 is the base layer alone (DESIGN.md §1, "Many adapters in one
batch"). There is no Python loop over rows:

- VeFA gathers each row's scale and shift (M×K, the size of x) and runs one
  frozen GEMM; ds and dt are per-adapter segment sums (index_add).
- LoRA and LoRFA compute their low-rank parts (shrink u_i = x̂_i A_aᵀ, expand
  γ_a u_i B_aᵀ, and the per-adapter gradient sums) with one of two plans,
  chosen by shape (`low_rank_plan`):
  GATHER  — each row's adapter factors are gathered and multiplied with
            batched matmuls: no host sync and few kernel launches, but the
            copies cost M·r·(K + rows of B) elements, so only for few rows
            (decoding a mixed batch);
  GROUPED — rows are sorted by adapter once (one host sync), and each adapter
            present runs one matmul on its contiguous segment: the loop is
            over adapters, never rows.

Memory rule (DESIGN.md §1): VeFA saves x, the ids and the parameters; LoRA
and LoRFA save x, u (M×r), the ids and the parameters, and draw the dropout
mask again in backward. The frozen weight is never copied; LoRA adds its
low-rank term into the output in place (GROUPED: in chunks of at most
CHUNK_ELEMENTS), so nothing of size M×N exists besides y; LoRFA forms
x̃ = x + γ u Bᵀ (M×K) and runs the frozen GEMM once, as the single-adapter
torch backend's input form does. The forward kernels of the triton backend
share this module's backward (`vefa_indexed_backward`, `low_rank_indexed_backward`).
"""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .dropout import apply_dropout
from .torch_backend import reduction_dtype

GATHER = "gather"
GROUPED = "grouped"
# GATHER's per-row copies of the adapter factors, in elements: 8 MiB of float32.
GATHER_BUDGET = 1 << 21
# GROUPED expand: rows per matmul are capped so its temporary stays this small.
CHUNK_ELEMENTS = 1 << 20


def low_rank_plan(m, r, k, b_rows):
    """GATHER while the per-row factor copies (M·r·(K + b_rows)) fit GATHER_BUDGET, else GROUPED."""
    return GATHER if m * r * (k + b_rows) <= GATHER_BUDGET else GROUPED


class RowGroups:
    """The rows of a batch by adapter: the ids (M,), and for the GROUPED plan
    the stable order that sorts them (`perm`) with the (adapter, start, end)
    segments of that order that have an adapter (ids -1 sort first, in none)."""

    def __init__(self, ids, n_adapters, plan):
        self.ids = ids
        self.n_adapters = n_adapters
        self.plan = plan
        self.active = ids >= 0
        self.clamped = ids.clamp(min=0)
        if plan == GROUPED:
            sorted_ids, self.perm = torch.sort(ids, stable=True)
            present, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
            present, counts = torch.stack([present, counts]).tolist()  # the one host sync
            self.segments, start = [], 0
            for adapter, count in zip(present, counts):
                if adapter >= 0:
                    self.segments.append((adapter, start, start + count))
                start += count

    def per_row(self, values, fill):
        """(n, ...) values gathered per row, `fill` for the rows with id -1."""
        gathered = values.index_select(0, self.clamped)
        return gathered.masked_fill_(~self.active.view(-1, *([1] * (values.dim() - 1))), fill)


def shrink(rows, x, factor):
    """u_i = factor_a x_i for each row i of x (M, D) with adapter a, factor (n, r, D);
    0 for rows with id -1. (M, r) in x's dtype."""
    m, r = x.shape[0], factor.shape[1]
    if rows.plan == GATHER:
        per_row = factor.index_select(0, rows.clamped).to(x.dtype)  # (M, r, D)
        u = torch.bmm(per_row, x.unsqueeze(2)).squeeze(2)
        return u.masked_fill_(~rows.active.unsqueeze(1), 0.0)
    x_sorted = x.index_select(0, rows.perm)
    u_sorted = x.new_zeros((m, r))
    for adapter, start, end in rows.segments:
        torch.mm(x_sorted[start:end], factor[adapter].to(x.dtype).T, out=u_sorted[start:end])
    return torch.empty_like(u_sorted).index_copy_(0, rows.perm, u_sorted)


def expand_into(rows, target, u, factor, gamma=None):
    """target_i += factor_a (γ_a u_i) in place, for target (M, D), u (M, r),
    factor (n, D, r) and gamma (n,) (None: 1); rows with id -1 are left alone,
    whatever values any adapter holds."""
    if gamma is not None:
        # γ scales the rank-r u before it is expanded, in every plan: in half
        # precision u·Bᵀ alone may overflow where γ·u·Bᵀ does not.
        u = u * rows.per_row(gamma, 0.0).unsqueeze(1)
    u = u.to(target.dtype)
    if rows.plan == GATHER:
        # rows with id -1 get a zero factor and a zero u, not adapter 0's
        # factor times 0: 0 · NaN would be NaN
        per_row = rows.per_row(factor, 0.0).to(target.dtype)  # (M, D, r)
        u = u.masked_fill(~rows.active.unsqueeze(1), 0.0)
        target.unsqueeze(1).baddbmm_(u.unsqueeze(1), per_row.transpose(1, 2))
        return target
    u_sorted = u.index_select(0, rows.perm)
    chunk = max(1, CHUNK_ELEMENTS // max(target.shape[1], 1))
    for adapter, start, end in rows.segments:
        f = factor[adapter].to(target.dtype)
        for first in range(start, end, chunk):
            last = min(first + chunk, end)
            target.index_add_(0, rows.perm[first:last], u_sorted[first:last] @ f.T)
    return target


def outer_sums(rows, a, b):
    """For each adapter, Σ over its rows of a_iᵀ b_i: (n, P, Q) for a (M, P) and
    b (M, Q), in float32 (float64 for float64 inputs); rows with id -1 add nothing."""
    dtype = reduction_dtype(a.dtype, b.dtype)
    shape = (a.shape[1], b.shape[1])
    if rows.plan == GATHER:
        # slot 0 collects the rows without an adapter and is dropped
        sums = a.new_zeros((rows.n_adapters + 1, *shape), dtype=dtype)
        sums.index_add_(0, rows.ids + 1, a.to(dtype).unsqueeze(2) * b.to(dtype).unsqueeze(1))
        return sums[1:]
    sums = a.new_zeros((rows.n_adapters, *shape), dtype=dtype)
    a_sorted, b_sorted = a.index_select(0, rows.perm), b.index_select(0, rows.perm)
    for adapter, start, end in rows.segments:
        sums[adapter] = a_sorted[start:end].T @ b_sorted[start:end]
    return sums


# -- VeFA ----------------------------------------------------------------------


def scaled_rows_input(x, scale, shift, rows):
    """x_i ⊙ s_a + t_a per row (x itself for id -1), in the wider dtype, rounded to x's once."""
    s = rows.per_row(scale, 1.0)
    if shift is None:
        return (x * s).to(x.dtype)
    return torch.addcmul(rows.per_row(shift, 0.0), x, s).to(x.dtype)


def vefa_indexed_backward(ctx, dy):
    """The backward of an indexed VeFA forward that saved (x, weight, scale, shift, ids)."""
    x, weight, scale, shift, ids = ctx.saved_tensors
    need_x, need_weight, need_bias, need_scale, need_shift = ctx.needs_input_grad[:5]
    rows = RowGroups(ids, scale.shape[0], GATHER)
    dx = dweight = dbias = dscale = dshift = None
    if need_x or need_scale or need_shift:
        g = dy @ weight  # gradient w.r.t. each row's scaled input
        reduce_dtype = reduction_dtype(x.dtype, scale.dtype)
        slots = ids + 1  # slot 0 collects the rows without an adapter and is dropped
        sums = (scale.shape[0] + 1, scale.shape[1])
        if need_scale:
            dscale = g.new_zeros(sums, dtype=reduce_dtype).index_add_(0, slots, (g * x).to(reduce_dtype))
            dscale = dscale[1:].to(scale.dtype)
        if need_shift:
            dshift = g.new_zeros(sums, dtype=reduce_dtype).index_add_(0, slots, g.to(reduce_dtype))
            dshift = dshift[1:].to(shift.dtype)
        if need_x:
            dx = g.mul_(rows.per_row(scale, 1.0))
    if need_weight:
        dweight = dy.T @ scaled_rows_input(x, scale, shift, rows)
    if need_bias:
        dbias = dy.sum(0)
    return dx, dweight, dbias, dscale, dshift, None


def _vefa_forward(x, weight, bias, scale, shift, ids):
    return F.linear(scaled_rows_input(x, scale, shift, RowGroups(ids, scale.shape[0], GATHER)), weight, bias)


# -- LoRA and LoRFA ------------------------------------------------------------


def row_groups_for(x, weight, lora_A, lora_B, ids):
    m, k = x.shape
    n_adapters, r = lora_A.shape[:2]
    return RowGroups(ids, n_adapters, low_rank_plan(m, r, k, lora_B.shape[1]))


def save_low_rank(ctx, x, weight, lora_A, lora_B, scaling, ids, u, dropout_p, dropout_seed, lorfa):
    ctx.save_for_backward(x, weight, lora_A, lora_B, scaling, ids, u)
    ctx.dropout_p, ctx.dropout_seed, ctx.lorfa = dropout_p, dropout_seed, lorfa


def low_rank_indexed_backward(ctx, dy):
    """The backward of an indexed LoRA/LoRFA forward saved by `save_low_rank`.

    DESIGN.md's shared form per row: the low-rank term enters at y (LoRA) or
    at x̃ (LoRFA, where g = dy W0 is ∂L/∂x̃); with `at` that gradient,
    du_i = γ_a at_i B_a, dB_a = γ_a Σ at_iᵀ u_i, dA_a = Σ du_iᵀ x̂_i and
    dx = dy W0 + dropout_bwd(du_i A_a).
    """
    x, weight, lora_A, lora_B, scaling, ids, u = ctx.saved_tensors
    need_x, need_weight, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
    p, seed, lorfa = ctx.dropout_p, ctx.dropout_seed, ctx.lorfa
    rows = row_groups_for(x, weight, lora_A, lora_B, ids)
    dx = dweight = dbias = dA = dB = None

    g = dy @ weight if (need_x or lorfa) else None
    at = g if lorfa else dy
    if need_x or need_A:
        du = shrink(rows, at, lora_B.transpose(1, 2))
        du.mul_(rows.per_row(scaling, 0.0).unsqueeze(1))
    if need_B:
        dB = outer_sums(rows, at, u).mul_(scaling.view(-1, 1, 1)).to(lora_B.dtype)
    if need_A:
        dA = outer_sums(rows, du, apply_dropout(x, p, seed)).to(lora_A.dtype)
    if need_x:
        A_t = lora_A.transpose(1, 2)
        if p == 0.0:
            dx = expand_into(rows, g, du, A_t)  # g is ours: add the low-rank term in place
        else:
            dx = g.add_(apply_dropout(expand_into(rows, torch.zeros_like(g), du, A_t), p, seed))
    if need_weight:
        # ∂y/∂W0 = dyᵀ x for LoRA and dyᵀ x̃ for LoRFA
        x_in = expand_into(rows, x.clone(), u, lora_B, scaling) if lorfa else x
        dweight = dy.T @ x_in
    if need_bias:
        dbias = dy.sum(0)
    return dx, dweight, dbias, dA, dB, None, None, None, None, None


def _low_rank_forward(x, weight, bias, lora_A, lora_B, scaling, ids, dropout_p, dropout_seed, lorfa):
    rows = row_groups_for(x, weight, lora_A, lora_B, ids)
    u = shrink(rows, apply_dropout(x, dropout_p, dropout_seed), lora_A)
    if lorfa:
        return F.linear(expand_into(rows, x.clone(), u, lora_B, scaling), weight, bias), u
    return expand_into(rows, F.linear(x, weight, bias), u, lora_B, scaling), u


# -- The ops -------------------------------------------------------------------


def indexed_ops(vefa_forward, low_rank_forward):
    """{"vefa_indexed", "lorfa_indexed", "lora_indexed"}: autograd Functions
    around a forward — torch ops here, the Triton kernels in triton_indexed.py —
    and this module's backward, which both backends share.

    vefa_forward(x, weight, bias, scale, shift, ids) -> y;
    low_rank_forward(x, weight, bias, lora_A, lora_B, scaling, ids, dropout_p,
    dropout_seed, lorfa) -> (y, u = x̂ A_aᵀ).
    """

    class VeFAIndexedFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, scale, shift, ids):
            ctx.save_for_backward(x, weight, scale, shift, ids)
            return vefa_forward(x, weight, bias, scale, shift, ids)

        @staticmethod
        @once_differentiable
        def backward(ctx, dy):
            return vefa_indexed_backward(ctx, dy)

    class LowRankIndexedFunction(torch.autograd.Function):
        """LoRA (lorfa=False) and LoRFA (lorfa=True) with a per-row adapter."""

        @staticmethod
        def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, ids, dropout_p, dropout_seed, lorfa):
            y, u = low_rank_forward(x, weight, bias, lora_A, lora_B, scaling, ids, dropout_p, dropout_seed, lorfa)
            save_low_rank(ctx, x, weight, lora_A, lora_B, scaling, ids, u, dropout_p, dropout_seed, lorfa)
            return y

        @staticmethod
        @once_differentiable
        def backward(ctx, dy):
            return low_rank_indexed_backward(ctx, dy)

    def vefa_linear_indexed(x, weight, bias, scale, shift, ids):
        return VeFAIndexedFunction.apply(x, weight, bias, scale, shift, ids)

    def lorfa_linear_indexed(x, weight, bias, lora_A, lora_B, scaling, ids, dropout_p, dropout_seed):
        return LowRankIndexedFunction.apply(x, weight, bias, lora_A, lora_B, scaling, ids, dropout_p,
                                            dropout_seed, True)

    def lora_linear_indexed(x, weight, bias, lora_A, lora_B, scaling, ids, dropout_p, dropout_seed):
        return LowRankIndexedFunction.apply(x, weight, bias, lora_A, lora_B, scaling, ids, dropout_p,
                                            dropout_seed, False)

    return {"vefa_indexed": vefa_linear_indexed, "lorfa_indexed": lorfa_linear_indexed,
            "lora_indexed": lora_linear_indexed}


_TORCH_OPS = indexed_ops(_vefa_forward, _low_rank_forward)
vefa_linear_indexed = _TORCH_OPS["vefa_indexed"]
lorfa_linear_indexed = _TORCH_OPS["lorfa_indexed"]
lora_linear_indexed = _TORCH_OPS["lora_indexed"]
