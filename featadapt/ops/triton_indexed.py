"""The triton backend's ops for many adapters in one batch (adapter_index=):
forward on the indexed Triton kernels (featadapt.kernels.triton.indexed_ops),
backward on torch ops, shared with the torch backend (torch_indexed.py).

Saved for backward, as there: x, the ids and the parameters, and for LoRA and
LoRFA u = x̂ A_aᵀ (M×r); the dropout mask is drawn again from its seed.
"""

from .dropout import apply_dropout
from .torch_indexed import indexed_ops


def indexed_fused_ops(kernels):
    """{"vefa_indexed", "lorfa_indexed", "lora_indexed"} -> implementations over
    `kernels` (the indexed_ops module, or None when triton is missing: the
    backend then reports itself unavailable and these are never called)."""

    def vefa_forward(x, weight, bias, scale, shift, ids):
        return kernels.indexed_scaled_gemm(x, weight, bias, scale, shift, ids)

    def low_rank_forward(x, weight, bias, lora_A, lora_B, scaling, ids, dropout_p, dropout_seed, lorfa):
        u = kernels.indexed_shrink(apply_dropout(x, dropout_p, dropout_seed), lora_A, ids)
        return kernels.indexed_low_rank_gemm(x, weight, bias, u, lora_B, scaling, ids, lorfa), u

    return indexed_ops(vefa_forward, low_rank_forward)
