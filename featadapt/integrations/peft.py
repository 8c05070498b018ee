"""Hugging Face PEFT integration.

Two things:

1. VeFA and LoRFA as PEFT methods. Importing this module registers them, so
   ``get_peft_model(model, VeFAConfig(target_modules=[...]))`` and
   ``LoRFAConfig(r=8, lora_alpha=16, ...)`` work like PEFT's own methods
   (save_pretrained / PeftModel.from_pretrained, merge_and_unload,
   disable_adapter, add_adapter / set_adapter; transformers' model.add_adapter
   and load_adapter where the installed transformers accepts the installed
   peft, else a clear PeftVersionError), and the layers compute with
   featadapt's fused ops (`featadapt.ops.vefa_linear` / `lorfa_linear`, so the
   backend dispatch applies). Mixed-adapter batches work as in PEFT's LoRA:
   ``model(..., adapter_names=[...])`` (one name per sequence, "__base__" for
   the base model), computed by one call per layer with ``adapter_index``. They wrap nn.Linear layers and transformers'
   Conv1D (GPT-2's layers, weight stored (in_features, out_features)): the ops
   get the free view ``weight.T`` and merging writes in the Conv1D's own layout.
2. `accelerate(peft_model)`: runs existing PEFT IA3 feedforward layers (IA3 in
   feedforward mode computes ``base(x * ia3_l)``, VeFA without shift) and plain
   LoRA Linear layers on featadapt's fused ops, in place (LoRA mixed-adapter
   batches too, through the batched op); `restore` undoes it.

PEFT only registers methods named in its `PeftType` enum, so this module adds
real members VEFA and LORFA to it: a plain string would break the code in
transformers that reads ``peft_config.peft_type.value``.
"""

import math
import numbers
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

MIN_PEFT = "0.21"  # the oldest release this was tested with (0.21.2); it uses PEFT's newer tuner API

try:
    import peft
    from packaging.version import Version
    from peft.config import PeftConfig
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )
    from peft.tuners.ia3.layer import Linear as _IA3Linear
    from peft.tuners.lora.layer import Linear as _LoraLinear
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
    from peft.utils import PeftType, register_peft_method
    from peft.utils.other import AuxiliaryTrainingWrapper
except ImportError as exc:  # peft is an optional dependency
    raise ImportError(
        f"featadapt.integrations.peft needs Hugging Face PEFT (peft>={MIN_PEFT}): pip install featadapt[peft]"
    ) from exc
if Version(peft.__version__) < Version(MIN_PEFT):
    raise ImportError(
        f"featadapt.integrations.peft needs peft>={MIN_PEFT}, found {peft.__version__}: pip install -U peft"
    )

from ..nn.layers import BASE_TYPES, is_conv1d, is_supported_base
from ..ops import get_backend, lorfa_linear, lora_linear, vefa_linear
from .peft_weighted import add_weighted_lorfa, add_weighted_vefa
from ..ops.stacking import stack_low_rank, stack_vefa
from .transformers_adapters import PeftVersionError, adapter_methods_unsupported_reason, guard_adapter_methods

__all__ = [
    "AccelerationReport",
    "LoRFAConfig",
    "LoRFALayer",
    "LoRFAModel",
    "LoRFAPeftLinear",
    "PeftVersionError",
    "VeFAConfig",
    "VeFALayer",
    "VeFAModel",
    "VeFAPeftLinear",
    "accelerate",
    "adapter_methods_unsupported_reason",
    "restore",
    "set_backend",
]


# ---------------------------------------------------------------------------
# PeftType members
# ---------------------------------------------------------------------------


def _peft_type_member(name):
    """PeftType[name], added to the enum when PEFT does not have it.

    Mirrors how the enum machinery builds a member of a str-mixin Enum (aenum's
    extend_enum does the same; aenum is not a PEFT dependency), then checks
    every way PEFT and transformers look a member up, so a change in the enum
    internals fails here, loudly, instead of somewhere inside PEFT.
    """
    member = PeftType.__members__.get(name)
    if member is not None:
        return member
    member = PeftType._member_type_.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    # Bind the attribute before entering _member_map_: the enum metaclass
    # refuses to rebind a name that is already a member.
    setattr(PeftType, name, member)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    if not (
        PeftType(name) is member
        and PeftType[name] is member
        and getattr(PeftType, name) is member
        and member in list(PeftType)
        and member.value == name
    ):
        raise RuntimeError(
            f"featadapt could not add {name!r} to peft's PeftType enum on this Python version; "
            "please report this with your Python and peft versions"
        )
    return member


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------


def _check_bool(owner, name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {name} must be True or False, got {value!r}")


def _check_targets(owner, config):
    targets = config.target_modules
    if targets is None:
        raise ValueError(
            f"{owner}: target_modules is required (featadapt has no per-architecture defaults): "
            "a list of module names or name suffixes, a regex string, or 'all-linear'; got None"
        )
    if isinstance(targets, (list, tuple, set)):
        if not all(isinstance(t, str) for t in targets):
            raise ValueError(f"{owner}: target_modules must contain only strings, got {targets!r}")
        config.target_modules = set(targets)  # PEFT's convention for lists
    elif not isinstance(targets, str):
        raise ValueError(
            f"{owner}: target_modules must be a list of module names or a regex string, "
            f"got {type(targets).__name__} {targets!r}"
        )
    if isinstance(config.exclude_modules, (list, tuple)):
        config.exclude_modules = set(config.exclude_modules)
    if isinstance(targets, str):
        for name in ("layers_to_transform", "layers_pattern"):
            if getattr(config, name) is not None:
                raise ValueError(
                    f"{owner}: {name} works only with a list of target_modules, "
                    f"got target_modules={targets!r} (a regex) and {name}={getattr(config, name)!r}"
                )


_TARGET_HELP = (
    "The modules to adapt: a list of module names (a name matches itself and any module whose name ends "
    "with '.' + it), a regex matched against the full module name, or 'all-linear'. Only nn.Linear layers "
    "and transformers' Conv1D (as in GPT-2) can be adapted; 'all-linear' takes both and leaves out the "
    "output layer (e.g. lm_head)."
)


@dataclass
class _TargetedConfig(PeftConfig):
    """The fields both methods share: which modules to adapt, as in PEFT's own methods."""

    target_modules: Optional[Union[List[str], str]] = field(default=None, metadata={"help": _TARGET_HELP})
    exclude_modules: Optional[Union[List[str], str]] = field(
        default=None, metadata={"help": "Modules not to adapt: names, name suffixes or a regex."}
    )
    modules_to_save: Optional[List[str]] = field(
        default=None, metadata={"help": "Other modules to train and save with the adapter, e.g. a new classifier."}
    )
    layers_to_transform: Optional[Union[List[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices (with a list of target_modules)."}
    )
    layers_pattern: Optional[Union[List[str], str]] = field(
        default=None, metadata={"help": "The name of the layer list that layers_to_transform indexes."}
    )


@dataclass
class VeFAConfig(_TargetedConfig):
    """Configuration of a VeFA adapter: ``y = base(x ⊙ scale + shift)``.

    Args:
        target_modules: the modules to adapt (names, name suffixes, a regex, or
            "all-linear"); required. Only nn.Linear layers and transformers'
            Conv1D (as in GPT-2).
        exclude_modules: modules not to adapt (same forms).
        shift: also learn the per-input-channel shift t (starts at 0).
        init_weights: True (default) starts at the identity (scale 1, shift 0);
            False draws random values, for tests only.
        modules_to_save, layers_to_transform, layers_pattern: as in PEFT's LoRA.
    """

    shift: bool = field(default=False, metadata={"help": "Also learn a per-input-channel shift t (starts at 0)."})
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: start at the identity (scale 1, shift 0). False: random values, for tests only."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.VEFA
        _check_targets("VeFAConfig", self)
        _check_bool("VeFAConfig", "shift", self.shift)
        _check_bool("VeFAConfig", "init_weights", self.init_weights)


@dataclass
class LoRFAConfig(_TargetedConfig):
    """Configuration of a LoRFA adapter: ``y = base(x + γ · dropout(x) Aᵀ Bᵀ)``.

    A is (r, in_features), B is (in_features, r) and starts at 0;
    γ = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.

    Args:
        r: the rank, an integer in [1, in_features] of every adapted layer.
        lora_alpha: the scaling numerator (default 8, as PEFT's LoraConfig).
        lora_dropout: dropout probability on the adapter path's input, in [0, 1).
        use_rslora: γ = lora_alpha / sqrt(r) instead of lora_alpha / r.
        target_modules: the modules to adapt (names, name suffixes, a regex, or
            "all-linear"); required. Only nn.Linear layers and transformers'
            Conv1D (as in GPT-2).
        exclude_modules: modules not to adapt (same forms).
        init_weights: True (default) starts at the identity (B = 0); False
            draws a random B too, for tests only.
        modules_to_save, layers_to_transform, layers_pattern: as in PEFT's LoRA.
    """

    r: int = field(default=8, metadata={"help": "The rank, an integer in [1, in_features]."})
    lora_alpha: float = field(default=8, metadata={"help": "Scaling numerator: γ = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter path's input, in [0, 1)."})
    use_rslora: bool = field(default=False, metadata={"help": "γ = lora_alpha / sqrt(r) (rank-stabilised)."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: start at the identity (B = 0). False: random B, for tests only."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.LORFA
        owner = "LoRFAConfig"
        r = self.r
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
            raise ValueError(f"{owner}: r must be an integer >= 1, got {r!r}")
        alpha = self.lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
            raise ValueError(f"{owner}: lora_alpha must be a finite real number, got {alpha!r}")
        p = self.lora_dropout
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
            raise ValueError(f"{owner}: lora_dropout must be a number in [0, 1), got {p!r}")
        _check_bool(owner, "use_rslora", self.use_rslora)
        _check_bool(owner, "init_weights", self.init_weights)
        _check_targets(owner, self)


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


def _is_plain_base(module):
    """What featadapt's PEFT layers can wrap: a plain nn.Linear (see
    `_is_plain_linear`) or transformers' Conv1D whose forward is Conv1D's own
    and whose weight is a float tensor."""
    if not is_supported_base(module):
        return False
    if is_conv1d(module):  # so transformers.pytorch_utils is loaded (peft imports it anyway)
        conv1d = sys.modules["transformers.pytorch_utils"].Conv1D
        return type(module).forward is conv1d.forward and module.weight.is_floating_point()
    return _is_plain_linear(module)


def _is_plain_linear(module):
    """An nn.Linear whose forward is nn.Linear's and whose weight is a float tensor:
    what the fused ops can stand in for. Quantized linears (e.g. bitsandbytes)
    subclass nn.Linear with their own forward; nn.MultiheadAttention reads its
    out_proj's weight directly, bypassing any adapter."""
    return (
        isinstance(module, nn.Linear)
        and not isinstance(module, NonDynamicallyQuantizableLinear)
        and type(module).forward is nn.Linear.forward
        and module.weight.is_floating_point()
    )


def _wide_dtype(*tensors):
    """float64 if any tensor is, else float32: the dtype merges are computed in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _all_finite(weight, bias):
    return bool(torch.isfinite(weight).all()) and (bias is None or bool(torch.isfinite(bias).all()))


# ---------------------------------------------------------------------------
# Mixed-adapter batches (adapter_names=...): PEFT's semantics, one batched call
# ---------------------------------------------------------------------------

BASE_NAME = "__base__"  # PEFT's name for "no adapter" in adapter_names


def check_mixed_batch_args(layer, x, adapter_names):
    """PEFT's own checks and errors for adapter_names at a layer (LoRA's _check_forward_args)."""
    if len(x) != len(adapter_names):
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(adapter_names)} and {len(x)} respectively."
        )
    if layer.merged:
        raise ValueError(
            "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
        )


def mixed_batch_rows(x, adapter_names, adapters_here):
    """(the adapters this layer runs, in order of first use; adapter_index of shape
    x.shape[:-1]) for one name per sequence, or None when no sequence uses one
    of `adapters_here`. "__base__" and names this layer lacks get id -1 (the
    base layer), as in PEFT."""
    slots = {}
    for name in adapter_names:
        if name != BASE_NAME and name in adapters_here and name not in slots:
            slots[name] = len(slots)
    if not slots:
        return None
    per_sequence = torch.tensor([slots.get(name, -1) for name in adapter_names], device=x.device)
    index = per_sequence.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
    return list(slots), index


def shared_dropout(method, ps):
    """The one dropout p of adapters that run in one call (a single mask over x)."""
    if len(set(ps.values())) > 1:
        raise ValueError(f"{method}: adapters that run in one call must share lora_dropout to train, got {ps}")
    return next(iter(ps.values()))


class _FeatureAdapterLayer(BaseTunerLayer):
    """What VeFALayer and LoRFALayer share: the forward's states and exact merging.

    The base layer is a plain nn.Linear or transformers' Conv1D. A Conv1D stores
    its weight transposed, (in_features, out_features): the ops get the free
    view ``weight.T`` (N, K) (`_w0`), never a copy; merging writes through that
    view into the Conv1D's own storage, and the copy kept for unmerge stays in
    the stored layout. `get_delta_weight` is always (out_features, in_features).

    Merging writes ``W0`` combined with every merged adapter into the base layer,
    computed from a copy of ``W0`` (and the bias) kept while merged, so unmerge
    restores the base layer bit for bit (dividing by a scale, or subtracting a
    product, would not) and adapters merged one after another compose exactly as
    the forward composes the active adapters.

    Subclasses set `method` and `_main_dict` (the ParameterDict whose keys are the
    layer's adapters) and implement `_adapted_forward(x, adapters)` and
    `_merged(w0, b0, adapters)` -> (weight, bias or None).
    """

    method = None
    _main_dict = None

    def _init_common(self, base_layer):
        name = type(self).__name__
        if not _is_plain_base(base_layer):
            raise TypeError(
                f"{name}: base_layer must be {BASE_TYPES} with its class's own forward and a floating-point "
                f"weight, got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters = []
        # featadapt backend for this layer's op calls: None = FEATADAPT_BACKEND or automatic.
        self.backend = None
        # A plain bool, fixed at construction: the base weight is stored (K, N) (a Conv1D).
        self.transposed_base = is_conv1d(base_layer)
        if self.transposed_base:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features = base_layer.in_features
            self.out_features = base_layer.out_features
        # Kept only while merged (see the class docstring); not saved.
        self.register_buffer("weight_before_merge", None, persistent=False)
        self.register_buffer("bias_before_merge", None, persistent=False)
        self._bias_created_by_merge = False

    def _as_nk(self, stored):
        """A weight in the base layer's storage layout, viewed as (N, K) (no copy)."""
        return stored.T if self.transposed_base else stored

    def _w0(self):
        """The base weight the ops compute with: (N, K), a view for a Conv1D."""
        return self._as_nk(self.get_base_layer().weight)

    def _adapters_here(self, names):
        params = getattr(self, self._main_dict)
        return [name for name in names if name in params]

    def _feature_forward(self, x, *args, **kwargs):
        # The concrete classes' forward (nn.Module's comes first in their MRO).
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            check_mixed_batch_args(self, x, adapter_names)
        if self.disable_adapters:  # takes precedence over adapter_names, as in PEFT
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            rows = mixed_batch_rows(x, adapter_names, getattr(self, self._main_dict))
            if rows is None:  # no sequence uses an adapter this layer has
                return self.base_layer(x, *args, **kwargs)
            self._only_x(args, kwargs)
            return self._mixed_batch_forward(x, *rows)
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

    def _original_weight_and_bias(self):
        """The pretrained W0 as (N, K) (a view for a Conv1D) and bias, merged or not."""
        base = self.get_base_layer()
        if not self.merged:
            return self._as_nk(base.weight), base.bias
        bias = None if self._bias_created_by_merge else (
            self.bias_before_merge if self.bias_before_merge is not None else base.bias
        )
        return self._as_nk(self.weight_before_merge), bias

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        """Fold the given adapters (default: the active ones) into the base layer."""
        names = self._adapters_here(check_adapters_to_merge(self, adapter_names))
        if not names:
            return
        base = self.get_base_layer()
        w0, b0 = self._original_weight_and_bias()
        weight, bias = self._merged(w0, b0, list(self.merged_adapters) + names)
        if safe_merge and not _all_finite(weight, bias):
            # PEFT's own wording, naming the first adapter that breaks the merge on its own
            broken = next((n for n in names if not _all_finite(*self._merged(w0, b0, [n]))), names[0])
            raise ValueError(f"NaNs detected in the merged weights. The adapter {broken} seems to be broken")
        if not self.merged:
            # Kept in the stored layout, so that unmerge() copies it back as it was.
            self.weight_before_merge = base.weight.detach().clone()
            if base.bias is not None:
                self.bias_before_merge = base.bias.detach().clone()
        self._w0().copy_(weight.to(base.weight.dtype))  # through the (N, K) view: into the base's own layout
        if bias is not None:
            if base.bias is None:
                base.bias = nn.Parameter(bias.to(base.weight.dtype), requires_grad=False)
                self._bias_created_by_merge = True
            else:
                base.bias.copy_(bias.to(base.bias.dtype))
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base layer's weight and bias as they were before merging, bit for bit."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        base.weight.copy_(self.weight_before_merge)
        if self._bias_created_by_merge:
            base.bias = None
        elif self.bias_before_merge is not None:
            base.bias.copy_(self.bias_before_merge)
        self.weight_before_merge = None
        self.bias_before_merge = None
        self._bias_created_by_merge = False
        del self.merged_adapters[:]

    def get_delta_weight(self, adapter) -> torch.Tensor:
        """effective weight − W0 for one adapter, (out_features, in_features) also for a
        Conv1D base, in float32 (float64 for float64 layers)."""
        w0, b0 = self._original_weight_and_bias()
        weight, _ = self._merged(w0, b0, [adapter])
        return weight - w0.to(weight.dtype)


class VeFALayer(_FeatureAdapterLayer):
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

    def update_layer(self, adapter_name: str, config: VeFAConfig, **kwargs) -> None:
        weight = self.get_base_layer().weight
        k = self.in_features
        self.vefa_scale[adapter_name] = nn.Parameter(torch.ones(k, device=weight.device))
        if config.shift:
            self.vefa_shift[adapter_name] = nn.Parameter(torch.zeros(k, device=weight.device))
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

    def _adapted_forward(self, x, adapters):
        base = self.base_layer
        scale, shift = self._composed(adapters)
        return vefa_linear(x, self._w0(), scale, base.bias, shift, backend=self.backend)

    def _mixed_batch_forward(self, x, adapters, adapter_index):
        scale, shift = stack_vefa([self.vefa_scale[name] for name in adapters],
                                  [self.vefa_shift[name] if name in self.vefa_shift else None for name in adapters])
        return vefa_linear(x, self._w0(), scale, self.base_layer.bias, shift,
                           adapter_index=adapter_index, backend=self.backend)

    def _merged(self, w0, b0, adapters):
        dtype = _wide_dtype(w0, self.vefa_scale[adapters[0]])
        scale, shift = self._composed(adapters, dtype)
        w0 = w0.to(dtype)
        weight = w0 * scale
        if shift is None:
            return weight, None
        shifted = w0 @ shift
        return weight, shifted if b0 is None else b0.to(dtype) + shifted


class LoRFALayer(_FeatureAdapterLayer):
    """LoRFA's PEFT tuner layer: per adapter A (r, in_features) and B (in_features, r).

    Several active adapters add up on the input: x̃ = x + Σ γ_i x̂ A_iᵀ B_iᵀ.
    """

    adapter_layer_names = ("lorfa_A", "lorfa_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_rslora")
    method = "LoRFA"
    _main_dict = "lorfa_A"

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self._init_common(base_layer)
        self.lorfa_A = nn.ParameterDict({})
        self.lorfa_B = nn.ParameterDict({})
        self.r = {}
        self.lora_alpha = {}
        self.scaling = {}
        self.lora_dropout = {}
        self.use_rslora = {}
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, config: LoRFAConfig, module_name: str = "", **kwargs) -> None:
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
        """(A, B, scaling, dropout p) for one fused call. Several adapters are
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

    def _adapted_forward(self, x, adapters):
        base = self.base_layer
        A, B, scaling, p = self._factors(adapters)
        return lorfa_linear(
            x, self._w0(), A, B, base.bias,
            scaling=scaling, dropout_p=p if self.training else 0.0, backend=self.backend,
        )

    def _mixed_batch_forward(self, x, adapters, adapter_index):
        A, B = stack_low_rank([self.lorfa_A[name] for name in adapters], [self.lorfa_B[name] for name in adapters])
        scaling = torch.tensor([self.scaling[name] for name in adapters], device=x.device)
        p = shared_dropout("LoRFA", {name: self.lora_dropout[name] for name in adapters}) if self.training else 0.0
        return lorfa_linear(x, self._w0(), A, B, self.base_layer.bias, scaling=scaling, dropout_p=p,
                            adapter_index=adapter_index, backend=self.backend)

    def _merged(self, w0, b0, adapters):
        dtype = _wide_dtype(w0, self.lorfa_A[adapters[0]])
        w0 = w0.to(dtype)
        weight = w0.clone()
        for name in adapters:
            A, B = self.lorfa_A[name].to(dtype), self.lorfa_B[name].to(dtype)
            weight += self.scaling[name] * ((w0 @ B) @ A)  # never forms the K×K matrix B A
        return weight, None


class VeFAPeftLinear(nn.Module, VeFALayer):
    """An nn.Linear or transformers' Conv1D with VeFA adapters (PEFT's tuner layer for VeFA)."""

    def __init__(self, base_layer, adapter_name: str, config: VeFAConfig, **kwargs) -> None:
        super().__init__()
        VeFALayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x, *args, **kwargs):
        return self._feature_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "vefa." + super().__repr__()


class LoRFAPeftLinear(nn.Module, LoRFALayer):
    """An nn.Linear or transformers' Conv1D with LoRFA adapters (PEFT's tuner layer for LoRFA)."""

    def __init__(self, base_layer, adapter_name: str, config: LoRFAConfig, module_name: str = "", **kwargs) -> None:
        super().__init__()
        LoRFALayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name=module_name)

    def forward(self, x, *args, **kwargs):
        return self._feature_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "lorfa." + super().__repr__()


# ---------------------------------------------------------------------------
# Tuners
# ---------------------------------------------------------------------------


class _FeatureAdapterModel(BaseTuner):
    """The shared BaseTuner: put a layer around each targeted nn.Linear or transformers' Conv1D.

    "all-linear" is PEFT's own: every nn.Linear and Conv1D except a
    transformers model's output layer (e.g. GPT-2's lm_head)."""

    target_module_mapping: Dict[str, List[str]] = {}  # no per-architecture defaults: target_modules is required
    _linear_cls = None

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config, module_name=current_key)
            return
        method = self.tuner_layer_cls.method
        if isinstance(target, BaseTunerLayer):
            raise TypeError(
                f"{method}: module {current_key!r} already carries a {type(target).__name__} adapter of another "
                f"PEFT method; featadapt's layers wrap only {BASE_TYPES}"
            )
        if not _is_plain_base(target):
            raise TypeError(
                f"{method}: module {current_key!r} is a {type(target).__name__}, but featadapt's {method} layers "
                f"wrap only {BASE_TYPES} with its class's own forward and a floating-point weight (not "
                "quantized linears or nn.MultiheadAttention's out_proj); leave it out of target_modules or "
                "add it to exclude_modules"
            )
        new_module = self._linear_cls(target, adapter_name, config, module_name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)


    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """`model(..., adapter_names=[...])`: one adapter name per sequence, as PEFT's LoRA
        takes it (PeftModel.forward and generate enter this context). Hands the names
        to every adapter layer (and modules_to_save wrapper) for the duration of the
        call; PEFT's errors for training mode and unknown names; with beam search each
        name is repeated num_beams times."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known = set()
        for module in self.modules():
            if isinstance(module, self.tuner_layer_cls):
                known |= set(getattr(module, module._main_dict).keys())
        unknown = {name for name in adapter_names if name != BASE_NAME} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            if not isinstance(adapter_names, (list, tuple)):
                raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]

        def pass_names(module, args, kwargs):
            kwargs["adapter_names"] = adapter_names
            return args, kwargs

        handles = [
            module.register_forward_pre_hook(pass_names, with_kwargs=True)
            for module in self.modules()
            if isinstance(module, (self.tuner_layer_cls, AuxiliaryTrainingWrapper))
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class VeFAModel(_FeatureAdapterModel):
    """The VeFA tuner: `get_peft_model(model, VeFAConfig(...))` builds one."""

    prefix: str = "vefa_"
    tuner_layer_cls = VeFALayer
    _linear_cls = VeFAPeftLinear

    def add_weighted_adapter(self, adapters, weights, adapter_name):
        """Add `adapter_name` with ``scale = 1 + Σ wᵢ (sᵢ − 1)``, ``shift = Σ wᵢ tᵢ``
        over `adapters` (see featadapt.integrations.peft_weighted)."""
        add_weighted_vefa(self, adapters, weights, adapter_name)


class LoRFAModel(_FeatureAdapterModel):
    """The LoRFA tuner: `get_peft_model(model, LoRFAConfig(...))` builds one."""

    prefix: str = "lorfa_"
    tuner_layer_cls = LoRFALayer
    _linear_cls = LoRFAPeftLinear

    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="cat"):
        """Add `adapter_name` with ``γ B A = Σ wᵢ γᵢ Bᵢ Aᵢ`` over `adapters`, the
        factors concatenated along the rank (see featadapt.integrations.peft_weighted)."""
        add_weighted_lorfa(self, adapters, weights, adapter_name, combination_type)


def _register():
    """Register both methods with PEFT; safe to run again (a module reload
    replaces featadapt's own earlier registration)."""
    for name, config_cls, model_cls in (("vefa", VeFAConfig, VeFAModel), ("lorfa", LoRFAConfig, LoRFAModel)):
        peft_type = _peft_type_member(name.upper())
        registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
        if registered is model_cls:
            continue
        if registered is not None:
            if registered.__module__ != __name__:
                raise RuntimeError(
                    f"peft already has a method {name!r} ({registered.__module__}.{registered.__qualname__}); "
                    "featadapt cannot register its own under the same name"
                )
            for mapping in (
                PEFT_TYPE_TO_CONFIG_MAPPING,
                PEFT_TYPE_TO_TUNER_MAPPING,
                PEFT_TYPE_TO_PREFIX_MAPPING,
                PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
            ):
                mapping.pop(peft_type, None)
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls)


_register()
guard_adapter_methods()  # transformers' model.add_adapter & co. fail clearly where they need a newer peft


def _check_backend(owner, backend):
    """None, "auto" or a known backend name, lower-cased; raises naming the known ones."""
    if backend is None:
        return None
    if not isinstance(backend, str):
        raise TypeError(f"{owner}: backend must be a string or None, got {type(backend).__name__}")
    name = backend.strip().lower()
    if name == "auto":
        return name
    try:
        get_backend(name)
    except ValueError as exc:
        raise ValueError(f"{owner}: {exc}") from None
    return name


def set_backend(model, backend):
    """Make every featadapt layer in `model` (VeFA/LoRFA PEFT layers and layers
    run by `accelerate`) call its op with `backend`: a name ("torch", "triton",
    ...), "auto", or None for FEATADAPT_BACKEND, else automatic (the default).
    Returns how many layers it set."""
    backend = _check_backend("set_backend", backend)
    count = 0
    for module in model.modules():
        fused = module.__dict__.get("forward")
        if isinstance(module, _FeatureAdapterLayer):
            module.backend = backend
            count += 1
        elif isinstance(fused, _FusedForward):
            fused.backend = backend
            count += 1
    return count


# ---------------------------------------------------------------------------
# accelerate: PEFT's own IA3 (feedforward) and LoRA layers on featadapt's ops
# ---------------------------------------------------------------------------


@dataclass
class AccelerationReport:
    """What `accelerate` did: the layers now on featadapt's fused ops, and the
    PEFT layers it left alone with the reason (module name -> reason)."""

    accelerated: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)

    def __str__(self):
        lines = [
            f"{len(self.accelerated)} PEFT layer(s) on featadapt's fused ops, "
            f"{len(self.skipped)} left as they were"
        ]
        lines += [f"  accelerated: {name}" for name in self.accelerated]
        lines += [f"  skipped: {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


_IA3, _LORA = "ia3", "lora"


def _adapter_problem(layer, kind, adapter):
    """Why `adapter` of `layer` cannot run on the fused op, or None if it can."""
    if kind == _IA3:
        return None
    variant = layer.lora_variant.get(adapter)
    if variant is not None:
        return f"adapter {adapter!r} is a LoRA variant ({type(variant).__name__}, e.g. DoRA), not plain LoRA"
    if layer.lora_bias.get(adapter, False):
        return f"adapter {adapter!r} has lora_bias=True"
    dropout = layer.lora_dropout[adapter]
    if type(dropout) not in (nn.Identity, nn.Dropout):
        return f"adapter {adapter!r} has a {type(dropout).__name__} dropout, not nn.Dropout"
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A.bias is not None:
        return f"adapter {adapter!r} has non-standard lora_A/lora_B modules"
    return None


def _layer_problem(layer, kind):
    """Why the whole layer cannot run on the fused op (checked once, by `accelerate`)."""
    if kind == _IA3 and not layer.is_feedforward:
        return "IA3 in output mode (not a feedforward module) scales the output, which is not VeFA's math"
    base = layer.base_layer
    if not _is_plain_linear(base):
        return (
            f"its base layer is a {type(base).__name__}, not a plain floating-point nn.Linear "
            "(Conv1D, quantized and wrapped layers stay with PEFT)"
        )
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (the weight is stored transposed)"
    params = layer.ia3_l if kind == _IA3 else layer.lora_A
    for adapter in params:
        problem = _adapter_problem(layer, kind, adapter)
        if problem is not None:
            return problem
    active = [a for a in layer.active_adapters if a in params]
    if len(active) > 1:
        return f"{len(active)} active adapters {active}: the fused op runs one adapter at a time"
    return None


class _FusedForward:
    """A PEFT layer's forward on featadapt's ops, set as the layer's instance
    attribute `forward`. It takes the fused path only in the state it was built
    for (one active plain adapter, not merged, adapters enabled, no extra
    arguments) and otherwise calls the class's own forward, so merging,
    disable_adapter and switching adapters keep PEFT's behaviour."""

    def __init__(self, layer, kind, backend=None):
        self.layer = layer
        self.kind = kind
        self.backend = backend

    def _fused_adapter(self, args, kwargs):
        layer = self.layer
        if args or kwargs or layer.disable_adapters or layer.merged:
            return None
        params = layer.ia3_l if self.kind == _IA3 else layer.lora_A
        active = [a for a in layer.active_adapters if a in params]
        if len(active) != 1 or _adapter_problem(layer, self.kind, active[0]) is not None:
            return None
        return active[0]

    def _mixed_lora_rows(self, x, args, kwargs):
        """For a LoRA mixed-adapter batch (only adapter_names= besides x) that the batched
        op can run: (adapters, adapter_index); None otherwise (PEFT's forward runs it,
        or there is no adapter row: the base layer's output)."""
        layer = self.layer
        if self.kind != _LORA or args or set(kwargs) != {"adapter_names"}:
            return None
        adapter_names = kwargs["adapter_names"]
        layer._check_forward_args(x, adapter_names=adapter_names)  # PEFT's own errors first
        if layer.disable_adapters:
            return None
        rows = mixed_batch_rows(x, adapter_names, layer.lora_A)
        if rows is None or any(_adapter_problem(layer, _LORA, name) is not None for name in rows[0]):
            return None
        if any(isinstance(layer.lora_dropout[name], nn.Dropout) and layer.lora_dropout[name].training
               and layer.lora_dropout[name].p > 0 for name in rows[0]):
            return None  # training-mode dropout per adapter: PEFT's own loop
        return rows

    def __call__(self, x, *args, **kwargs):
        layer = self.layer
        mixed = self._mixed_lora_rows(x, args, kwargs)
        if mixed is not None:
            adapters, adapter_index = mixed
            base = layer.base_layer
            A, B = stack_low_rank([layer.lora_A[name].weight for name in adapters],
                                  [layer.lora_B[name].weight for name in adapters])
            scaling = torch.tensor([layer.scaling[name] for name in adapters], device=x.device)
            return lora_linear(x, base.weight, A, B, base.bias, scaling=scaling, adapter_index=adapter_index,
                               backend=self.backend)
        adapter = self._fused_adapter(args, kwargs)
        if adapter is None:
            return type(layer).forward(layer, x, *args, **kwargs)
        base = layer.base_layer
        if self.kind == _IA3:
            scale = layer.ia3_l[adapter].reshape(-1)  # (1, K) -> (K,), a view: gradients reach ia3_l
            return vefa_linear(x, base.weight, scale, base.bias, backend=self.backend)
        dropout = layer.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        return lora_linear(
            x, base.weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, base.bias,
            scaling=layer.scaling[adapter], dropout_p=p, backend=self.backend,
        )


def accelerate(model, *, backend=None):
    """Run the PEFT IA3 (feedforward) and LoRA Linear layers of `model` on featadapt's fused ops, in place.

    `model` is a PeftModel or any module with PEFT layers injected. An IA3
    layer in feedforward mode computes ``base(x * ia3_l)``, which is VeFA
    without shift (`vefa_linear`); a plain LoRA Linear layer is `lora_linear`
    with the layer's scaling and dropout p. Results equal PEFT's own forward
    up to rounding. A mixed-adapter batch (``adapter_names=[...]``) on a LoRA
    layer runs as one batched `lora_linear` call with ``adapter_index``.
    Layers that are merged, have adapters disabled, or run several adapters
    at once fall back to PEFT's forward at call time. Layers
    it cannot take (IA3 on outputs, DoRA or other LoRA variants, lora_bias,
    Conv/Embedding/quantized/Conv1D layers, several active adapters, a forward
    already replaced by someone else) are left alone and listed in the report.

    backend: the featadapt backend for these calls (None: FEATADAPT_BACKEND or automatic).
    Returns an AccelerationReport. `restore(model)` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: model must be a torch.nn.Module (e.g. a PeftModel), got {type(model).__name__}")
    backend = _check_backend("accelerate", backend)
    report = AccelerationReport()
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if isinstance(module, _FeatureAdapterLayer):
            report.skipped[name] = f"a featadapt {module.method} layer: already on featadapt's ops"
            continue
        if type(module) is _IA3Linear:
            kind = _IA3
        elif type(module) is _LoraLinear:
            kind = _LORA
        else:
            report.skipped[name] = (
                f"{type(module).__module__}.{type(module).__name__} is not PEFT's IA3 or LoRA Linear layer "
                "(Conv, Embedding, quantized and other methods' layers stay with PEFT)"
            )
            continue
        existing = module.__dict__.get("forward")
        if existing is not None and not isinstance(existing, _FusedForward):
            report.skipped[name] = "its forward is already replaced by something else (e.g. an accelerate hook)"
            continue
        problem = _layer_problem(module, kind)
        if problem is not None:
            report.skipped[name] = problem
            continue
        module.forward = _FusedForward(module, kind, backend)
        report.accelerated.append(name)
    return report


def restore(model):
    """Undo `accelerate`: the layers run PEFT's own forward again. Returns their names."""
    restored = []
    for name, module in model.named_modules():
        if isinstance(module.__dict__.get("forward"), _FusedForward):
            del module.forward
            restored.append(name)
    return restored
