"""Which frozen layers an adapter can wrap, and how it reads them.

Three kinds of base:

- ``LINEAR``: an ``nn.Linear`` with a plain floating-point weight, or
  transformers' ``Conv1D`` (GPT-2). The fused ops read its weight directly.
- ``QUANTIZED``: a linear layer whose weight the ops cannot read — bitsandbytes'
  ``Linear4bit`` and ``Linear8bitLt``, or an ``nn.Linear`` whose weight is a
  tensor subclass (torchao's weight-only quantization). Feature-space
  adapters call it as a black box on the transformed input; its weight is
  read only to merge, and only dequantized then.
- ``CONV``: ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``: the adapters act on
  the input channels.

Optional libraries are never imported here: a bitsandbytes or transformers
class can only exist once its module is loaded, so the classes are looked up
in ``sys.modules``.
"""

import sys

import torch
from torch import nn

LINEAR = "linear"
QUANTIZED = "quantized"
CONV = "conv"

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _loaded_class(module_name, class_name):
    return getattr(sys.modules.get(module_name), class_name, None)


def is_conv1d(module):
    """Whether `module` is transformers' Conv1D (GPT-2's layers: y = x @ weight + bias,
    weight stored (in_features, out_features))."""
    conv1d = _loaded_class("transformers.pytorch_utils", "Conv1D")
    return conv1d is not None and isinstance(module, conv1d)


def bnb_kind(module):
    """"4bit" or "8bit" for bitsandbytes' Linear4bit / Linear8bitLt, else None."""
    for kind, name in (("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")):
        cls = _loaded_class("bitsandbytes.nn", name)
        if cls is not None and isinstance(module, cls):
            return kind
    return None


def has_plain_weight(module):
    """A floating-point weight that is an ordinary tensor (no quantized subclass)."""
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and type(weight) in (torch.Tensor, nn.Parameter)
            and weight.dtype.is_floating_point)


def base_kind(module):
    """LINEAR, QUANTIZED, CONV, or None for a layer no adapter can wrap."""
    if is_conv1d(module):
        return LINEAR
    if bnb_kind(module) is not None:
        return QUANTIZED
    if isinstance(module, nn.Linear):
        return LINEAR if has_plain_weight(module) else QUANTIZED
    if isinstance(module, _CONV_TYPES):
        return CONV if has_plain_weight(module) else None
    return None


def is_linear_base(module):
    """nn.Linear with a plain weight, or transformers' Conv1D: what the fused ops read."""
    return base_kind(module) == LINEAR


def is_adaptable(module):
    return base_kind(module) is not None


def quantized_description(module):
    """"bitsandbytes Linear4bit (nf4)", "torchao Int8Tensor", ... for messages."""
    kind = bnb_kind(module)
    if kind == "4bit":
        return f"bitsandbytes Linear4bit ({getattr(module.weight, 'quant_type', '?')})"
    if kind == "8bit":
        return "bitsandbytes Linear8bitLt"
    return f"{type(module).__name__} with a {type(module.weight).__name__} weight"


@torch.no_grad()
def dequantized_weight(module, weight=None, state=None):
    """The (out_features, in_features) weight a quantized linear computes with,
    in floating point; its own forward equals ``F.linear`` with it. `weight`
    (and, for 8-bit, `state`) default to the module's own."""
    kind = bnb_kind(module)
    weight = module.weight if weight is None else weight
    if kind == "4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if kind == "8bit":
        state = getattr(module, "state", None) if state is None else state
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else state.SCB
        return weight.data.float() * (scb.float()[:, None] / 127)
    dequantize = getattr(weight, "dequantize", None)
    if dequantize is None:
        raise TypeError(f"cannot dequantize the weight of {quantized_description(module)}: it has no dequantize()")
    return dequantize()


def compute_dtype(module):
    """The floating dtype a quantized linear's forward takes and returns."""
    dtype = getattr(module, "compute_dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    bias = getattr(module, "bias", None)
    if bias is not None and bias.dtype.is_floating_point:
        return bias.dtype
    weight_dtype = getattr(module.weight, "dtype", None)
    if isinstance(weight_dtype, torch.dtype) and weight_dtype.is_floating_point:
        return weight_dtype
    return torch.float32


def in_out_features(module):
    """(in_features, out_features) of a linear base of any kind."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def check_input_gradients(module, name):
    """Refuse a quantized base whose forward gives no gradient to its input
    (torchao's dynamic-activation configs): an adapter before it could not train."""
    in_features, _ = in_out_features(module)
    probe = torch.ones(1, in_features, dtype=compute_dtype(module), device=_device(module), requires_grad=True)
    with torch.enable_grad():
        out = module(probe)
        # an output can require grad (through the weight) and still give none to the input
        grad = (torch.autograd.grad(out.float().sum(), probe, allow_unused=True)[0]
                if isinstance(out, torch.Tensor) and out.requires_grad else None)
    if grad is None:
        raise TypeError(
            f"{name}: the base layer ({quantized_description(module)}) gives no gradient to its input, "
            "so no adapter before it can train (dynamic-activation quantization does this); "
            "use a weight-only quantization of the base instead"
        )


def _device(module):
    weight = getattr(module, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")


def guard_bnb_cpu_repacking(module):
    """bitsandbytes repacks a 4-bit weight into a CPU-only layout on its first
    eval-mode forward without input grad on CPUs with AVX512-BF16; after that,
    dequantizing gives garbage and training breaks. Adapters need the weight as
    stored, so the repacking is switched off on every Linear4bit they wrap."""
    if bnb_kind(module) == "4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False
