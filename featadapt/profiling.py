"""Measuring what a layer keeps for backward."""

import torch


def saved_activation_bytes(fn, exclude=()):
    """Bytes of the tensors autograd saves for backward while running fn().

    Tensors sharing memory with one in `exclude` (the parameters, typically)
    are left out; each distinct saved view is counted once, as
    numel · element_size. Deterministic on any machine.
    """
    excluded = {t.data_ptr() for t in exclude if t is not None and t.numel() > 0}
    seen = {}

    def pack(tensor):
        if tensor.numel() > 0 and tensor.data_ptr() not in excluded:
            key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
            seen[key] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    del out
    return sum(seen.values())
