"""Model-level helpers: put adapters into a model, count, merge and take them out."""

import inspect
import re

from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .nn import ADAPTER_CLASSES, BLACK_BOX_CLASSES, AdapterLayer
from .nn.bases import (
    LINEAR,
    QUANTIZED,
    base_kind,
    check_requantizable,
    guard_bnb_cpu_repacking,
    is_adaptable,
    is_conv1d,
    overridden_forward_reason,
)

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


def _is_linear_layer(module):
    """An nn.Linear of any kind (quantized ones are subclasses) or transformers' Conv1D,
    except nn.MultiheadAttention's out_proj: it reads that weight directly, never
    calling the layer, so an adapter there would be bypassed."""
    return (isinstance(module, nn.Linear) or is_conv1d(module)) and not isinstance(
        module, NonDynamicallyQuantizableLinear)


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


def _target_pattern(target_modules):
    """ALL_LINEAR, a compiled regex, or a list of name suffixes; refuses anything else."""
    if isinstance(target_modules, str):
        if target_modules == ALL_LINEAR:
            return ALL_LINEAR
        try:
            return re.compile(target_modules)
        except re.error as error:
            raise ValueError(
                f"target_modules={target_modules!r} is not a valid regular expression: {error}"
            ) from None
    try:
        suffixes = list(target_modules)
    except TypeError:
        suffixes = None
    if suffixes is None or isinstance(target_modules, bytes) or not all(isinstance(t, str) for t in suffixes):
        raise TypeError(
            f"target_modules must be {ALL_LINEAR!r}, a regex string or a list of module-name suffixes, "
            f"got {target_modules!r}"
        )
    return suffixes


def _selects(pattern, name):
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(name) is not None
    return any(name == suffix or name.endswith("." + suffix) for suffix in pattern)


def _inside_adapter(name, adapter_names):
    return any(name.startswith(prefix + ".") for prefix in adapter_names)


def matching_modules(model, target_modules):
    """The (name, module) pairs `inject` would adapt for `target_modules`; raises,
    naming the module, when one it selects cannot be adapted."""
    pattern = _target_pattern(target_modules)
    adapted = {name for name, _ in adapter_layers(model)}
    modules = [(n, m) for n, m in model.named_modules() if n and not _inside_adapter(n, adapted)]
    if isinstance(pattern, str):  # ALL_LINEAR
        linears = [(n, m) for n, m in modules if _is_linear_layer(m)]
        head = _output_head(model, [(n, m) for n, m in linears if isinstance(m, nn.Linear)])
        matched = [(n, m) for n, m in linears if m is not head]
    else:
        matched = [(n, m) for n, m in modules if _selects(pattern, n)]
    for name, module in matched:
        if isinstance(module, AdapterLayer):
            raise ValueError(f"module {name!r} already has a {module.method} adapter")
        if isinstance(module, NonDynamicallyQuantizableLinear):
            raise TypeError(
                f"module {name!r} is the output projection of an nn.MultiheadAttention, which reads "
                "its weight directly and would bypass an adapter"
            )
        reason = overridden_forward_reason(module)
        if reason is not None:
            raise TypeError(
                f"module {name!r} matched target_modules={target_modules!r} but cannot be adapted: {reason}; "
                "leave it out of target_modules"
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
    """Put `new_module` in place of the submodule `name` of `model`."""
    if not isinstance(name, str) or not name:
        # "" names the model itself, which no module can replace in place
        # (setattr would attach a child named "" to it).
        raise ValueError(f"replace_module: name must name a submodule of the model, got {name!r}")
    if not isinstance(new_module, nn.Module):
        raise TypeError(f"replace_module: new_module must be an nn.Module, got {type(new_module).__name__}")
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"replace_module: the model has no submodule {name!r}") from None
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
    """Wrap the selected layers of `model` in `method`'s adapter, in place.

    Everything that is not an adapter is frozen. Every check runs first: when
    inject refuses, the model is left unchanged.

    Args:
        model: any ``nn.Module``.
        method: ``"vefa"``, ``"lorfa"`` or ``"lora"``.
        target_modules: ``"all-linear"`` (every ``nn.Linear``, transformers'
            ``Conv1D`` as in GPT-2, and quantized linear, but the output head:
            the model's ``get_output_embeddings()`` when it declares one, else
            its last ``nn.Linear``), a list of module-name suffixes such as
            ``["query", "value"]``, or a compiled regex matched against the
            full module name (which may also select convolutions).
        **config: the adapter's options: ``shift`` for VeFA (see `VeFALinear`);
            ``r``, ``alpha``, ``dropout``, ``rslora`` for LoRFA and LoRA (see
            `LoRFALinear`, `LoRALinear`).

    Returns:
        list[str]: the names of the modules replaced.

    Raises:
        ValueError: an unknown method, nothing matched, a module that already
            has an adapter, or an option value a layer refuses (such as ``r``
            above its ``in_features``).
        TypeError: an unknown option, a ``target_modules`` of the wrong kind,
            or a selected module that cannot be adapted (named in the message).

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10))
        >>> featadapt.inject(model, "lorfa", r=8, alpha=16)
        ['0']
    """
    _check_config(method, config)
    matched = matching_modules(model, target_modules)
    if not matched:
        raise ValueError(
            f"inject: no nn.Linear module matched target_modules={target_modules!r} (nor any transformers' Conv1D)"
        )
    # Build every adapter before replacing any, so that an option value one layer
    # refuses (say r above its in_features) leaves the model as it was; building
    # freezes each base, so the flags are put back on failure.
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        adapted = []
        for name, module in matched:
            layer = adapter_class(method, module)(module, **config)
            layer.training = module.training  # as the layer it replaces (adapter dropout)
            adapted.append((name, layer))
    except BaseException:
        for param, flag in flags:
            param.requires_grad_(flag)
        raise
    for name, layer in adapted:
        replace_module(model, name, layer)
    freeze_all_but_adapters(model)
    return [name for name, _ in matched]


def trainable_parameters(model):
    """Count the parameters of `model`.

    Returns:
        tuple[int, int]: ``(trainable, total)``, the elements of the parameters
        that require grad and of all parameters.
    """
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def print_trainable_parameters(model):
    """Print `trainable_parameters(model)` in PEFT's format.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10))
        >>> featadapt.inject(model, "lorfa", r=8, alpha=16)
        ['0']
        >>> featadapt.print_trainable_parameters(model)
        trainable params: 1,024 || all params: 10,634 || trainable%: 9.6295
    """
    trainable, total = trainable_parameters(model)
    share = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}")


def _check_bool(owner, name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be True or False, got {value!r}")


def _is_quantized(layer):
    return getattr(layer, "kind", None) == QUANTIZED


def _merge_all(layers, requantize=False):
    """Merge each (name, layer); if one fails, unmerge those merged here and re-raise."""
    merged = []
    try:
        for _, layer in layers:
            if _is_quantized(layer):
                layer.merge(requantize=requantize)
            else:
                layer.merge()
            merged.append(layer)
    except BaseException:
        for layer in reversed(merged):
            layer.unmerge()
        raise


def merge_adapters(model, *, requantize=False):
    """Fold every adapter into its base layer's weight, for inference at the base layer's cost.

    `unmerge_adapters` restores the original weights bit for bit. Every layer
    is checked before any is merged.

    Args:
        model: a model with adapters (from `inject` or `load_adapters`).
        requantize: merge into quantized bases too (bitsandbytes), re-quantizing
            the weight, which loses precision (a warning gives the error).

    Returns:
        The model.

    Raises:
        ValueError: a layer on a quantized base, unless ``requantize=True``.
        TypeError: ``requantize`` is not a bool.
    """
    _check_bool("merge_adapters", "requantize", requantize)
    layers = [(name, layer) for name, layer in adapter_layers(model) if not layer.merged]
    for name, layer in layers:
        if _is_quantized(layer):
            check_requantizable(f"merge_adapters: module {name!r}", layer.base_layer, requantize,
                                "merge_adapters(model, requantize=True)",
                                "featadapt.unload(model, merge=True, dequantize=True)")
    _merge_all(layers, requantize)
    return model


def unmerge_adapters(model):
    """Undo `merge_adapters`: every merged layer gets its original weight back, bit for bit.

    Returns:
        The model.
    """
    for _, layer in adapter_layers(model):
        if layer.merged:
            layer.unmerge()
    return model


def unload(model, merge=True, *, dequantize=False):
    """Replace every adapter layer by its base layer, in place.

    All checks run before any layer changes; when unload refuses, the model is
    left unchanged.

    Args:
        model: a model with adapters, or one adapter layer.
        merge: fold each adapter into its base's weight (True), or give the
            base back with its original pretrained weight (False).
        dequantize: put a full-precision (float32) ``nn.Linear`` with the
            adapter folded in exactly in place of each quantized base (needs
            ``merge=True``).

    Returns:
        The model, or, when `model` is itself an adapter layer, its base layer.

    Raises:
        ValueError: ``merge=True`` on a quantized base without
            ``dequantize=True`` (merging would re-quantize it; see
            `merge_adapters`), or ``dequantize=True`` with ``merge=False``.
        TypeError: ``merge`` or ``dequantize`` is not a bool.

    Example:
        >>> plain = featadapt.unload(model)      # plain nn.Linear layers, adapters merged
    """
    _check_bool("unload", "merge", merge)
    _check_bool("unload", "dequantize", dequantize)
    if dequantize and not merge:
        raise ValueError("unload: dequantize=True folds the adapters into full-precision layers, so it needs "
                         "merge=True; got merge=False")
    layers = adapter_layers(model)
    if merge and not dequantize:
        for name, layer in layers:
            if _is_quantized(layer) and not layer.merged:
                check_requantizable(f"unload: module {name!r}", layer.base_layer, False,
                                    "featadapt.merge_adapters(model, requantize=True) before unload",
                                    "unload(model, merge=True, dequantize=True)")
    # The replacements, computed before anything changes.
    replacements = {name: layer.dequantized_layer() for name, layer in layers
                    if merge and dequantize and _is_quantized(layer)}
    if merge:
        _merge_all([(n, layer) for n, layer in layers if n not in replacements and not layer.merged])
    else:
        for _, layer in layers:
            if layer.merged:
                layer.unmerge()
    for name, layer in layers:
        replacements.setdefault(name, layer.base_layer)
    if isinstance(model, AdapterLayer):  # the layer itself: its base takes its place for the caller
        return replacements[""]
    for name, replacement in replacements.items():
        replace_module(model, name, replacement)
    return model
