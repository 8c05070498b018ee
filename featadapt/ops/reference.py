"""The `reference` backend: each method written as the plain torch expression of
its definition (DESIGN.md §1), differentiated by autograd. It is the test
oracle, not a fast path, and never chosen automatically.

Every function takes x already flattened to (M, K). Adapter parameters may have
another floating dtype than x: the adapter arithmetic runs in the wider of the
two, the frozen matmul in x's dtype, and the result has x's dtype.

The scaling γ multiplies the rank-r u before it is expanded (γu · Bᵀ), as in
every backend and plan: in half precision u · Bᵀ alone can overflow where the
scaled term does not.
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
    x_tilde = x.to(dtype) + (scaling * u) @ lora_B.to(dtype).T
    return F.linear(x_tilde.to(x.dtype), weight, bias)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed):
    # u = x̂ Aᵀ,  y = x W0ᵀ + b + γ u Bᵀ
    dtype = _wider(x, lora_A)
    x_hat = apply_dropout(x, dropout_p, dropout_seed).to(dtype)
    u = x_hat @ lora_A.to(dtype).T
    y = F.linear(x, weight, bias).to(dtype) + (scaling * u) @ lora_B.to(dtype).T
    return y.to(x.dtype)


# -- many adapters in one batch: row i uses adapter ids[i]; -1 is the base layer --
#
# Written row by row, the definition itself; the other backends group or gather.
# Each stacked parameter is unbound into its adapters once, so that autograd
# gathers their gradients once, not a zero (n, ...) tensor per row.


def _per_row(x, weight, bias, ids, row_output, params):
    ids = ids.tolist()
    rows = [F.linear(x[i], weight, bias) if ids[i] < 0 else row_output(i, ids[i]) for i in range(x.shape[0])]
    if not rows:  # no rows: the parameters still get a (zero) gradient, as from the other backends
        return F.linear(x, weight, bias) + sum(p.sum() for p in params if p is not None) * 0
    return torch.stack(rows)


def vefa_linear_indexed(x, weight, bias, scale, shift, ids):
    scales = scale.unbind(0)
    shifts = shift.unbind(0) if shift is not None else None

    def row(i, a):
        x_tilde = x[i] * scales[a]
        if shifts is not None:
            x_tilde = x_tilde + shifts[a]
        return F.linear(x_tilde.to(x.dtype), weight, bias)

    return _per_row(x, weight, bias, ids, row, (scale, shift))


def lorfa_linear_indexed(x, weight, bias, lora_A, lora_B, scaling, ids, dropout_p, dropout_seed):
    dtype = _wider(x, lora_A)
    x_hat = apply_dropout(x, dropout_p, dropout_seed).to(dtype)
    As, Bs, gammas = lora_A.to(dtype).unbind(0), lora_B.to(dtype).unbind(0), scaling.to(dtype).unbind(0)

    def row(i, a):
        u = As[a] @ x_hat[i]
        x_tilde = x[i].to(dtype) + Bs[a] @ (gammas[a] * u)
        return F.linear(x_tilde.to(x.dtype), weight, bias)

    return _per_row(x, weight, bias, ids, row, (lora_A, lora_B))


def lora_linear_indexed(x, weight, bias, lora_A, lora_B, scaling, ids, dropout_p, dropout_seed):
    dtype = _wider(x, lora_A)
    x_hat = apply_dropout(x, dropout_p, dropout_seed).to(dtype)
    As, Bs, gammas = lora_A.to(dtype).unbind(0), lora_B.to(dtype).unbind(0), scaling.to(dtype).unbind(0)

    def row(i, a):
        u = As[a] @ x_hat[i]
        y = F.linear(x[i], weight, bias).to(dtype) + Bs[a] @ (gammas[a] * u)
        return y.to(x.dtype)

    return _per_row(x, weight, bias, ids, row, (lora_A, lora_B))
