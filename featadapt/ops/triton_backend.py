"""The `triton` backend: autograd Functions over the fused Triton kernels.

The kernels live in featadapt.kernels.triton and are registered as torch
custom ops (featadapt::scaled_gemm, ...). They run on CUDA tensors, or on CPU
tensors under TRITON_INTERPRET=1 (set before importing featadapt), which is
how the tests check them without a GPU; automatic dispatch never sends CPU
tensors to the interpreter, only backend="triton" does.

Memory rule (DESIGN.md §1), as in the torch backend: VeFA saves x and the
parameters; LoRA and LoRFA save x, u = x̂ Aᵀ (M×r) and the dropout seed, and
draw the dropout mask again in backward.

A weight or bias that requires grad gets its correct gradient, from torch ops.
"""

import torch

from .dispatch import Backend  # dispatch imports this module last, once Backend exists
from .dropout import apply_dropout, keep_mask
from .torch_backend import scaled_input  # x ⊙ s + t as the forward kernel feeds its GEMM

try:
    from ..kernels.triton import INTERPRET
    from ..kernels.triton.low_rank_gemm import low_rank_dy_grads, low_rank_gemm, low_rank_gemm_dx
    from ..kernels.triton.scaled_gemm import scaled_gemm, scaled_gemm_backward
except Exception as error:  # a missing or broken triton must not break `import featadapt`
    _IMPORT_ERROR = f"triton is not importable ({type(error).__name__}: {error})"
else:
    _IMPORT_ERROR = None

FLOAT64 = "float64 is not supported by the triton kernels; use backend='torch'"
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class VeFAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift):
        ctx.save_for_backward(x, weight, scale, shift)
        return scaled_gemm(x, weight, bias, scale, shift)

    @staticmethod
    def backward(ctx, dy):
        x, weight, scale, shift = ctx.saved_tensors
        need_x, need_weight, need_bias, need_scale, need_shift = ctx.needs_input_grad[:5]
        dx, dscale, dshift = scaled_gemm_backward(
            dy, x, weight, scale, need_x, need_scale, need_shift
        )
        dweight = dy.T @ scaled_input(x, scale, shift) if need_weight else None
        dbias = dy.sum(0) if need_bias else None
        return (
            dx if need_x else None,
            dweight,
            dbias,
            dscale.to(scale.dtype) if need_scale else None,
            dshift.to(shift.dtype) if need_shift else None,
        )


def _scaled_c(weight, lora_B, scaling, lorfa):
    """Cγ = γ·C in the activation dtype: C = B for LoRA, W0 B (N×r) for LoRFA."""
    if lorfa:
        return (weight @ lora_B.to(weight.dtype)).mul_(scaling)
    return (lora_B * scaling).to(weight.dtype)


class LowRankFunction(torch.autograd.Function):
    """LoRA and LoRFA in DESIGN.md's shared form y = x W0ᵀ + γ u Cᵀ + b."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed, lorfa):
        u = apply_dropout(x, dropout_p, dropout_seed) @ lora_A.to(x.dtype).T
        y = low_rank_gemm(x, weight, bias, u, _scaled_c(weight, lora_B, scaling, lorfa))
        ctx.save_for_backward(x, weight, lora_A, lora_B, u)
        ctx.scaling, ctx.dropout_p, ctx.dropout_seed, ctx.lorfa = scaling, dropout_p, dropout_seed, lorfa
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, u = ctx.saved_tensors
        need_x, need_weight, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        scaling, p, seed, lorfa = ctx.scaling, ctx.dropout_p, ctx.dropout_seed, ctx.lorfa
        dx = dweight = dbias = dA = dB = None

        # du = γ dy C and dC = γ dyᵀ u from one kernel that reads dy once;
        # Cγ (for LoRFA a GEMM) only when du is wanted.
        need_du = need_x or need_A
        if need_du or need_B:
            c = _scaled_c(weight, lora_B, scaling, lorfa) if need_du else u.new_empty((0, u.shape[1]))
            du, dC = low_rank_dy_grads(dy, u, c, scaling, need_du, need_B)
            du = du.to(x.dtype)
        if need_B:
            dB = (weight.T @ dC.to(weight.dtype) if lorfa else dC).to(lora_B.dtype)
        keep = keep_mask(x.shape, p, seed, x.device) if p > 0.0 and (need_x or need_A) else None
        keep_scale = 1.0 / (1.0 - p)
        if need_A:
            # x̂ exactly as apply_dropout draws it, from the mask drawn once above
            x_hat = x if keep is None else x * keep.to(x.dtype) * keep_scale
            dA = (du.T @ x_hat).to(lora_A.dtype)
        if need_x:
            dx = low_rank_gemm_dx(dy, weight, du, lora_A.to(x.dtype), keep, keep_scale)
        if need_weight:
            # ∂y/∂W0 = dyᵀ x for LoRA and dyᵀ x̃ for LoRFA (C = W0 B depends on W0 too)
            x_in = torch.addmm(x, u, lora_B.to(x.dtype).T, alpha=scaling) if lorfa else x
            dweight = dy.T @ x_in
        if need_bias:
            dbias = dy.sum(0)
        return dx, dweight, dbias, dA, dB, None, None, None, None


def vefa_linear(x, weight, bias, scale, shift):
    return VeFAFunction.apply(x, weight, bias, scale, shift)


def lorfa_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed):
    return LowRankFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed, True)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed):
    return LowRankFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed, False)


# -- what it can run -----------------------------------------------------------


def unavailable_reason():
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not INTERPRET and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU for testing)"
    return None


def not_supported_reasons(op, tensors):
    present = [t for t in tensors if t is not None]
    reasons = []
    device = present[0].device
    if device.type != "cuda" and not (INTERPRET and device.type == "cpu"):
        reasons.append(f"tensors on {device.type} are not supported: the kernels run on CUDA "
                       "(or on CPU under TRITON_INTERPRET=1, for testing)")
    dtypes = {t.dtype for t in present}
    if torch.float64 in dtypes:
        reasons.append(FLOAT64)
    elif not dtypes <= set(_SUPPORTED_DTYPES):
        reasons.append(f"dtypes {sorted(map(str, dtypes))} are not supported by the triton kernels")
    if INTERPRET and torch.bfloat16 in dtypes:
        reasons.append("bfloat16 arithmetic is wrong in Triton's CPU interpreter; run on a CUDA device")
    return reasons


def auto_skip_reasons(op, tensors):
    if tensors[0].device.type == "cpu":
        return ["CPU tensors run the kernels in Triton's interpreter, for testing only: "
                "ask for backend='triton' by name"]
    return []


BACKEND = Backend(
    name="triton",
    summary="fused Triton kernels; CUDA (CPU only under TRITON_INTERPRET=1, by name)",
    ops={"vefa": vefa_linear, "lorfa": lorfa_linear, "lora": lora_linear},
    auto_priority=10,
    unavailable_reason=unavailable_reason,
    not_supported_reasons=not_supported_reasons,
    auto_skip_reasons=auto_skip_reasons,
)
