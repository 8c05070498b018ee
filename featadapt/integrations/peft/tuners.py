"""The BaseTuners of featadapt's PEFT methods (`get_peft_model` builds them)
and their registration with PEFT."""

from contextlib import contextmanager
from typing import Dict, List, Optional

from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import register_peft_method
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ...nn.bases import LINEAR, guard_bnb_cpu_repacking
from .black_box import LoRFAPeftBlackBox, VeFAPeftBlackBox
from .configs import LoRFAConfig, VeFAConfig, check_bool
from .fused import LoRFAPeftLinear, VeFAPeftLinear
from .layers import BASES, FeatureAdapterLayer, LoRFALayer, VeFALayer, peft_base_kind, unsupported_base_reason
from .mixed_batches import BASE_NAME, CALL_ADAPTER_NAMES, call_adapter_names
from .peft_types import peft_type_member
from .weighted import add_weighted_lorfa, add_weighted_vefa


def _pass_call_adapter_names(module, args, kwargs):
    names = call_adapter_names(module)
    if names is not None:
        kwargs["adapter_names"] = names
    return args, kwargs


class _FeatureAdapterModel(BaseTuner):
    """The shared BaseTuner: put a layer around each targeted base — featadapt's
    fused layers around nn.Linear and transformers' Conv1D, its black-box
    layers around quantized linears and convolutions.

    "all-linear" is PEFT's own: every linear layer (quantized ones included)
    and Conv1D except a transformers model's output layer (e.g. GPT-2's lm_head)."""

    target_module_mapping: Dict[str, List[str]] = {}  # no per-architecture defaults: target_modules is required
    _linear_cls = None
    _black_box_cls = None

    def _pre_injection_hook(self, model, config, adapter_name):
        super()._pre_injection_hook(model, config, adapter_name)
        # bitsandbytes' CPU repacking would corrupt any 4-bit layer of the model,
        # adapted or not, for the adapted ones that depend on its output
        for module in model.modules():
            guard_bnb_cpu_repacking(module)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config, module_name=current_key)
            return
        method = self.tuner_layer_cls.method
        if isinstance(target, BaseTunerLayer):
            raise TypeError(
                f"{method}: module {current_key!r} already carries a {type(target).__name__} adapter of another "
                f"PEFT method; featadapt's layers wrap {BASES}"
            )
        kind = peft_base_kind(target)
        if kind is None:
            raise TypeError(
                f"{method}: module {current_key!r} is a {type(target).__name__}, which featadapt's {method} layers "
                f"cannot wrap: {unsupported_base_reason(target)}; leave it out of target_modules or add it to "
                "exclude_modules"
            )
        cls = self._linear_cls if kind == LINEAR else self._black_box_cls
        new_module = cls(target, adapter_name, config, module_name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[List[str]] = None, *, requantize: bool = False,
                         dequantize: bool = False) -> nn.Module:
        """PEFT's merge_and_unload. Merging into a quantized base re-quantizes it
        and loses precision, so a model with quantized adapted layers needs one of:

        requantize: merge and quantize again in the base's own format (bitsandbytes;
            a warning gives each layer's relative error);
        dequantize: replace each quantized base by a float32 nn.Linear with its
            dequantized weight first, so the adapters are folded in exactly and
            the returned model has full-precision layers there.
        """
        check_bool("merge_and_unload", "requantize", requantize)
        check_bool("merge_and_unload", "dequantize", dequantize)
        if requantize and dequantize:
            raise ValueError("merge_and_unload: pass requantize=True or dequantize=True, not both")
        layers = [m for m in self.model.modules() if isinstance(m, FeatureAdapterLayer)]
        if dequantize:
            for layer in layers:
                layer.dequantize_base()
        for layer in layers:
            layer._requantize_on_merge = requantize
        try:
            return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge,
                                            adapter_names=adapter_names)
        finally:
            for layer in layers:
                layer._requantize_on_merge = False

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """`model(..., adapter_names=[...])`: one adapter name per sequence, as PEFT's LoRA
        takes it (PeftModel.forward and generate enter this context). Hands the names
        to every adapter layer (and modules_to_save wrapper) for the duration of the
        call, in a ContextVar, so that calls in other threads keep their own names;
        PEFT's errors for training mode and unknown names; with beam search each
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

        receivers = [m for m in self.modules() if isinstance(m, (self.tuner_layer_cls, AuxiliaryTrainingWrapper))]
        # an enclosing call's names (another model's) stay in force
        names = {**(CALL_ADAPTER_NAMES.get() or {}), **{id(module): adapter_names for module in receivers}}
        token = CALL_ADAPTER_NAMES.set(names)
        # PEFT's modules_to_save wrappers take the names as an argument: a hook passes
        # them, read from the ContextVar, so a hook left by a concurrent call is harmless
        handles = [module.register_forward_pre_hook(_pass_call_adapter_names, with_kwargs=True)
                   for module in receivers if isinstance(module, AuxiliaryTrainingWrapper)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            CALL_ADAPTER_NAMES.reset(token)


class VeFAModel(_FeatureAdapterModel):
    """The VeFA tuner: `get_peft_model(model, VeFAConfig(...))` builds one."""

    prefix: str = "vefa_"
    tuner_layer_cls = VeFALayer
    _linear_cls = VeFAPeftLinear
    _black_box_cls = VeFAPeftBlackBox

    def add_weighted_adapter(self, adapters, weights, adapter_name):
        """Add `adapter_name` with ``scale = 1 + Σ wᵢ (sᵢ − 1)``, ``shift = Σ wᵢ tᵢ``
        over `adapters` (see featadapt.integrations.peft.weighted)."""
        add_weighted_vefa(self, adapters, weights, adapter_name)


class LoRFAModel(_FeatureAdapterModel):
    """The LoRFA tuner: `get_peft_model(model, LoRFAConfig(...))` builds one."""

    prefix: str = "lorfa_"
    tuner_layer_cls = LoRFALayer
    _linear_cls = LoRFAPeftLinear
    _black_box_cls = LoRFAPeftBlackBox

    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="cat"):
        """Add `adapter_name` with ``γ B A = Σ wᵢ γᵢ Bᵢ Aᵢ`` over `adapters`, the
        factors concatenated along the rank (see featadapt.integrations.peft.weighted)."""
        add_weighted_lorfa(self, adapters, weights, adapter_name, combination_type)


def register():
    """Register both methods with PEFT; safe to run again (a module reload
    replaces featadapt's own earlier registration)."""
    for name, config_cls, model_cls in (("vefa", VeFAConfig, VeFAModel), ("lorfa", LoRFAConfig, LoRFAModel)):
        peft_type = peft_type_member(name.upper())
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
