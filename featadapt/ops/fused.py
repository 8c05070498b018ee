"""Autograd Functions over a set of fused kernels: the `triton` and `cuda`
backends are the same Functions over different kernels.

A kernel set provides five ops with one contract (featadapt/kernels/triton
documents them; csrc/ops.cpp implements the same signatures):

    scaled_gemm(x, weight, bias, scale, shift) -> y
    scaled_gemm_backward(dy, x, weight, scale, need_dx, need_dscale, need_dshift) -> (dx, dscale, dshift)
    low_rank_gemm(x, weight, bias, u, c) -> y                     # c = γ·C
    low_rank_gemm_dx(dy, weight, du, a, keep, keep_scale) -> dx
    low_rank_dy_grads(dy, u, c, scaling, need_du, need_dc) -> (du, dc)

Memory rule (DESIGN.md §1), as in the torch backend: VeFA saves x and the
parameters; LoRA and LoRFA save x, u = x̂ Aᵀ (M×r) and the dropout seed, and
draw the dropout mask again in backward. A weight or bias that requires grad
gets its correct gradient, from torch ops.
"""

from dataclasses import dataclass
from typing import Callable

import torch

from .dropout import apply_dropout, keep_mask
from .torch_backend import scaled_input  # x ⊙ s + t as the forward kernels feed their GEMM


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def float64_refusal(backend_name):
    return f"float64 is not supported by the {backend_name} kernels; use backend='torch'"


def dtype_reasons(backend_name, tensors):
    """Why the fused kernels of `backend_name` cannot take these tensors' dtypes ([] when they can)."""
    dtypes = {t.dtype for t in tensors if t is not None}
    if torch.float64 in dtypes:
        return [float64_refusal(backend_name)]
    if not dtypes <= set(KERNEL_DTYPES):
        return [f"dtypes {sorted(map(str, dtypes))} are not supported by the {backend_name} kernels"]
    return []


@dataclass(frozen=True)
class KernelSet:
    scaled_gemm: Callable
    scaled_gemm_backward: Callable
    low_rank_gemm: Callable
    low_rank_gemm_dx: Callable
    low_rank_dy_grads: Callable


def _scaled_c(weight, lora_B, scaling, lorfa):
    """Cγ = γ·C in the activation dtype: C = B for LoRA, W0 B (N×r) for LoRFA."""
    if lorfa:
        return weight @ (lora_B * scaling).to(weight.dtype)  # γ first: W0 B alone may overflow in half precision
    return (lora_B * scaling).to(weight.dtype)


def fused_ops(kernels):
    """{"vefa", "lorfa", "lora"} -> implementations (x flattened to (M, K)) over `kernels`."""

    class VeFAFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, scale, shift):
            ctx.save_for_backward(x, weight, scale, shift)
            return kernels.scaled_gemm(x, weight, bias, scale, shift)

        @staticmethod
        def backward(ctx, dy):
            x, weight, scale, shift = ctx.saved_tensors
            need_x, need_weight, need_bias, need_scale, need_shift = ctx.needs_input_grad[:5]
            dx, dscale, dshift = kernels.scaled_gemm_backward(
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

    class LowRankFunction(torch.autograd.Function):
        """LoRA and LoRFA in DESIGN.md's shared form y = x W0ᵀ + γ u Cᵀ + b."""

        @staticmethod
        def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed, lorfa):
            u = apply_dropout(x, dropout_p, dropout_seed) @ lora_A.to(x.dtype).T
            y = kernels.low_rank_gemm(x, weight, bias, u, _scaled_c(weight, lora_B, scaling, lorfa))
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
                du, dC = kernels.low_rank_dy_grads(dy, u, c, scaling, need_du, need_B)
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
                dx = kernels.low_rank_gemm_dx(dy, weight, du, lora_A.to(x.dtype), keep, keep_scale)
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

    return {"vefa": vefa_linear, "lorfa": lorfa_linear, "lora": lora_linear}
