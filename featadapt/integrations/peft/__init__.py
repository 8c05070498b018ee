"""Hugging Face PEFT integration.

Two things:

1. VeFA and LoRFA as PEFT methods. Importing this package registers them, so
   ``get_peft_model(model, VeFAConfig(target_modules=[...]))`` and
   ``LoRFAConfig(r=8, lora_alpha=16, ...)`` work like PEFT's own methods
   (save_pretrained / PeftModel.from_pretrained, merge_and_unload,
   disable_adapter, add_adapter / set_adapter, add_weighted_adapter;
   transformers' model.add_adapter and load_adapter where the installed
   transformers accepts the installed peft, else a clear PeftVersionError).
   They adapt:

   - nn.Linear and transformers' Conv1D (GPT-2): the layers compute with
     featadapt's fused ops (`featadapt.ops.vefa_linear` / `lorfa_linear`, so
     the backend dispatch applies); a Conv1D's weight is read through the free
     view ``weight.T`` and merged in its own layout;
   - quantized linears (bitsandbytes 4-bit and 8-bit, torchao weight-only) and
     nn.Conv1d/2d/3d: the base is called as a black box on the transformed
     input, channels first for a convolution. Merging into a quantized base
     re-quantizes it, so it is refused unless asked for:
     ``merge_and_unload(requantize=True)``, or ``merge_and_unload(dequantize=True)``
     for full-precision layers with the adapters folded in exactly.

   Mixed-adapter batches work as in PEFT's LoRA: ``model(..., adapter_names=[...])``
   (one name per sequence, "__base__" for the base model).
2. `accelerate(peft_model)`: runs existing PEFT IA3 feedforward layers (IA3 in
   feedforward mode computes ``base(x * ia3_l)``, VeFA without shift) and plain
   LoRA Linear layers on featadapt's fused ops, in place (LoRA mixed-adapter
   batches too, through the batched op); `restore` undoes it.

The modules: `configs` (VeFAConfig, LoRFAConfig), `layers` (what every tuner
layer shares: state, merging), `fused` (the layers on fused ops), `black_box`
(the layers on quantized and convolution bases), `mixed_batches`, `weighted`
(add_weighted_adapter), `tuners` (the BaseTuners and their registration),
`acceleration` (accelerate: PEFT's own layers on featadapt's ops; set_backend).

PEFT only registers methods named in its `PeftType` enum, so this package adds
real members VEFA and LORFA to it (`peft_types`): a plain string would break
the code in transformers that reads ``peft_config.peft_type.value``.
"""

MIN_PEFT = "0.21"  # the oldest release this was tested with (0.21.2); it uses PEFT's newer tuner API

try:
    import peft
    from packaging.version import Version
except ImportError as exc:  # peft is an optional dependency
    raise ImportError(
        f"featadapt.integrations.peft needs Hugging Face PEFT (peft>={MIN_PEFT}): pip install featadapt[peft]"
    ) from exc
if Version(peft.__version__) < Version(MIN_PEFT):
    raise ImportError(
        f"featadapt.integrations.peft needs peft>={MIN_PEFT}, found {peft.__version__}: pip install -U peft"
    )

from ..transformers_adapters import PeftVersionError, adapter_methods_unsupported_reason, guard_adapter_methods
from .acceleration import AccelerationReport, accelerate, restore, set_backend
from .black_box import LoRFAPeftBlackBox, VeFAPeftBlackBox
from .configs import LoRFAConfig, VeFAConfig
from .fused import LoRFAPeftLinear, VeFAPeftLinear
from .layers import LoRFALayer, VeFALayer
from .tuners import LoRFAModel, VeFAModel, register

__all__ = [
    "AccelerationReport",
    "LoRFAConfig",
    "LoRFALayer",
    "LoRFAModel",
    "LoRFAPeftBlackBox",
    "LoRFAPeftLinear",
    "PeftVersionError",
    "VeFAConfig",
    "VeFALayer",
    "VeFAModel",
    "VeFAPeftBlackBox",
    "VeFAPeftLinear",
    "accelerate",
    "adapter_methods_unsupported_reason",
    "restore",
    "set_backend",
]

register()
guard_adapter_methods()  # transformers' model.add_adapter & co. fail clearly where they need a newer peft
