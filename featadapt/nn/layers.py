"""VeFALinear, LoRFALinear and LoRALinear: a frozen nn.Linear (or transformers'
Conv1D, as in GPT-2) plus an adapter.

Each starts exactly equal to its base layer. `merge()` folds the adapter into
the base weight for zero-overhead inference; `unmerge()` restores the original
weight bit-exactly from a copy kept while merged (dividing by the scale, or
subtracting the delta, would not be exact in floating point).
"""

import contextvars
import math
import numbers

import torch
from torch import nn

from ..ops import lora_linear, lorfa_linear, vefa_linear
from ..ops.validation import check_dropout
from .adapter import AdapterLayer
from .bases import is_conv1d, is_linear_base, merge_dtype, overridden_forward_reason, restore_bias, write_merged_bias


def is_supported_base(module):
    """nn.Linear with a plain floating-point weight, or transformers' Conv1D: the
    bases these layers (and the fused ops) read directly. Quantized linears and
    convolutions have their own adapters (featadapt.nn.black_box)."""
    return is_linear_base(module)


BASE_TYPES = "an nn.Linear or transformers' Conv1D"

# The named adapters chosen per sequence by featadapt.select_adapters, as
# {id(layer): (bank, ids)}: per thread and per asyncio task, so that concurrent
# requests on one model never see each other's ids (nothing is stored on the
# layers). Keyed by id(): under torch.compile, a dict keyed by the modules
# themselves handed one layer's entry to another.
SELECTED_ADAPTERS = contextvars.ContextVar("featadapt_selected_adapters", default=None)


def _adapter_dtype(base_weight, dtype):
    """Adapters default to float32 on half-precision layers, else the layer's dtype."""
    if dtype is not None:
        return dtype
    if base_weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_weight.dtype


class AdapterLinear(AdapterLayer):
    """Shared machinery: the frozen base layer, merge state and the weight views.

    The base layer is an nn.Linear or transformers' Conv1D. A Conv1D stores its
    weight transposed, (in_features, out_features): the ops get the free view
    ``weight.T`` (N, K), never a copy, and merging writes back in the Conv1D's
    own layout. `weight` and `bias` are the base layer's parameters as stored;
    `original_weight()`, `effective_weight()` and `delta_weight()` are always
    (out_features, in_features).

    Subclasses set `method`, create their parameters, and implement
    `_adapted_forward(x)`, `_merged_weight(w0)`, `_merged_bias(w0, b0)` and
    `config()` (the keyword arguments that rebuild them).
    """

    method = None

    def __init__(self, base_layer, *, backend=None):
        if not is_supported_base(base_layer):
            reason = overridden_forward_reason(base_layer)
            raise TypeError(
                f"{type(self).__name__}: base_layer must be {BASE_TYPES}, got {type(base_layer).__name__}"
                + (f": {reason}" if reason else "")
            )
        super().__init__()
        self.base_layer = base_layer
        # A plain bool, fixed at construction, so torch.compile sees a constant.
        self.transposed_base = is_conv1d(base_layer)
        base_layer.requires_grad_(False)
        self.backend = backend
        self.merged = False
        # Kept only while merged, so that unmerge() is exact.
        self.register_buffer("weight_before_merge", None, persistent=False)
        self.register_buffer("bias_before_merge", None, persistent=False)
        self._bias_created_by_merge = False
        # Named adapters chosen per sequence (featadapt/adapter_bank.py): the
        # stacked bank; the per-sequence ids travel in SELECTED_ADAPTERS.
        self.adapter_bank = None

    @property
    def in_features(self):
        base = self.base_layer
        return base.weight.shape[0] if self.transposed_base else base.in_features

    @property
    def out_features(self):
        base = self.base_layer
        return base.weight.shape[1] if self.transposed_base else base.out_features

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def _adapter_kwargs(self, base_layer, dtype):
        return {"device": base_layer.weight.device, "dtype": _adapter_dtype(base_layer.weight, dtype)}

    def forward(self, x):
        selection = SELECTED_ADAPTERS.get()
        selected = None if selection is None else selection.get(id(self))
        if selected is not None:
            bank, ids = selected
            return bank(self, x, ids)
        if self.merged:
            return self.base_layer(x)
        return self._adapted_forward(x)

    # -- weights -----------------------------------------------------------

    def _as_nk(self, stored):
        """A weight in the base layer's storage layout, viewed as (N, K) (no copy)."""
        return stored.T if self.transposed_base else stored

    def _w0(self):
        """The base weight the ops compute with: (N, K), a view for a Conv1D."""
        return self._as_nk(self.base_layer.weight)

    def original_weight(self):
        """The pretrained weight W0 (N, K), whether or not the adapter is merged."""
        return self._as_nk(self.weight_before_merge if self.merged else self.base_layer.weight)

    def original_bias(self):
        """The pretrained bias (None if the base layer had none), merged or not."""
        if self._bias_created_by_merge:
            return None
        if self.bias_before_merge is not None:
            return self.bias_before_merge
        return self.base_layer.bias

    @torch.no_grad()
    def effective_weight(self):
        """The weight the adapted layer computes with, in float32 (float64 for float64 layers)."""
        return self._merged_weight(self.original_weight())

    @torch.no_grad()
    def delta_weight(self):
        """effective_weight() − W0, in float32 (float64 for float64 layers)."""
        w0 = self.original_weight()
        merged = self._merged_weight(w0)
        return merged - w0.to(merged.dtype)

    @torch.no_grad()
    def effective_bias(self):
        """The bias the adapted layer adds (None if it adds none)."""
        b0 = self.original_bias()
        merged = self._merged_bias(self.original_weight(), b0)
        return b0 if merged is None else merged

    @torch.no_grad()
    def merge(self):
        """Fold the adapter into the base layer's weight (and bias)."""
        if self._already(True, "merge"):
            return
        base = self.base_layer
        w0 = self._w0()
        new_weight = self._merged_weight(w0)
        new_bias = self._merged_bias(w0, base.bias)
        # Kept in the stored layout, so that unmerge() copies it back as it was.
        self.weight_before_merge = base.weight.detach().clone()
        w0.copy_(new_weight)  # through the (N, K) view: into the base layer's own layout
        if new_bias is not None:
            if base.bias is not None:
                self.bias_before_merge = base.bias.detach().clone()
            self._bias_created_by_merge = write_merged_bias(base, new_bias, base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Restore the base layer's original weight and bias, bit for bit."""
        if self._already(False, "unmerge"):
            return
        base = self.base_layer
        base.weight.copy_(self.weight_before_merge)
        restore_bias(base, self.bias_before_merge, self._bias_created_by_merge)
        self.weight_before_merge = None
        self.bias_before_merge = None
        self._bias_created_by_merge = False
        self.merged = False

    def _merged_bias(self, w0, b0):
        return None  # only VeFA's shift changes the bias

    def extra_repr(self):
        options = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return (
            f"method={self.method}, in_features={self.in_features}, out_features={self.out_features}, "
            f"{options}, merged={self.merged}"
        )


class VeFALinear(AdapterLinear):
    """VeFA: ``y = base(x ⊙ scale + shift)``; scale starts at 1, shift at 0.

    The effective weight ``W0 · diag(scale)`` stays in W0's column space. The
    layer computes with `featadapt.vefa_linear`; the base layer is frozen and
    kept as ``base_layer``.

    Args:
        base_layer: an ``nn.Linear`` or transformers' ``Conv1D``.
        shift: also train a per-feature shift (merged into the bias).
        backend: the ops' backend (see `featadapt.vefa_linear`); None: automatic.
        dtype: the adapter parameters' dtype; None: the base weight's, but
            float32 on a half-precision base.

    Attributes:
        scale: ``(in_features,)``, trainable, starts at 1.
        shift: ``(in_features,)``, trainable, starts at 0; None without ``shift=True``.

    Raises:
        TypeError: a base layer of another type, or a subclass with its own ``forward``.

    Example:
        >>> layer = featadapt.VeFALinear(nn.Linear(16, 32), shift=True)
        >>> layer.scale.shape, layer.merged
        (torch.Size([16]), False)
    """

    method = "vefa"

    def __init__(self, base_layer, *, shift=False, backend=None, dtype=None):
        super().__init__(base_layer, backend=backend)
        kwargs = self._adapter_kwargs(base_layer, dtype)
        self.scale = nn.Parameter(torch.ones(self.in_features, **kwargs))
        self.shift = nn.Parameter(torch.zeros(self.in_features, **kwargs)) if shift else None

    def config(self):
        return {"shift": self.shift is not None}

    def _adapted_forward(self, x):
        base = self.base_layer
        return vefa_linear(x, self._w0(), self.scale, base.bias, self.shift, backend=self.backend)

    def _merged_weight(self, w0):
        dtype = merge_dtype(w0, self.scale)
        return w0.to(dtype) * self.scale.to(dtype)

    def _merged_bias(self, w0, b0):
        if self.shift is None:
            return None
        dtype = merge_dtype(w0, self.shift)
        shifted = w0.to(dtype) @ self.shift.to(dtype)
        return shifted if b0 is None else b0.to(dtype) + shifted


class _LowRankLinear(AdapterLinear):
    """r, alpha, dropout and rslora, shared by LoRA and LoRFA."""

    def __init__(self, base_layer, r, alpha, dropout, rslora, b_rows_from, backend, dtype):
        name = type(self).__name__
        super().__init__(base_layer, backend=backend)
        k = self.in_features
        b_rows = getattr(self, b_rows_from)
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 1 <= r <= k:
            raise ValueError(f"{name}: r must be an integer in [1, in_features={k}], got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
            raise ValueError(f"{name}: alpha must be a finite real number, got {alpha!r}")
        self.r = int(r)
        self.alpha = alpha
        self.dropout = check_dropout(name, "dropout", dropout)
        self.rslora = bool(rslora)
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        kwargs = self._adapter_kwargs(base_layer, dtype)
        self.lora_A = nn.Parameter(torch.empty(r, k, **kwargs))
        self.lora_B = nn.Parameter(torch.zeros(b_rows, r, **kwargs))
        # As LoRA: A like nn.Linear's default init, B zero, so the layer starts unchanged.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def config(self):
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "rslora": self.rslora}

    def _dropout_p(self):
        return self.dropout if self.training else 0.0

    def _factors(self, dtype):
        return self.lora_A.to(dtype), self.lora_B.to(dtype)


_LOW_RANK_ARGS = """
    Args:
        base_layer: an ``nn.Linear`` or transformers' ``Conv1D``.
        r: the rank, an integer in ``[1, in_features]``.
        alpha: ``γ = alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
        dropout: the dropout probability on the adapter's input, in training mode.
        rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
        backend: the ops' backend (see `featadapt.vefa_linear`); None: automatic.
        dtype: the adapter parameters' dtype; None: the base weight's, but
            float32 on a half-precision base.

    Attributes:
        lora_A: ``(r, in_features)``, trainable, initialised as ``nn.Linear``'s weight.
        lora_B: ``({b_rows}, r)``, trainable, starts at 0, so the layer starts equal to its base.
        scaling: ``γ``.

    Raises:
        ValueError: ``r``, ``alpha`` or ``dropout`` out of range.
        TypeError: a base layer of another type, or a subclass with its own ``forward``.
"""


class LoRFALinear(_LowRankLinear):
    """LoRFA: ``y = base(x + γ · dropout(x) Aᵀ Bᵀ)``.

    The effective weight ``W0 (I + γ B A)`` stays in W0's column space. The
    layer computes with `featadapt.lorfa_linear`; the base layer is frozen
    and kept as ``base_layer``.
    """

    method = "lorfa"

    def __init__(self, base_layer, r=8, alpha=16, dropout=0.0, rslora=False, *, backend=None, dtype=None):
        super().__init__(base_layer, r, alpha, dropout, rslora, "in_features", backend, dtype)

    def _adapted_forward(self, x):
        base = self.base_layer
        return lorfa_linear(
            x, self._w0(), self.lora_A, self.lora_B, base.bias,
            scaling=self.scaling, dropout_p=self._dropout_p(), backend=self.backend,
        )

    def _merged_weight(self, w0):
        dtype = merge_dtype(w0, self.lora_A)
        A, B = self._factors(dtype)
        w0 = w0.to(dtype)
        return w0 + self.scaling * ((w0 @ B) @ A)  # never forms the K×K matrix B A


LoRFALinear.__doc__ += _LOW_RANK_ARGS.format(b_rows="in_features")


class LoRALinear(_LowRankLinear):
    """LoRA (the baseline): ``y = base(x) + γ · dropout(x) Aᵀ Bᵀ``.

    The layer computes with `featadapt.lora_linear`; the base layer is frozen
    and kept as ``base_layer``.
    """

    method = "lora"

    def __init__(self, base_layer, r=8, alpha=16, dropout=0.0, rslora=False, *, backend=None, dtype=None):
        super().__init__(base_layer, r, alpha, dropout, rslora, "out_features", backend, dtype)

    def _adapted_forward(self, x):
        base = self.base_layer
        return lora_linear(
            x, self._w0(), self.lora_A, self.lora_B, base.bias,
            scaling=self.scaling, dropout_p=self._dropout_p(), backend=self.backend,
        )

    def _merged_weight(self, w0):
        dtype = merge_dtype(w0, self.lora_A)
        A, B = self._factors(dtype)
        return w0.to(dtype) + self.scaling * (B @ A)


LoRALinear.__doc__ += _LOW_RANK_ARGS.format(b_rows="out_features")

ADAPTER_CLASSES = {cls.method: cls for cls in (VeFALinear, LoRFALinear, LoRALinear)}
