"""The `reference` backend: each method written as the plain torch expression of
its definition (DESIGN.md §1), differentiated by autograd. It is the test
oracle, not a fast path, and never chosen automatically.

Every function takes x already flattened to (M, K). Adapter parameters may have
another floating dtype than x: the adapter arithmetic runs in the wider of the
two, the frozen matmul in x's dtype, and the result has x's dtype.
"""

import torch
import torch.nn.functional as F

from .dropout import apply_dropout


def _wider(x, param):
    return torch.promote_types(x.dtype, param.dtype)


def vefa_linear(x, weight, bias, scale, shift):
    # y = (x ⊙ s + t) W0ᵀ + b
    x_tilde = x * scale
    if shift is not None:
        x_tilde = x_tilde + shift
    return F.linear(x_tilde.to(x.dtype), weight, bias)


def lorfa_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed):
    # u = x̂ Aᵀ,  x̃ = x + γ u Bᵀ,  y = x̃ W0ᵀ + b
    dtype = _wider(x, lora_A)
    x_hat = apply_dropout(x, dropout_p, dropout_seed).to(dtype)
    u = x_hat @ lora_A.to(dtype).T
    x_tilde = x.to(dtype) + scaling * (u @ lora_B.to(dtype).T)
    return F.linear(x_tilde.to(x.dtype), weight, bias)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed):
    # u = x̂ Aᵀ,  y = x W0ᵀ + b + γ u Bᵀ
    dtype = _wider(x, lora_A)
    x_hat = apply_dropout(x, dropout_p, dropout_seed).to(dtype)
    u = x_hat @ lora_A.to(dtype).T
    y = F.linear(x, weight, bias).to(dtype) + scaling * (u @ lora_B.to(dtype).T)
    return y.to(x.dtype)
