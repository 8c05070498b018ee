"""The `torch` backend: memory-lean autograd Functions on plain torch ops.

Memory rule (DESIGN.md §1): VeFA saves x and the parameters; LoRA and LoRFA
save x, u = x̂ Aᵀ (M×r) and the dropout seed, and draw x̂ again in backward.
Nothing of size M×N, no x̃, no float32 copy of a half-precision x.

Every function takes x flattened to (M, K). The frozen matmuls run in x's
dtype (float32 accumulation is the matmul library's); adapter parameters may be
wider (float32 on bfloat16 activations): they are cast to x's dtype for the
matmuls, the VeFA scale is applied in the wider dtype before rounding, and
parameter gradients are reduced in float32 or wider.

A weight or bias that requires grad gets its correct gradient.
"""

import torch
import torch.nn.functional as F

from .dropout import apply_dropout

# The three low-rank forms. LoRA adds γ u Bᵀ to the output. LoRFA either adds
# γ u (W0 B)ᵀ to the output ("projected", C = W0 B is N×r) or materialises
# x̃ = x + γ u Bᵀ (M×K) and runs the frozen GEMM on it ("input").
LORA = "lora"
LORFA_PROJECTED = "lorfa-projected"
LORFA_INPUT = "lorfa-input"


def scales_weight_once(m, n):
    """VeFA: scaling W0 (N×K) is cheaper than scaling x (M×K) when M > N."""
    return m > n


def lorfa_form(m, n, k):
    """The cheaper LoRFA form for an (M, K) x (K, N) problem.

    Beyond the frozen GEMM, each direction costs about 2·r·M·K FLOPs more in
    the input form and 2·r·(N·K + M·N) more in the projected form, so the input
    form wins unless N is small against both M and K.
    """
    return LORFA_INPUT if m * k < n * (m + k) else LORFA_PROJECTED


def _reduction_dtype(*dtypes):
    return torch.float64 if torch.float64 in dtypes else torch.float32


def scaled_input(x, scale, shift):
    """x ⊙ s + t, computed in the wider dtype and rounded to x's dtype once."""
    if shift is None:
        return (x * scale).to(x.dtype)
    return torch.addcmul(shift, x, scale).to(x.dtype)


class VeFAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift):
        if scales_weight_once(x.shape[0], weight.shape[0]):
            # (x ⊙ s + t) W0ᵀ + b = x (W0 diag s)ᵀ + (b + W0 t)
            scaled_weight = (weight * scale).to(weight.dtype)
            if shift is not None:
                shifted = F.linear(shift.to(weight.dtype), weight)
                bias = shifted if bias is None else bias + shifted
            y = F.linear(x, scaled_weight, bias)
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
            reduce_dtype = _reduction_dtype(x.dtype, scale.dtype)
            if need_scale:
                dscale = (g * x).sum(0, dtype=reduce_dtype).to(scale.dtype)
            if need_shift:
                dshift = g.sum(0, dtype=reduce_dtype).to(shift.dtype)
            if need_x:
                dx = g.mul_(scale)  # g is ours and no longer needed: scale it in place
        if need_weight:
            dweight = dy.T @ scaled_input(x, scale, shift)
        if need_bias:
            dbias = dy.sum(0)
        return dx, dweight, dbias, dscale, dshift


class LowRankFunction(torch.autograd.Function):
    """LoRA and LoRFA in DESIGN.md's shared form y = x W0ᵀ + γ u Cᵀ + b."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed, form):
        A = lora_A.to(x.dtype)
        B = lora_B.to(x.dtype)
        u = apply_dropout(x, dropout_p, dropout_seed) @ A.T
        if form == LORFA_INPUT:
            y = F.linear(torch.addmm(x, u, B.T, alpha=scaling), weight, bias)
        else:
            C = B if form == LORA else weight @ B
            y = F.linear(x, weight, bias).addmm_(u, C.T, alpha=scaling)
        ctx.save_for_backward(x, weight, lora_A, lora_B, u)
        ctx.scaling, ctx.dropout_p, ctx.dropout_seed, ctx.form = scaling, dropout_p, dropout_seed, form
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, u = ctx.saved_tensors
        need_x, need_weight, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        scaling, p, seed, form = ctx.scaling, ctx.dropout_p, ctx.dropout_seed, ctx.form
        A = lora_A.to(x.dtype)
        B = lora_B.to(x.dtype)
        dx = dweight = dbias = dA = dB = None

        # du and dB from the gradient where the low-rank term enters: at x̃
        # (input form: g = dy W0 is ∂L/∂x̃) or at y (the output forms).
        if form == LORFA_INPUT:
            g = dy @ weight
            du = (g @ B).mul_(scaling)
            if need_B:
                dB = (g.T @ u).mul_(scaling)
        else:
            g = dy @ weight if need_x else None
            C = B if form == LORA else weight @ B
            du = (dy @ C).mul_(scaling)
            if need_B:
                dC = (dy.T @ u).mul_(scaling)
                dB = dC if form == LORA else weight.T @ dC
        if need_A:
            dA = du.T @ apply_dropout(x, p, seed)
        if need_x:
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
