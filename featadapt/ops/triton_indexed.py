"""The triton backend's ops for many adapters in one batch (adapter_index=):
forward on the indexed Triton kernels (featadapt.kernels.triton.indexed_ops),
backward on torch ops, shared with the torch backend (torch_indexed.py).

Saved for backward, as there: x, the ids and the parameters, and for LoRA and
LoRFA u = x̂ A_aᵀ (M×r); the dropout mask is drawn again from its seed.
"""

import torch
from torch.autograd.function import once_differentiable

from .dropout import apply_dropout
from .torch_indexed import low_rank_indexed_backward, save_low_rank, vefa_indexed_backward


def indexed_fused_ops(kernels):
    """{"vefa_indexed", "lorfa_indexed", "lora_indexed"} -> implementations over
    `kernels` (the indexed_ops module, or None when triton is missing: the
    backend then reports itself unavailable and these are never called)."""

    class VeFAIndexedFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, scale, shift, ids):
            ctx.save_for_backward(x, weight, scale, shift, ids)
            return kernels.indexed_scaled_gemm(x, weight, bias, scale, shift, ids)

        @staticmethod
        @once_differentiable
        def backward(ctx, dy):
            return vefa_indexed_backward(ctx, dy)

    class LowRankIndexedFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, ids, dropout_p, dropout_seed, lorfa):
            u = kernels.indexed_shrink(apply_dropout(x, dropout_p, dropout_seed), lora_A, ids)
            y = kernels.indexed_low_rank_gemm(x, weight, bias, u, lora_B, scaling, ids, lorfa)
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

    return {
        "vefa_indexed": vefa_linear_indexed,
        "lorfa_indexed": lorfa_linear_indexed,
        "lora_indexed": lora_linear_indexed,
    }
