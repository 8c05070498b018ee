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


def _standard_class(module):
    """The library class whose forward the adapters reproduce or call for `module`
    (nn.Linear, transformers' Conv1D, nn.Conv1d/2d/3d), or None."""
    if is_conv1d(module):
        return _loaded_class("transformers.pytorch_utils", "Conv1D")
    for cls in (nn.Linear, *_CONV_TYPES):
        if isinstance(module, cls):
            return cls
    return None


def overridden_forward(module):
    """The class (nn.Linear, Conv1D, nn.Conv2d, ...) whose forward `module`'s own
    class replaces, or None. Adapters compute with the weight as that class's
    forward does (and merge into it), so a replaced forward would be dropped."""
    if bnb_kind(module) is not None:  # bitsandbytes' own forward is the quantized matmul
        return None
    cls = _standard_class(module)
    if cls is None or type(module).forward is cls.forward:
        return None
    return cls


def base_kind(module):
    """LINEAR, QUANTIZED, CONV, or None for a layer no adapter can wrap (including
    a subclass that overrides its base class's forward)."""
    if overridden_forward(module) is not None:
        return None
    if is_conv1d(module):
        return LINEAR
    if bnb_kind(module) is not None:
        return QUANTIZED
    if isinstance(module, nn.Linear):
        return LINEAR if has_plain_weight(module) else QUANTIZED
    if isinstance(module, _CONV_TYPES):
        return CONV if has_plain_weight(module) else None
    return None


def overridden_forward_reason(module):
    """Why a subclass with its own forward is refused (None when it has none), for messages."""
    cls = overridden_forward(module)
    if cls is None:
        return None
    return (f"its class {type(module).__qualname__} overrides the forward of {cls.__name__}; an adapter computes "
            f"with the weight as {cls.__name__}.forward does (and merges into it), so that forward would be "
            "silently dropped and the model's output would change")


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


def set_bnb_weight(base, weight):
    """Quantize `weight` (out, in) into `base`'s own bitsandbytes format, replacing its weight."""
    import bitsandbytes as bnb

    old = base.weight
    if bnb_kind(base) == "4bit":
        new = bnb.nn.Params4bit(
            weight.to(old.quant_state.dtype), requires_grad=False, quant_type=old.quant_type,
            blocksize=old.blocksize, compress_statistics=old.compress_statistics,
            quant_storage=old.quant_storage, module=base,
        )
        base.weight = new.to(old.device)
    else:
        new = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False, has_fp16_weights=False)
        base.weight = new.to(old.device)
        base.state = bnb.MatmulLtState()
        base.state.has_fp16_weights = False


def merge_dtype(*tensors):
    """float32, or float64 when any tensor is: the dtype merges are computed in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@torch.no_grad()
def write_merged_bias(base, bias, dtype):
    """Write a merged bias into `base`: into its own, or as a new frozen bias of
    `dtype` where it has none. Returns whether the merge created it."""
    if base.bias is None:
        base.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return True
    base.bias.copy_(bias)
    return False


@torch.no_grad()
def restore_bias(base, saved, created):
    """Undo `write_merged_bias`: drop a bias the merge created, else copy the
    bias saved before merging back (None: it was never changed)."""
    if created:
        base.bias = None
    elif saved is not None:
        base.bias.copy_(saved)


def check_requantizable(owner, base, requantize, opt_in, full_precision):
    """Refuse to merge into a quantized `base` unless `requantize`, naming the
    opt-in and the full-precision way round; refuse bases whose format is not
    known here (torchao's configs)."""
    if not requantize:
        raise ValueError(
            f"{owner}: the base is a {quantized_description(base)}; merging re-quantizes its weight and loses "
            f"precision. Use {opt_in} to do it anyway (unmerge() restores the original exactly), or "
            f"{full_precision} for full-precision layers with the adapter folded in exactly"
        )
    if bnb_kind(base) is None:
        raise ValueError(
            f"{owner}: re-quantizing a {quantized_description(base)} is not supported (its quantization config "
            f"is not known here); use {full_precision} for full-precision layers"
        )


@torch.no_grad()
def requantize_merged(base, weight, bias):
    """Quantize a merged (weight, bias) into the bitsandbytes layer `base`, in
    its own format. Returns (what `restore_quantized` puts back, the relative
    error of the re-quantized weight against `weight`)."""
    saved = {"weight": base.weight, "bias": None if base.bias is None else base.bias.detach().clone(),
             "state": getattr(base, "state", None)}
    set_bnb_weight(base, weight)
    if bias is not None:
        write_merged_bias(base, bias, compute_dtype(base))
    requantized = dequantized_weight(base).to(weight.dtype)
    error = float((requantized - weight).norm() / weight.norm().clamp_min(1e-30))
    return saved, error


@torch.no_grad()
def restore_quantized(base, saved):
    """Put back what `requantize_merged` replaced, bit for bit."""
    base.weight = saved["weight"]
    if saved["state"] is not None:
        base.state = saved["state"]
    restore_bias(base, saved["bias"], created=saved["bias"] is None)


def saved_original_weight(base, saved):
    """W0 as a quantized base computed with it before `requantize_merged`, dequantized."""
    return dequantized_weight(base, saved["weight"], saved["state"])
