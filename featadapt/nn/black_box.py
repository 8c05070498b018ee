"""Adapters on bases the fused ops cannot read: quantized linears and convolutions.

Feature-space adaptation only transforms the layer's input, so the base is
called as a black box (DESIGN.md §1, "Other frozen bases"):

- VeFA:  ``base(x ⊙ s + t)``, s and t over the input channels;
- LoRFA: ``base(x + γ · (x̂ Aᵀ) Bᵀ)``, the low-rank map over the input channels;
- LoRA:  ``base(x) + γ · (x̂ Aᵀ) Bᵀ`` on the output side, as PEFT defines it
  (on a convolution, A is a convolution with the base's kernel, stride,
  padding and dilation, and B a 1×1 convolution).

The adapters compute with torch ops; the base's own forward does the rest
(bitsandbytes' or torchao's kernels, or the convolution), so a quantized weight
is never dequantized per step. Gradients reach the adapters only.

Merging a convolution's adapter is exact and unmerging bit-exact, as for
linears. Merging into a quantized weight re-quantizes it and loses
precision: `merge()` refuses unless asked with ``requantize=True``, and
`featadapt.unload(model, merge=True, dequantize=True)` returns
full-precision layers instead.
"""

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.validation import check_dropout
from .adapter import AdapterLayer, check_torch_only_backend
from .bases import (
    CONV,
    QUANTIZED,
    base_kind,
    check_input_gradients,
    check_requantizable,
    compute_dtype,
    dequantized_weight,
    guard_bnb_cpu_repacking,
    merge_dtype,
    overridden_forward_reason,
    quantized_description,
    requantize_merged,
    restore_bias,
    restore_quantized,
    saved_original_weight,
    write_merged_bias,
)
from .input_channels import (
    channel_dim,
    channel_linear,
    check_shift_mergeable,
    map_input_channels,
    scale_input_channels,
    scaled_input,
)


class BlackBoxAdapter(AdapterLayer):
    """Shared machinery of the adapters that call their base as a black box.

    Subclasses set `method` and implement `_adapted_forward(x)` and
    `_merged(w0, b0)` -> (weight, bias) in the base's (out, in, ...) layout.
    """

    def __init__(self, base_layer, *, backend=None):
        name = type(self).__name__
        kind = base_kind(base_layer)
        if kind not in (QUANTIZED, CONV):
            reason = overridden_forward_reason(base_layer)
            raise TypeError(
                f"{name}: base_layer must be a quantized linear (bitsandbytes Linear4bit/Linear8bitLt, "
                f"a torchao-quantized nn.Linear) or an nn.Conv1d/2d/3d, got {type(base_layer).__name__}"
                + (f": {reason}" if reason else "")
            )
        super().__init__()
        self.kind = kind
        self.backend = check_torch_only_backend(name, backend)
        base_layer.requires_grad_(False)
        if kind == QUANTIZED:
            guard_bnb_cpu_repacking(base_layer)
            check_input_gradients(base_layer, name)
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
            self.spatial_dims = 0
        else:
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
            self.spatial_dims = len(base_layer.kernel_size)
        self.base_layer = base_layer
        self.merged = False
        self.requantization_error = None
        self._before_merge = None  # what unmerge() puts back, bit for bit

    # -- shapes --------------------------------------------------------------

    def _adapter_kwargs(self, dtype):
        if dtype is None:
            layer_dtype = compute_dtype(self.base_layer) if self.kind == QUANTIZED else self.base_layer.weight.dtype
            dtype = torch.float32 if layer_dtype in (torch.float16, torch.bfloat16) else layer_dtype
        device = self.base_layer.weight.device
        return {"device": device, "dtype": dtype}

    def _channel_linear(self, x, matrix):
        """``x`` with its channel dimension multiplied by ``matrixᵀ`` (matrix: (out, C))."""
        return channel_linear(x, matrix, channel_dim(x, self.spatial_dims))

    def _check_input(self, x):
        dim = channel_dim(x, self.spatial_dims)
        if dim < 0 or x.shape[dim] != self.in_features:
            what = "(..., in_features)" if self.kind == QUANTIZED else "(N, C, *spatial) or (C, *spatial)"
            raise ValueError(
                f"{type(self).__name__}: x must be {what} with {self.in_features} input channels, "
                f"got shape {tuple(x.shape)}"
            )

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        self._check_input(x)
        return self._adapted_forward(x)

    # -- weights ---------------------------------------------------------------

    def original_weight(self):
        """W0 as the base computes with it: dequantized for a quantized base,
        (out, in/groups, *kernel) for a convolution; merged or not."""
        if self.kind == QUANTIZED:
            if self.merged:
                return saved_original_weight(self.base_layer, self._before_merge)
            return dequantized_weight(self.base_layer)
        return self._before_merge["weight"] if self.merged else self.base_layer.weight

    def original_bias(self):
        if self.merged:
            return self._before_merge["bias"]
        return self.base_layer.bias

    @torch.no_grad()
    def effective_weight(self):
        return self._merged(self.original_weight(), self.original_bias())[0]

    @torch.no_grad()
    def effective_bias(self):
        return self._merged(self.original_weight(), self.original_bias())[1]

    @torch.no_grad()
    def delta_weight(self):
        w0 = self.original_weight()
        merged = self._merged(w0, self.original_bias())[0]
        return merged - w0.to(merged.dtype)

    @torch.no_grad()
    def merge(self, *, requantize=False):
        """Fold the adapter into the base layer. Exact for a convolution; for a
        quantized base only with ``requantize=True``, which quantizes the merged
        weight again (lossy: the relative error is kept in
        `requantization_error` and reported in a warning)."""
        if self._already(True, "merge"):
            return
        base = self.base_layer
        if self.kind == QUANTIZED:
            self._merge_quantized(requantize)
            return
        weight, bias = self._merged(base.weight, base.bias)
        self._before_merge = {"weight": base.weight.detach().clone(),
                              "bias": None if base.bias is None else base.bias.detach().clone(),
                              "bias_created": False}
        base.weight.copy_(weight)
        if bias is not None:
            self._before_merge["bias_created"] = write_merged_bias(base, bias, base.weight.dtype)
        self.merged = True

    def _merge_quantized(self, requantize):
        base = self.base_layer
        owner = f"{type(self).__name__}.merge({'requantize=True' if requantize else ''})"
        check_requantizable(owner, base, requantize, "merge(requantize=True)",
                            "featadapt.unload(model, merge=True, dequantize=True)")
        weight, bias = self._merged(dequantized_weight(base), base.bias)
        self._before_merge, self.requantization_error = requantize_merged(base, weight, bias)
        warnings.warn(
            f"{type(self).__name__}.merge(requantize=True): the merged weight was re-quantized "
            f"({quantized_description(base)}); relative error {self.requantization_error:.3g}",
            stacklevel=3,
        )
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Put the base layer's original weight and bias back, bit for bit."""
        if self._already(False, "unmerge"):
            return
        base, saved = self.base_layer, self._before_merge
        if self.kind == QUANTIZED:
            restore_quantized(base, saved)
        else:
            base.weight.copy_(saved["weight"])
            restore_bias(base, saved["bias"], saved["bias_created"])
        self._before_merge = None
        self.requantization_error = None
        self.merged = False

    @torch.no_grad()
    def dequantized_layer(self, dtype=torch.float32):
        """A plain nn.Linear (or the convolution, copied) computing what this
        adapted layer computes, the adapter folded in exactly, in `dtype`."""
        if self.kind == CONV:
            raise TypeError(f"{type(self).__name__}.dequantized_layer(): a convolution base is not quantized; merge() it")
        b0 = self.original_bias()
        weight, bias = self._merged(self.original_weight(), b0)
        if bias is None:
            bias = b0
        layer = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                          device=weight.device, dtype=dtype)
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer.requires_grad_(False)

    def extra_repr(self):
        options = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return (f"method={self.method}, base={self.kind}, in={self.in_features}, out={self.out_features}, "
                f"{options}, merged={self.merged}")


class VeFABlackBox(BlackBoxAdapter):
    """VeFA on a quantized linear or a convolution: ``base(x ⊙ scale + shift)`` over input channels."""

    method = "vefa"

    def __init__(self, base_layer, *, shift=False, backend=None, dtype=None):
        super().__init__(base_layer, backend=backend)
        if shift and self.kind == CONV:
            check_shift_mergeable(type(self).__name__, base_layer)
        kwargs = self._adapter_kwargs(dtype)
        self.scale = nn.Parameter(torch.ones(self.in_features, **kwargs))
        self.shift = nn.Parameter(torch.zeros(self.in_features, **kwargs)) if shift else None

    def config(self):
        return {"shift": self.shift is not None}

    def _adapted_forward(self, x):
        return self.base_layer(scaled_input(x, self.scale, self.shift, self.spatial_dims))

    def _merged(self, w0, b0):
        dtype = merge_dtype(w0, self.scale)
        return scale_input_channels(w0.to(dtype), b0, self.scale, self.shift, getattr(self.base_layer, "groups", 1))


class _LowRankBlackBox(BlackBoxAdapter):
    def __init__(self, base_layer, r, alpha, dropout, rslora, backend, dtype):
        name = type(self).__name__
        super().__init__(base_layer, backend=backend)
        if getattr(base_layer, "groups", 1) != 1:
            raise ValueError(
                f"{name}: grouped and depthwise convolutions (groups={base_layer.groups}) are not supported: "
                "a low-rank map mixes channels across groups; use VeFA, which scales each channel"
            )
        k = self.in_features
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 1 <= r <= k:
            raise ValueError(f"{name}: r must be an integer in [1, in_features={k}], got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
            raise ValueError(f"{name}: alpha must be a finite real number, got {alpha!r}")
        self.r, self.alpha, self.rslora = int(r), alpha, bool(rslora)
        self.dropout = check_dropout(name, "dropout", dropout)
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r

    def config(self):
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "rslora": self.rslora}

    def _dropped(self, x):
        return F.dropout(x, self.dropout, training=True) if self.training and self.dropout > 0 else x


class LoRFABlackBox(_LowRankBlackBox):
    """LoRFA on a quantized linear or a convolution: ``base(x + γ · (x̂ Aᵀ) Bᵀ)`` over input channels."""

    method = "lorfa"

    def __init__(self, base_layer, r=8, alpha=16, dropout=0.0, rslora=False, *, backend=None, dtype=None):
        super().__init__(base_layer, r, alpha, dropout, rslora, backend, dtype)
        kwargs = self._adapter_kwargs(dtype)
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **kwargs))
        self.lora_B = nn.Parameter(torch.zeros(self.in_features, self.r, **kwargs))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def _adapted_forward(self, x):
        u = self._channel_linear(self._dropped(x), self.lora_A.to(x.dtype))
        delta = self._channel_linear(u, self.lora_B.to(x.dtype))
        return self.base_layer(x + self.scaling * delta)

    def _merged(self, w0, b0):
        dtype = merge_dtype(w0, self.lora_A)
        return map_input_channels(w0.to(dtype), [(self.lora_A, self.lora_B, self.scaling)]), None


class LoRABlackBox(_LowRankBlackBox):
    """LoRA on a quantized linear or a convolution: ``base(x) + γ · B(A(x̂))``.

    On a convolution `lora_A` is (r, in, *kernel), applied with the base's
    stride, padding and dilation, and `lora_B` (out, r) is a 1×1 convolution,
    as in PEFT.
    """

    method = "lora"

    def __init__(self, base_layer, r=8, alpha=16, dropout=0.0, rslora=False, *, backend=None, dtype=None):
        super().__init__(base_layer, r, alpha, dropout, rslora, backend, dtype)
        kwargs = self._adapter_kwargs(dtype)
        kernel = tuple(base_layer.kernel_size) if self.kind == CONV else ()
        self.lora_A = nn.Parameter(torch.empty((self.r, self.in_features) + kernel, **kwargs))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, **kwargs))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def _adapted_forward(self, x):
        y = self.base_layer(x)
        x_hat = self._dropped(x)
        if self.kind == CONV:
            u = self.base_layer._conv_forward(x_hat, self.lora_A.to(x.dtype), None)
        else:
            u = self._channel_linear(x_hat, self.lora_A.to(x.dtype))
        delta = self._channel_linear(u, self.lora_B.to(x.dtype))
        return y + (self.scaling * delta).to(y.dtype)

    def _merged(self, w0, b0):
        dtype = merge_dtype(w0, self.lora_A)
        delta = self.lora_B.to(dtype) @ self.lora_A.to(dtype).flatten(1)
        return w0.to(dtype) + self.scaling * delta.view(w0.shape), None


BLACK_BOX_CLASSES = {cls.method: cls for cls in (VeFABlackBox, LoRFABlackBox, LoRABlackBox)}
