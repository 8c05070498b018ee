"""The input-channel math of feature-space adapters on any base, in one place.

A base's weight is laid out output-first: (out, in) for a linear, (out,
in/groups, *kernel) for a convolution. VeFA scales (and shifts) its input
channels; LoRFA maps them through ``I + γ B A``. Both the black-box modules
(`featadapt.nn.black_box`) and the PEFT layers on quantized and convolution
bases (`featadapt.integrations.peft`) compute with these functions, forward
and merged.
"""

import torch


def channel_dim(x, spatial_dims):
    """The channel dimension of a linear input (..., C) (spatial_dims = 0) or a
    convolution input (N, C, *spatial) / unbatched (C, *spatial)."""
    return x.dim() - spatial_dims - 1


def per_channel(vector, spatial_dims):
    """`vector` (C,) shaped to broadcast along an input's channel dimension."""
    return vector.view((-1,) + (1,) * spatial_dims)


def channel_linear(x, matrix, dim):
    """``x`` with its channel dimension `dim` multiplied by ``matrixᵀ`` (matrix: (out, C))."""
    return (x.movedim(dim, -1) @ matrix.T).movedim(-1, dim)


def scaled_input(x, scale, shift, spatial_dims):
    """``x ⊙ scale + shift`` over x's input channels, in x's dtype."""
    s = per_channel(scale, spatial_dims)
    out = x * s if shift is None else torch.addcmul(per_channel(shift, spatial_dims), x, s)
    return out.to(x.dtype)


def scale_input_channels(w0, b0, scale, shift=None, groups=1):
    """(weight, bias or None) of ``base(x ⊙ scale + shift)`` for a base with
    weight `w0` (output-first) and bias `b0`, in w0's dtype: ``W0 · diag(s)``,
    and ``b0 + W0 t`` summed over each output's input channels and kernel."""
    # weight (out, in/groups, *kernel): output group g reads input channels g·(in/groups) + c
    trailing = (1,) * (w0.dim() - 2)
    grouped = w0.reshape((groups, w0.shape[0] // groups) + tuple(w0.shape[1:]))
    weight = (grouped * scale.to(w0.dtype).view(groups, 1, -1, *trailing)).reshape(w0.shape)
    if shift is None:
        return weight, None
    shifted = (grouped * shift.to(w0.dtype).view(groups, 1, -1, *trailing)).flatten(2).sum(-1).reshape(-1)
    return weight, shifted if b0 is None else b0.to(w0.dtype) + shifted


def map_input_channels(w0, factors):
    """The weight of ``base(x + Σ γ (x Aᵀ) Bᵀ)`` for a base with weight `w0`
    (output-first, groups = 1), in w0's dtype: ``W0 ⊛ (I + Σ γ B A)`` over the
    input channels, never forming the C×C matrix. `factors`: (A (r, C), B (C, r), γ)."""
    w = w0.movedim(1, -1)  # (..., in)
    out = w.clone()
    for a, b, scaling in factors:
        out += scaling * ((w @ b.to(w0.dtype)) @ a.to(w0.dtype))
    return out.movedim(-1, 1)


def pads_with_zeros(conv):
    """Whether a convolution pads its input with zeros: a shift of the input
    would not reach the padding, so VeFA's shift could not be merged."""
    padding = conv.padding
    padded = padding != "valid" if isinstance(padding, str) else any(p != 0 for p in padding)
    return padded and conv.padding_mode == "zeros"


def check_shift_mergeable(owner, conv):
    """Refuse VeFA's shift on a convolution that pads with zeros."""
    if pads_with_zeros(conv):
        raise ValueError(
            f"{owner}: shift=True on a convolution that pads with zeros (padding={conv.padding}) is not "
            "supported: the padding would not be shifted, so the adapter could not be merged exactly; "
            "use shift=False or padding_mode='replicate'"
        )
