"""Stacked adapter parameters for the indexed ops (adapter_index=): per-adapter
tensors in, one (n, ...) tensor per parameter out. torch.stack keeps the
autograd graph, so gradients reach every adapter's own parameters."""

import torch
import torch.nn.functional as F


def stack_vefa(scales, shifts):
    """(scale (n, K), shift (n, K) or None) from n scales (K,) and n shifts (K,)
    or None each: a missing shift is zero; None when no adapter has one."""
    dtype = scales[0].dtype
    scale = torch.stack([s.reshape(-1).to(dtype) for s in scales])
    if all(t is None for t in shifts):
        return scale, None
    zero = scale.new_zeros(scale.shape[1])
    return scale, torch.stack([zero if t is None else t.reshape(-1).to(dtype) for t in shifts])


def stack_low_rank(lora_As, lora_Bs):
    """(lora_A (n, r, K), lora_B (n, rows, r)) from n pairs A (r_i, K), B (rows, r_i).

    Ranks may differ: each pair is padded with zero rows of A and zero
    columns of B up to the largest r, which adds nothing to u Bᵀ."""
    dtype = lora_As[0].dtype
    r = max(a.shape[0] for a in lora_As)
    A = torch.stack([F.pad(a.to(dtype), (0, 0, 0, r - a.shape[0])) for a in lora_As])
    B = torch.stack([F.pad(b.to(dtype), (0, r - b.shape[1])) for b in lora_Bs])
    return A, B
