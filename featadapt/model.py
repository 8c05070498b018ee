"""Model-level helpers: put adapters into a model, count, merge and take them out."""

import inspect
import re

from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .nn import ADAPTER_CLASSES, BLACK_BOX_CLASSES, AdapterLayer
from .nn.bases import LINEAR, QUANTIZED, base_kind, guard_bnb_cpu_repacking, is_adaptable

ALL_LINEAR = "all-linear"
ADAPTABLE = ("an nn.Linear, transformers' Conv1D, a quantized linear (bitsandbytes Linear4bit/Linear8bitLt, "
             "torchao) or an nn.Conv1d/2d/3d")


def adapter_class(method, base=None):
    """The adapter class for `method` on `base`: the fused-op layers for an
    nn.Linear or Conv1D (or when no base is given), the black-box ones for
    quantized linears and convolutions."""
    try:
        classes = ADAPTER_CLASSES if base is None or base_kind(base) == LINEAR else BLACK_BOX_CLASSES
        return classes[method]
    except (KeyError, TypeError):
        known = ", ".join(repr(m) for m in ADAPTER_CLASSES)
        raise ValueError(f"unknown method {method!r}; expected one of: {known}") from None


def adapter_layers(model):
    """(name, layer) for every adapter layer in the model."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterLayer)]


def _is_any_linear(module):
    return base_kind(module) in (LINEAR, QUANTIZED)


def _output_head(model, linears):
    """The layer "all-linear" leaves alone: the model's output embeddings when it
    declares them (transformers models do), otherwise its last nn.Linear (heads
    are nn.Linear; GPT-2's Conv1D layers are never its output head)."""
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        head = get_output()
        if head is not None:
            return head
    return linears[-1][1] if linears else None


def _selects(target_modules, name):
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == suffix or name.endswith("." + suffix) for suffix in target_modules)


def _inside_adapter(name, adapter_names):
    return any(name.startswith(prefix + ".") for prefix in adapter_names)


def matching_modules(model, target_modules):
    """The (name, module) pairs `inject` would adapt for `target_modules`."""
    adapted = {name for name, _ in adapter_layers(model)}
    modules = [(n, m) for n, m in model.named_modules() if n and not _inside_adapter(n, adapted)]
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        linears = [(n, m) for n, m in modules if isinstance(m, nn.Linear) and _is_any_linear(m)]
        head = _output_head(model, linears)
        return [(n, m) for n, m in modules if _is_any_linear(m) and m is not head]
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not all(isinstance(t, str) for t in target_modules):
            raise TypeError(f"target_modules must be a regex string or a list of name suffixes, got {target_modules!r}")
    matched = [(n, m) for n, m in modules if _selects(target_modules, n)]
    for name, module in matched:
        if isinstance(module, AdapterLayer):
            raise ValueError(f"module {name!r} already has a {module.method} adapter")
        if isinstance(module, NonDynamicallyQuantizableLinear):
            raise TypeError(
                f"module {name!r} is the output projection of an nn.MultiheadAttention, which reads "
                "its weight directly and would bypass an adapter"
            )
        if not is_adaptable(module):
            raise TypeError(
                f"module {name!r} matched target_modules={target_modules!r} but is a "
                f"{type(module).__name__}, not {ADAPTABLE}"
            )
    return matched


def _check_config(method, config):
    cls = adapter_class(method)  # the black-box classes take the same options
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "base_layer")]
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise TypeError(f"method {method!r} takes the options {', '.join(accepted)}; got unexpected {', '.join(unknown)}")
    return cls


def replace_module(model, name, new_module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new_module)


def freeze_all_but_adapters(model):
    """Only adapter parameters train: the base layers and everything else are frozen.

    Every bitsandbytes Linear4bit in the model, adapted or not, also has its
    CPU repacking switched off (see `guard_bnb_cpu_repacking`): a repacked
    layer anywhere would break training the adapters around it."""
    for module in model.modules():
        guard_bnb_cpu_repacking(module)
    model.requires_grad_(False)
    for _, layer in adapter_layers(model):
        for param in layer.parameters(recurse=False):
            param.requires_grad_(True)


def inject(model, method, target_modules=ALL_LINEAR, **config):
    """Wrap the selected linear layers of `model` in `method`'s adapter, in place.

    method: "vefa", "lorfa" or "lora". target_modules: "all-linear" (every
    nn.Linear, transformers' Conv1D, as in GPT-2, and quantized linear but the
    output head), a list of module-name suffixes, or a regex matched against
    the full module name (which may also select convolutions). config goes to the adapter class (e.g. r=8, alpha=16 for
    LoRA/LoRFA; shift=True for VeFA).
    Freezes everything that is not an adapter; returns the replaced names.
    """
    _check_config(method, config)
    matched = matching_modules(model, target_modules)
    if not matched:
        raise ValueError(
            f"inject: no nn.Linear module matched target_modules={target_modules!r} (nor any transformers' Conv1D)"
        )
    for name, module in matched:
        replace_module(model, name, adapter_class(method, module)(module, **config))
    freeze_all_but_adapters(model)
    return [name for name, _ in matched]


def trainable_parameters(model):
    """(trainable, total) parameter counts."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def print_trainable_parameters(model):
    trainable, total = trainable_parameters(model)
    share = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}")


def merge_adapters(model, *, requantize=False):
    """Merge every adapter. Layers on a quantized base refuse (merging re-quantizes,
    losing precision) unless requantize=True."""
    for _, layer in adapter_layers(model):
        if not layer.merged:
            if getattr(layer, "kind", None) == QUANTIZED:
                layer.merge(requantize=requantize)
            else:
                layer.merge()
    return model


def unmerge_adapters(model):
    for _, layer in adapter_layers(model):
        if layer.merged:
            layer.unmerge()
    return model


def unload(model, merge=True, *, dequantize=False):
    """Replace every adapter layer by its base layer: merged (merge=True) or with
    the original pretrained weight (merge=False). Returns the model.

    A quantized base cannot be merged into without re-quantizing: with
    merge=True it raises, unless dequantize=True, which puts a full-precision
    (float32) nn.Linear with the adapter folded in exactly in its place.
    All checks run before any layer is replaced."""
    layers = adapter_layers(model)
    if merge and not dequantize:
        for name, layer in layers:
            if getattr(layer, "kind", None) == QUANTIZED and not layer.merged:
                layer.merge()  # raises, saying why and what to do instead
    for name, layer in layers:
        if merge and dequantize and getattr(layer, "kind", None) == QUANTIZED:
            replace_module(model, name, layer.dequantized_layer())
            continue
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        replace_module(model, name, layer.base_layer)
    return model
