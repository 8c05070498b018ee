"""What every featadapt PEFT tuner layer shares: which bases it wraps, the
adapters' state, and exact merging.

`VeFALayer` and `LoRFALayer` hold an adapter's parameters and the merge math;
the modules that compute the forward are in `fused` (nn.Linear and
transformers' Conv1D, on featadapt's fused ops) and `black_box` (quantized
linears and convolutions, called on the transformed input).
"""

import math
import sys
import warnings
from typing import List, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ...nn.bases import (
    CONV,
    LINEAR,
    QUANTIZED,
    base_kind,
    check_input_gradients,
    check_requantizable,
    dequantized_weight,
    guard_bnb_cpu_repacking,
    is_conv1d,
    merge_dtype,
    overridden_forward,
    quantized_description,
    requantize_merged,
    restore_bias,
    restore_quantized,
    saved_original_weight,
    write_merged_bias,
)
from ...nn.input_channels import check_shift_mergeable, map_input_channels, scale_input_channels
from .mixed_batches import call_adapter_names, check_mixed_batch_args, mixed_batch_ids, shared_dropout

BASES = ("an nn.Linear, transformers' Conv1D, a quantized linear (bitsandbytes Linear4bit/Linear8bitLt, "
         "torchao weight-only) or an nn.Conv1d/2d/3d")

_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


def peft_base_kind(module):
    """LINEAR (fused ops), QUANTIZED or CONV (black box), or None: what featadapt's
    PEFT layers can wrap. Float layers must run their class's own forward (the
    merge assumes it); nn.MultiheadAttention reads its out_proj's weight
    directly, bypassing any adapter, so that is refused too."""
    if isinstance(module, NonDynamicallyQuantizableLinear):
        return None
    kind = base_kind(module)
    if kind == LINEAR:
        own = (sys.modules["transformers.pytorch_utils"].Conv1D.forward if is_conv1d(module)
               else nn.Linear.forward)
        return LINEAR if type(module).forward is own else None
    if kind == CONV:
        return CONV if type(module).forward in _CONV_FORWARDS else None
    return kind


def unsupported_base_reason(module):
    """Why featadapt's PEFT layers cannot wrap `module`, for the error message."""
    if isinstance(module, nn.Embedding):
        return ("an nn.Embedding has no input features to transform (its input is token ids); "
                "feature-space adapters apply to layers with input features")
    if isinstance(module, NonDynamicallyQuantizableLinear):
        return "nn.MultiheadAttention reads its out_proj's weight directly, so an adapter there would be bypassed"
    overridden = overridden_forward(module)
    if overridden is not None:
        return f"its class overrides the forward of {overridden.__name__}"
    return f"featadapt's layers wrap {BASES}"


def _all_finite(weight, bias):
    return bool(torch.isfinite(weight).all()) and (bias is None or bool(torch.isfinite(bias).all()))


class FeatureAdapterLayer(BaseTunerLayer):
    """What VeFALayer and LoRFALayer share: the forward's states and exact merging.

    The base layer's weight is read output-first: (N, K) for a linear, (out,
    in/groups, *kernel) for a convolution, dequantized for a quantized linear.
    A Conv1D stores its weight transposed, (in_features, out_features): it is
    read through the free view ``weight.T``, never a copy, and merging writes
    through that view into the Conv1D's own storage.

    Merging writes ``W0`` combined with every merged adapter into the base
    layer, computed from a copy of ``W0`` (and the bias) kept while merged, so
    unmerge restores the base layer bit for bit (dividing by a scale, or
    subtracting a product, would not) and adapters merged one after another
    compose exactly as the forward composes the active adapters. A quantized
    base is re-quantized only when asked (``merge(requantize=True)``, or the
    tuner's ``merge_and_unload(requantize=True)``): that loses precision, and
    the relative error is reported and kept in `requantization_error`.

    Subclasses set `method` and `_main_dict` (the ParameterDict whose keys are
    the layer's adapters) and implement `_merged(w0, b0, adapters)` -> (weight,
    bias or None); the modules implement `_adapted_forward(x, adapters)` and
    `_mixed_batch_forward(x, adapters, ids)` (ids: one per sequence, -1 for the base).
    """

    method = None
    _main_dict = None
    base_kinds = (LINEAR, QUANTIZED, CONV)  # the module classes narrow this
    bases_wrapped = BASES

    def _init_common(self, base_layer):
        name = type(self).__name__
        kind = peft_base_kind(base_layer)
        if kind is None:
            raise TypeError(f"{name}: cannot wrap a {type(base_layer).__name__}: {unsupported_base_reason(base_layer)}")
        if kind not in self.base_kinds:
            raise TypeError(f"{name}: wraps {self.bases_wrapped}, not a {type(base_layer).__name__} (a {kind} base)")
        if kind == QUANTIZED:
            guard_bnb_cpu_repacking(base_layer)
            check_input_gradients(base_layer, name)
        self.base_layer = base_layer
        self.base_kind = kind
        self._disable_adapters = False
        self.merged_adapters = []
        # featadapt backend for this layer's op calls: None = FEATADAPT_BACKEND or automatic.
        self.backend = None
        # A plain bool, fixed at construction: the base weight is stored (K, N) (a Conv1D).
        self.transposed_base = is_conv1d(base_layer)
        if kind == CONV:
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
            self.spatial_dims = len(base_layer.kernel_size)
        elif self.transposed_base:
            self.in_features, self.out_features = base_layer.weight.shape
            self.spatial_dims = 0
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
            self.spatial_dims = 0
        self.requantization_error = None
        # Kept only while merged (see the class docstring); not saved.
        self.register_buffer("weight_before_merge", None, persistent=False)
        self.register_buffer("bias_before_merge", None, persistent=False)
        self._bias_created_by_merge = False
        self._quantized_before_merge = None
        self._requantize_on_merge = False  # set by the tuner's merge_and_unload(requantize=True)

    @property
    def groups(self):
        return getattr(self.get_base_layer(), "groups", 1)

    def _as_nk(self, stored):
        """A weight in the base layer's storage layout, viewed output-first (no copy)."""
        return stored.T if self.transposed_base else stored

    def _w0(self):
        """The base weight the fused ops compute with: (N, K), a view for a Conv1D."""
        return self._as_nk(self.get_base_layer().weight)

    def _adapters_here(self, names):
        params = getattr(self, self._main_dict)
        return [name for name in names if name in params]

    def _feature_forward(self, x, *args, **kwargs):
        # The modules' forward (nn.Module's comes first in their MRO).
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:  # from model(..., adapter_names=...), for this thread's call only
            adapter_names = call_adapter_names(self)
        if adapter_names is not None:
            check_mixed_batch_args(self, x, adapter_names)
        if self.disable_adapters:  # takes precedence over adapter_names, as in PEFT
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            found = mixed_batch_ids(x, adapter_names, getattr(self, self._main_dict))
            if found is None:  # no sequence uses an adapter this layer has
                return self.base_layer(x, *args, **kwargs)
            self._only_x(args, kwargs)
            return self._mixed_batch_forward(x, *found)
        active = self._adapters_here(self.active_adapters)
        if not active:
            return self.base_layer(x, *args, **kwargs)
        self._only_x(args, kwargs)
        return self._adapted_forward(x, active)

    def _only_x(self, args, kwargs):
        if args or kwargs:
            raise TypeError(
                f"{type(self).__name__}.forward takes only the input tensor, got extra arguments "
                f"{args!r} {sorted(kwargs)!r}"
            )

    # -- merging ---------------------------------------------------------------

    def _original_weight_and_bias(self):
        """The pretrained W0 output-first (dequantized for a quantized base; a view
        for a Conv1D) and its bias, merged or not."""
        base = self.get_base_layer()
        if self.base_kind == QUANTIZED:
            saved = self._quantized_before_merge
            if saved is None:
                return dequantized_weight(base), base.bias
            return saved_original_weight(base, saved), saved["bias"]
        if not self.merged:
            return self._as_nk(base.weight), base.bias
        bias = None if self._bias_created_by_merge else (
            self.bias_before_merge if self.bias_before_merge is not None else base.bias
        )
        return self._as_nk(self.weight_before_merge), bias

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None,
              requantize: Optional[bool] = None) -> None:
        """Fold the given adapters (default: the active ones) into the base layer.
        Into a quantized base only with ``requantize=True``, which quantizes the
        merged weight again (lossy; unmerge restores the original exactly)."""
        names = self._adapters_here(check_adapters_to_merge(self, adapter_names))
        if not names:
            return
        base = self.get_base_layer()
        requantize = self._requantize_on_merge if requantize is None else requantize
        if self.base_kind == QUANTIZED:
            check_requantizable(f"{type(self).__name__}.merge()", base, requantize,
                                "merge(requantize=True) or merge_and_unload(requantize=True)",
                                "merge_and_unload(dequantize=True)")
        w0, b0 = self._original_weight_and_bias()
        weight, bias = self._merged(w0, b0, list(self.merged_adapters) + names)
        if safe_merge and not _all_finite(weight, bias):
            # PEFT's own wording, naming the first adapter that breaks the merge on its own
            broken = next((n for n in names if not _all_finite(*self._merged(w0, b0, [n]))), names[0])
            raise ValueError(f"NaNs detected in the merged weights. The adapter {broken} seems to be broken")
        if self.base_kind == QUANTIZED:
            self._merge_requantized(base, weight, bias)
        else:
            self._merge_exactly(base, weight, bias)
        self.merged_adapters.extend(names)

    def _merge_exactly(self, base, weight, bias):
        if not self.merged:
            # Kept in the stored layout, so that unmerge() copies it back as it was.
            self.weight_before_merge = base.weight.detach().clone()
            if base.bias is not None:
                self.bias_before_merge = base.bias.detach().clone()
        self._as_nk(base.weight).copy_(weight.to(base.weight.dtype))  # through the view: the base's own layout
        if bias is not None:
            self._bias_created_by_merge |= write_merged_bias(base, bias, base.weight.dtype)

    def _merge_requantized(self, base, weight, bias):
        if self._quantized_before_merge is not None:  # merging more adapters: start from the original again
            restore_quantized(base, self._quantized_before_merge)
        self._quantized_before_merge, self.requantization_error = requantize_merged(base, weight, bias)
        warnings.warn(
            f"{type(self).__name__}.merge(requantize=True): the merged weight was re-quantized "
            f"({quantized_description(base)}); relative error {self.requantization_error:.3g}",
            stacklevel=3,
        )

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base layer's weight and bias as they were before merging, bit for bit."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        if self.base_kind == QUANTIZED:
            restore_quantized(base, self._quantized_before_merge)
            self._quantized_before_merge = None
            self.requantization_error = None
        else:
            base.weight.copy_(self.weight_before_merge)
            restore_bias(base, self.bias_before_merge, self._bias_created_by_merge)
            self.weight_before_merge = None
            self.bias_before_merge = None
            self._bias_created_by_merge = False
        del self.merged_adapters[:]

    @torch.no_grad()
    def dequantize_base(self):
        """Replace a quantized base by a float32 nn.Linear computing with its
        dequantized weight (exactly what the base computes with), unmerged
        first; merges after this are exact. For merge_and_unload(dequantize=True)."""
        if self.base_kind != QUANTIZED:
            return
        if self.merged:
            self.unmerge()
        base = self.get_base_layer()
        weight = dequantized_weight(base)
        layer = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                          device=weight.device, dtype=torch.float32)
        layer.weight.copy_(weight)
        if base.bias is not None:
            layer.bias.copy_(base.bias)
        self.base_layer = layer.requires_grad_(False)
        self.base_kind = LINEAR

    def get_delta_weight(self, adapter) -> torch.Tensor:
        """effective weight − W0 for one adapter, output-first ((out_features,
        in_features) also for a Conv1D base), in float32 (float64 for float64 layers)."""
        w0, b0 = self._original_weight_and_bias()
        weight, _ = self._merged(w0, b0, [adapter])
        return weight - w0.to(weight.dtype)


class VeFALayer(FeatureAdapterLayer):
    """VeFA's PEFT tuner layer: per adapter a scale (and optionally a shift) of the input features.

    With several active adapters, the first one transforms x first:
    x -> x ⊙ s1 + t1 -> (x ⊙ s1 + t1) ⊙ s2 + t2 -> base.
    """

    adapter_layer_names = ("vefa_scale", "vefa_shift")
    other_param_names = ()
    method = "VeFA"
    _main_dict = "vefa_scale"

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self._init_common(base_layer)
        self.vefa_scale = nn.ParameterDict({})
        self.vefa_shift = nn.ParameterDict({})
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        if config.shift and self.base_kind == CONV:
            check_shift_mergeable(type(self).__name__, self.get_base_layer())
        device = self.get_base_layer().weight.device
        k = self.in_features
        self.vefa_scale[adapter_name] = nn.Parameter(torch.ones(k, device=device))
        if config.shift:
            self.vefa_shift[adapter_name] = nn.Parameter(torch.zeros(k, device=device))
        elif adapter_name in self.vefa_shift:  # re-created without a shift
            del self.vefa_shift[adapter_name]
        if not config.init_weights:
            with torch.no_grad():
                self.vefa_scale[adapter_name].normal_(1.0, 0.2)
                if config.shift:
                    self.vefa_shift[adapter_name].normal_(0.0, 0.2)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _composed(self, adapters, dtype=None):
        """One (scale, shift or None) equal to applying the adapters in order."""
        def get(params, name):
            value = params[name] if name in params else None
            return value if value is None or dtype is None else value.to(dtype)

        scale, shift = get(self.vefa_scale, adapters[0]), get(self.vefa_shift, adapters[0])
        for name in adapters[1:]:
            s, t = get(self.vefa_scale, name), get(self.vefa_shift, name)
            shift = None if shift is None else shift * s
            shift = t if shift is None else (shift if t is None else shift + t)
            scale = scale * s
        return scale, shift

    def _merged(self, w0, b0, adapters):
        dtype = merge_dtype(w0, self.vefa_scale[adapters[0]])
        scale, shift = self._composed(adapters, dtype)
        return scale_input_channels(w0.to(dtype), b0, scale, shift, self.groups)


class LoRFALayer(FeatureAdapterLayer):
    """LoRFA's PEFT tuner layer: per adapter A (r, in_features) and B (in_features, r).

    Several active adapters add up on the input: x̃ = x + Σ γ_i x̂ A_iᵀ B_iᵀ.
    """

    adapter_layer_names = ("lorfa_A", "lorfa_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_rslora")
    method = "LoRFA"
    _main_dict = "lorfa_A"

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self._init_common(base_layer)
        if self.groups != 1:
            raise ValueError(
                f"{type(self).__name__}: grouped and depthwise convolutions (groups={self.groups}) are not "
                "supported: a low-rank map mixes channels across groups; use VeFA, which scales each channel"
            )
        self.lorfa_A = nn.ParameterDict({})
        self.lorfa_B = nn.ParameterDict({})
        self.r = {}
        self.lora_alpha = {}
        self.scaling = {}
        self.lora_dropout = {}
        self.use_rslora = {}
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, config, module_name: str = "", **kwargs) -> None:
        r, k = config.r, self.in_features
        if r > k:
            where = f" for module {module_name!r}" if module_name else ""
            raise ValueError(f"LoRFAConfig: r must be at most in_features={k}{where}, got {r}")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.lora_dropout[adapter_name] = float(config.lora_dropout)
        self.use_rslora[adapter_name] = config.use_rslora
        device = self.get_base_layer().weight.device
        lorfa_A = nn.Parameter(torch.empty(r, k, device=device))
        lorfa_B = nn.Parameter(torch.zeros(k, r, device=device))
        # As LoRA: A like nn.Linear's default init, B zero, so the layer starts unchanged.
        nn.init.kaiming_uniform_(lorfa_A, a=math.sqrt(5))
        if not config.init_weights:
            nn.init.kaiming_uniform_(lorfa_B, a=math.sqrt(5))
        self.lorfa_A[adapter_name] = lorfa_A
        self.lorfa_B[adapter_name] = lorfa_B
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _factors(self, adapters):
        """(A, B, scaling, dropout p) for one call. Several adapters are
        concatenated along the rank with their scalings folded into B; they
        then share one dropout mask, so in training they must share p."""
        if len(adapters) == 1:
            name = adapters[0]
            return self.lorfa_A[name], self.lorfa_B[name], self.scaling[name], self.lora_dropout[name]
        ps = {name: self.lora_dropout[name] for name in adapters}
        if self.training:
            shared_dropout("LoRFA", ps)
        dtype = self.lorfa_A[adapters[0]].dtype
        A = torch.cat([self.lorfa_A[name].to(dtype) for name in adapters], dim=0)
        B = torch.cat([self.lorfa_B[name].to(dtype) * self.scaling[name] for name in adapters], dim=1)
        return A, B, 1.0, ps[adapters[0]]

    def _merged(self, w0, b0, adapters):
        dtype = merge_dtype(w0, self.lorfa_A[adapters[0]])
        factors = [(self.lorfa_A[name], self.lorfa_B[name], self.scaling[name]) for name in adapters]
        return map_input_channels(w0.to(dtype), factors), None
