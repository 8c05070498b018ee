"""The `torch` backend: memory-lean autograd Functions on plain torch ops.

Memory rule (DESIGN.md §1): VeFA saves x and the parameters; LoRA and LoRFA
save x, u = x̂ Aᵀ (M×r) and the dropout seed, and draw x̂ again in backward.
Nothing of size M×N, no x̃, no float32 copy of a half-precision x.

Every function takes x flattened to (M, K). The frozen matmuls run in x's
dtype (float32 accumulation is the matmul library's). Adapter parameters may
be wider (float32 on bfloat16 activations): they are rounded to x's dtype
before they touch an activation-sized tensor, because on the CPU an
elementwise op that mixes dtypes converts the whole activation to float32 and
back (about ten times the cost of the op itself); the one extra rounding of a
K-vector stays far inside the accuracy targets (DESIGN.md §4). Parameter
gradients are reduced in float32 or wider (featadapt.kernels.cpu fuses
VeFA's backward into one pass where the extension is built).

Work on the weight (N×K) is done once instead of on an activation (M×K or
M×N) whenever it is the smaller: VeFA scales W0 instead of x, and LoRA/LoRFA
without dropout merge the low-rank term into the weight, W0 + γ C A, so that
forward and backward each run one frozen-size GEMM and no activation-sized
addition.

A weight or bias that requires grad gets its correct gradient.
"""

import torch
import torch.nn.functional as F

from ..kernels import cpu as cpu_kernels
from .dropout import apply_dropout

# The three unmerged low-rank forms. LoRA adds γ u Bᵀ to the output. LoRFA
# either adds γ u (W0 B)ᵀ to the output ("projected", C = W0 B is N×r) or
# materialises x̃ = x + γ u Bᵀ (M×K) and runs the frozen GEMM on it ("input").
LORA = "lora"
LORFA_PROJECTED = "lorfa-projected"
LORFA_INPUT = "lorfa-input"


def scales_weight_once(m, n):
    """VeFA: scaling W0 (N×K) is cheaper than scaling x (M×K) when M > N."""
    return m > n


def lorfa_form(m, n, k):
    """The cheaper unmerged LoRFA form for an (M, K) x (K, N) problem.

    Beyond the frozen GEMM, each direction costs about 2·r·M·K FLOPs more in
    the input form and 2·r·(N·K + M·N) more in the projected form, so the input
    form wins unless N is small against both M and K.
    """
    return LORFA_INPUT if m * k < n * (m + k) else LORFA_PROJECTED


def merges_low_rank_weight(m, n, k):
    """LoRA/LoRFA without dropout: run each GEMM on W0 + γ C A (N×K) instead
    of adding the low-rank term to an activation.

    Merging writes an N×K weight in forward and again in backward; not merging
    adds γ u Cᵀ into y (M×N) and du A into dx (M×K). (With dropout on the
    adapter path x̂ ≠ x, and the term cannot be merged.)
    """
    return 2 * n * k < m * (n + k)


def reduction_dtype(*dtypes):
    """The dtype parameter-gradient sums are taken in: float32, or float64 with a float64 input."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _like(param, tensor):
    """A (small) parameter in `tensor`'s dtype, so that ops on `tensor` do not mix dtypes."""
    return None if param is None else param.to(tensor.dtype)


def scaled_input(x, scale, shift):
    """x ⊙ s + t in x's dtype, one pass over x (s and t rounded to x's dtype first)."""
    if shift is None:
        return x * _like(scale, x)
    return torch.addcmul(_like(shift, x), x, _like(scale, x))


def scaled_weight(weight, scale):
    """W0 · diag(s) in W0's dtype."""
    return weight * _like(scale, weight)


def vefa_input_grads(g, x, scale, need_scale, need_shift):
    """dx = g ⊙ s, ds = Σ_m g ⊙ x, dt = Σ_m g (None where not needed).

    g (M×K) is ours and becomes dx. The sums are float32 or wider; on the CPU
    the fused kernel does all three in one pass over g and x, elsewhere torch
    ops do (converting the product to float32 when x is half precision).
    """
    reduce_dtype = reduction_dtype(x.dtype, scale.dtype)
    if reduce_dtype == torch.float32 and cpu_kernels.takes_vefa_input_grads(g, x, scale):
        ds, dt = cpu_kernels.vefa_input_grads(g, x, scale, need_shift)
        return g, ds if need_scale else None, dt
    ds = (g * x).sum(0, dtype=reduce_dtype) if need_scale else None
    dt = g.sum(0, dtype=reduce_dtype) if need_shift else None
    return g.mul_(_like(scale, g)), ds, dt


class VeFAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift):
        if scales_weight_once(x.shape[0], weight.shape[0]):
            # (x ⊙ s + t) W0ᵀ + b = x (W0 diag s)ᵀ + (b + W0 t)
            if shift is not None:
                shifted = F.linear(_like(shift, weight), weight)
                bias = shifted if bias is None else bias + shifted
            y = F.linear(x, scaled_weight(weight, scale), bias)
        else:
            y = F.linear(scaled_input(x, scale, shift), weight, bias)
        ctx.save_for_backward(x, weight, scale, shift)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, scale, shift = ctx.saved_tensors
        need_x, need_weight, need_bias, need_scale, need_shift = ctx.needs_input_grad[:5]
        dx = dweight = dbias = dscale = dshift = None
        if need_x or need_scale or need_shift:
            g = dy @ weight  # gradient w.r.t. the scaled input x ⊙ s + t
            dx, dscale, dshift = vefa_input_grads(g, x, scale, need_scale, need_shift)
            dx = dx if need_x else None
            dscale = None if dscale is None else dscale.to(scale.dtype)
            dshift = None if dshift is None else dshift.to(shift.dtype)
        if need_weight:
            dweight = dy.T @ scaled_input(x, scale, shift)
        if need_bias:
            dbias = dy.sum(0)
        return dx, dweight, dbias, dscale, dshift


def _low_rank_C(weight, B, form):
    """C of DESIGN.md's shared form: B for LoRA, W0 B (N×r) for LoRFA."""
    return B if form == LORA else weight @ B


def _merged_weight(weight, C, A, scaling):
    """W0 + γ C A: LoRA's W0 + γ B A, LoRFA's W0 (I + γ B A)."""
    return torch.addmm(weight, C, A, alpha=scaling)


def _add_low_rank_term(y, u, C, scaling):
    """y + γ u Cᵀ for the fresh output y (M×N) of an autograd Function's forward.

    In place in eager (no second M×N buffer). Under torch.compile out of place:
    torch 2.11's dynamo loses the gradient of a forward output that was mutated
    in place (it becomes zero; pytorch/pytorch#180642), and inductor plans the
    buffers itself anyway.
    """
    if torch.compiler.is_compiling():
        return torch.addmm(y, u, C.T, alpha=scaling)
    return y.addmm_(u, C.T, alpha=scaling)


class LowRankFunction(torch.autograd.Function):
    """LoRA and LoRFA in DESIGN.md's shared form y = x W0ᵀ + γ u Cᵀ + b."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed, form):
        A = _like(lora_A, x)
        B = _like(lora_B, x)
        u = apply_dropout(x, dropout_p, dropout_seed) @ A.T
        merged = merges_low_rank_weight(x.shape[0], weight.shape[0], weight.shape[1]) and dropout_p == 0.0
        if merged:
            y = F.linear(x, _merged_weight(weight, _low_rank_C(weight, B, form), A, scaling), bias)
        elif form == LORFA_INPUT:
            y = F.linear(torch.addmm(x, u, B.T, alpha=scaling), weight, bias)
        else:
            y = _add_low_rank_term(F.linear(x, weight, bias), u, _low_rank_C(weight, B, form), scaling)
        ctx.save_for_backward(x, weight, lora_A, lora_B, u)
        ctx.scaling, ctx.dropout_p, ctx.dropout_seed = scaling, dropout_p, dropout_seed
        ctx.form, ctx.merged = form, merged
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, u = ctx.saved_tensors
        need_x, need_weight, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        scaling, p, seed, form = ctx.scaling, ctx.dropout_p, ctx.dropout_seed, ctx.form
        A = _like(lora_A, x)
        B = _like(lora_B, x)
        dx = dweight = dbias = dA = dB = None

        # du and dB from the gradient where the low-rank term enters: at x̃
        # (input form: g = dy W0 is ∂L/∂x̃) or at y (merged and output forms).
        # γ scales a rank-r factor before each product, as in the forward, so a
        # half-precision product cannot overflow where the scaled one would not.
        g = None
        if ctx.merged:
            C = _low_rank_C(weight, B, form)
            du = dy @ (C * scaling)
            if need_x:
                dx = dy @ _merged_weight(weight, C, A, scaling)  # dy (W0 + γ C A)
        elif form == LORFA_INPUT:
            g = dy @ weight
            du = g @ (B * scaling)
        else:
            g = dy @ weight if need_x else None
            du = dy @ _low_rank_C(weight, B * scaling, form)
        if need_B:
            # gᵀ u and dyᵀ u as (uᵀ g)ᵀ and (uᵀ dy)ᵀ: the orientation the CPU's GEMMs run fastest
            if form == LORFA_INPUT and not ctx.merged:
                dB = ((u * scaling).T @ g).T.contiguous()
            else:
                dC = ((u * scaling).T @ dy).T
                dB = dC.contiguous() if form == LORA else weight.T @ dC
        if need_A:
            dA = du.T @ apply_dropout(x, p, seed)
        if need_x and g is not None:
            # g is ours: add the low-rank term into it in place
            dx = g.addmm_(du, A) if p == 0.0 else g.add_(apply_dropout(du @ A, p, seed))
        if need_weight:
            # ∂y/∂W0 = dyᵀ x for LoRA and dyᵀ x̃ for LoRFA
            x_in = x if form == LORA else torch.addmm(x, u, B.T, alpha=scaling)
            dweight = dy.T @ x_in
        if need_bias:
            dbias = dy.sum(0)
        if dA is not None:
            dA = dA.to(lora_A.dtype)
        if dB is not None:
            dB = dB.to(lora_B.dtype)
        return dx, dweight, dbias, dA, dB, None, None, None, None


def vefa_linear(x, weight, bias, scale, shift):
    return VeFAFunction.apply(x, weight, bias, scale, shift)


def lorfa_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed):
    form = lorfa_form(x.shape[0], weight.shape[0], weight.shape[1])
    return LowRankFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed, form)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed):
    return LowRankFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed, LORA)
