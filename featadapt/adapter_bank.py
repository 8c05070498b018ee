"""Several named adapters in one model, chosen per sequence (many adapters in one batch).

Each adapter layer (VeFALinear, LoRFALinear, LoRALinear) can hold, besides
its own trainable adapter, a bank of named frozen adapters of its method,
stacked for the indexed ops (``adapter_index=``):

    featadapt.load_named_adapters(model, {"support": "adapters/support", "legal": "adapters/legal"})
    with featadapt.select_adapters(model, ["legal", None, "support"]):  # one name per sequence
        logits = model(input_ids)                                         # or model.generate(...)

Adapter files are those of `save_adapters`; a model without adapter layers
gets them injected (its own adapter starts as the identity). Named adapters of
one layer may differ in their options (VeFA with and without shift; LoRA or
LoRFA ranks, alpha, rslora). Inside `select_adapters`, sequence i of every
adapted layer uses its name's adapter; None or "__base__" and names a layer
was not given run that layer's base weight, as PEFT does. Every adapted layer
makes one indexed op call per forward. The banks are buffers outside the
state dict: `save_adapters` still saves the layers' own adapters.
"""

import os
from contextlib import contextmanager

import torch
from torch import nn

from .adapter_files import bare_layer_error, module_tensors, new_adapter_layer, read_adapter_files
from .model import adapter_layers, freeze_all_but_adapters, replace_module
from .nn import AdapterLinear
from .nn.layers import BASE_TYPES, SELECTED_ADAPTERS, is_supported_base
from .ops import lora_linear, lorfa_linear, vefa_linear
from .ops.stacking import stack_low_rank, stack_vefa

BASE_NAMES = (None, "__base__")  # a sequence without an adapter


def _scaling(spec):
    """γ of a low-rank adapter spec (r, alpha, rslora), as the layers compute it."""
    r, alpha = spec["r"], spec["alpha"]
    return alpha / r ** 0.5 if spec.get("rslora") else alpha / r


class AdapterBank(nn.Module):
    """The named adapters of one adapter layer, stacked along a leading adapter dimension.

    `entries` keeps each adapter's tensors ({"scale", "shift"} or {"lora_A",
    "lora_B", "scaling"}); the stacked buffers are rebuilt when one is added.
    """

    def __init__(self, method):
        super().__init__()
        self.method = method
        self.names = []
        self.entries = []

    def slot(self, name):
        """The adapter index of `name` in this bank; -1 if it has none of that name."""
        return self.names.index(name) if name in self.names else -1

    def add(self, name, entry):
        self.add_many([(name, entry)])

    def add_many(self, named_entries):
        """Add (name, entry) pairs, restacking once; a name already here is replaced."""
        for name, entry in named_entries:
            if name in self.names:
                self.entries[self.names.index(name)] = entry
            else:
                self.names.append(name)
                self.entries.append(entry)
        self._restack()

    def remove(self, name):
        i = self.names.index(name)
        del self.names[i], self.entries[i]
        self._restack()

    def _restack(self):
        if not self.entries:
            stacked = {}
        elif self.method == "vefa":
            scale, shift = stack_vefa([e["scale"] for e in self.entries], [e["shift"] for e in self.entries])
            stacked = {"scale": scale, "shift": shift}
        else:
            lora_A, lora_B = stack_low_rank([e["lora_A"] for e in self.entries], [e["lora_B"] for e in self.entries])
            scaling = torch.tensor([e["scaling"] for e in self.entries], device=lora_A.device)
            stacked = {"lora_A": lora_A, "lora_B": lora_B, "scaling": scaling}
        for key in ("scale", "shift", "lora_A", "lora_B", "scaling"):
            self.register_buffer(key, stacked.get(key), persistent=False)

    def forward(self, layer, x, per_sequence_ids):
        """The layer's output with sequence i (x's first dimension) on adapter per_sequence_ids[i]."""
        if layer.merged:
            raise ValueError(
                f"select_adapters: a {layer.method} layer is merged: its weight already holds its own adapter; "
                "call featadapt.unmerge_adapters(model) first"
            )
        if x.dim() < 2 or x.shape[0] != per_sequence_ids.shape[0]:
            raise ValueError(
                f"select_adapters: {per_sequence_ids.shape[0]} adapter names for an input of shape "
                f"{tuple(x.shape)}: give one name per sequence (x's first dimension)"
            )
        if not self.names:  # this layer was given no named adapter: every sequence runs the base weight
            return layer.base_layer(x)
        index = per_sequence_ids.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
        w0, bias = layer._w0(), layer.bias
        if self.method == "vefa":
            return vefa_linear(x, w0, self.scale, bias, self.shift, adapter_index=index, backend=layer.backend)
        op = lorfa_linear if self.method == "lorfa" else lora_linear
        return op(x, w0, self.lora_A, self.lora_B, bias, scaling=self.scaling, adapter_index=index,
                  backend=layer.backend)


def _bank(layer):
    if layer.adapter_bank is None:
        layer.adapter_bank = AdapterBank(layer.method)
    return layer.adapter_bank


def _entry(layer, tensors, spec):
    """A bank entry from one module's tensors ({parameter: tensor}) and its spec, on the
    layer's device in the dtype of the layer's own adapter."""
    own = next(layer.parameters(recurse=False))
    like = {"device": own.device, "dtype": own.dtype}
    if layer.method == "vefa":
        shift = tensors.get("shift")
        return {"scale": tensors["scale"].to(**like), "shift": None if shift is None else shift.to(**like)}
    return {"lora_A": tensors["lora_A"].to(**like), "lora_B": tensors["lora_B"].to(**like), "scaling": _scaling(spec)}


def _check_name(name):
    if not isinstance(name, str) or not name or name in BASE_NAMES:
        raise ValueError(f"adapter name must be a non-empty string other than '__base__', got {name!r}")


def _check_hold_named_adapters(layers, caller):
    """Every (name, adapter layer) pair is one that can hold named adapters."""
    for layer_name, layer in layers:
        if not isinstance(layer, AdapterLinear):
            raise TypeError(f"{caller}: module {layer_name!r} is a {type(layer).__name__}, which holds no "
                            f"named adapters (only adapters on {BASE_TYPES} do)")


def _entry_shapes(layer, spec):
    """{parameter: shape} of a named adapter of `spec` on `layer` (whose own options may differ)."""
    k, n = layer.in_features, layer.out_features
    if spec["method"] == "vefa":
        return {"scale": (k,), "shift": (k,)} if spec["shift"] else {"scale": (k,)}
    return {"lora_A": (spec["r"], k), "lora_B": (k if spec["method"] == "lorfa" else n, spec["r"])}


def _plan_named_adapters(model, paths, backend):
    """Check every {name: path} against the model, changing nothing. Returns the
    adapter layers to inject ({module name: layer}), the bank entries to add
    ([(layer, name, entry)]) and the layers each name covers ({name: [module names]})."""
    modules = dict(model.named_modules())
    new_layers, entries, covered = {}, [], {}
    for name, path in paths.items():
        _check_name(name)
        if path is None:  # a snapshot of the model's own adapters (and of those planned so far)
            layers = {**dict(adapter_layers(model)), **new_layers}
            if not layers:
                raise ValueError("add_named_adapter: the model has no adapter layers; call featadapt.inject first")
            _check_hold_named_adapters(layers.items(), "add_named_adapter")
            for layer in layers.values():
                tensors = {p: v.detach().clone() for p, v in layer.named_parameters(recurse=False)}
                entries.append((layer, name, _entry(layer, tensors, layer.config())))
            covered[name] = list(layers)
            continue
        config, tensors = read_adapter_files(path, "add_named_adapter")
        where = repr(os.fspath(path))
        for module_name, spec in config["modules"].items():
            module = new_layers.get(module_name, modules.get(module_name))
            method = spec["method"]
            if module is None:
                raise ValueError(
                    f"add_named_adapter: {where} has module {module_name!r}, which the model does not have")
            if isinstance(module, AdapterLinear):
                if module.method != method:
                    raise ValueError(f"add_named_adapter: module {module_name!r} has a {module.method} adapter, "
                                     f"{where} a {method} adapter")
                layer = module
            elif not is_supported_base(module):
                raise TypeError(
                    f"add_named_adapter: module {module_name!r} is a {type(module).__name__}, not {BASE_TYPES}")
            elif module_name == "":
                raise bare_layer_error("add_named_adapter", where, module, spec)
            else:
                layer = new_layers[module_name] = new_adapter_layer(
                    module, spec, backend, "add_named_adapter", where, module_name)
            own = module_tensors(tensors, module_name)
            for pname, shape in _entry_shapes(layer, spec).items():
                if tuple(own[pname].shape) != shape:
                    raise ValueError(
                        f"add_named_adapter: {where}: module {module_name!r}: {pname} has shape {shape} "
                        f"in the model but {tuple(own[pname].shape)} in the file"
                    )
            entries.append((layer, name, _entry(layer, own, spec)))
        covered[name] = list(config["modules"])
    return new_layers, entries, covered


def _add_named_adapters(model, paths, backend):
    new_layers, entries, covered = _plan_named_adapters(model, paths, backend)
    for module_name, layer in new_layers.items():
        replace_module(model, module_name, layer)
    for layer in dict.fromkeys(layer for layer, _, _ in entries):
        _bank(layer).add_many([(name, entry) for owner, name, entry in entries if owner is layer])
    if new_layers:
        freeze_all_but_adapters(model)
    return covered


def add_named_adapter(model, name, path=None, *, backend=None):
    """Add the adapter `name` to every adapter layer it covers.

    A name added again replaces the earlier one. Every check runs first: when it
    refuses, the model is left unchanged. The adapters are frozen buffers outside
    the state dict; `select_adapters` chooses among them per sequence.

    Args:
        model: a plain model, or one with adapters.
        name: any string but ``"__base__"``.
        path: a directory written by `save_adapters`; modules of the file that are
            plain ``nn.Linear`` (or ``Conv1D``) layers get an adapter layer
            injected first. None: a frozen copy of the model's own adapters as
            they are now.
        backend: the backend injected layers compute with; None: automatic.

    Returns:
        list[str]: the names of the layers that hold it.

    Raises:
        ValueError: a name that is empty, not a string or ``"__base__"``, a file
            that does not fit the model, or no adapters to copy.
    """
    return _add_named_adapters(model, {name: path}, backend)[name]


def load_named_adapters(model, paths, *, backend=None):
    """Add several named adapters at once, all or none.

    `add_named_adapter` for each item; every file is checked before any adapter
    is added.

    Args:
        model: a plain model, or one with adapters.
        paths: ``{name: directory written by save_adapters}``.
        backend: the backend injected layers compute with; None: automatic.

    Returns:
        list[str]: the names added.

    Example:
        >>> featadapt.load_named_adapters(model, {"support": "support/", "legal": "legal/"})
        ['support', 'legal']
    """
    _add_named_adapters(model, dict(paths), backend)
    return list(paths)


def named_adapters(model):
    """The names of the named adapters in `model`, in the order they were added.

    Returns:
        list[str]
    """
    names = {}
    for _, layer in adapter_layers(model):
        if layer.adapter_bank is not None:
            names.update(dict.fromkeys(layer.adapter_bank.names))
    return list(names)


def remove_named_adapter(model, name):
    """Remove the adapter `name` from every layer that holds it.

    Raises:
        ValueError: no layer holds `name`.
    """
    found = False
    for _, layer in adapter_layers(model):
        bank = layer.adapter_bank
        if bank is not None and name in bank.names:
            bank.remove(name)
            found = True
    if not found:
        raise ValueError(f"remove_named_adapter: no adapter named {name!r}; the model has {named_adapters(model)}")


@contextmanager
def select_adapters(model, names):
    """Run sequence i of every batch on the named adapter ``names[i]``, for the duration of the context.

    A layer that was not given a name runs its base weight for that sequence.
    The selection holds for the calling thread (or asyncio task) only: several
    threads may serve requests on one model at once, each in its own
    ``select_adapters``; threads started inside the context do not inherit it.

    Args:
        model: a model with named adapters (`load_named_adapters`).
        names: one name per sequence (the input's first dimension); None or
            ``"__base__"``: the base model.

    Raises:
        ValueError: a name unknown to the whole model, or a batch whose first
            dimension differs from ``len(names)``.

    Example:
        >>> with featadapt.select_adapters(model, ["legal", None, "support"]):
        ...     out = model(batch)
    """
    names = list(names)
    layers = adapter_layers(model)
    _check_hold_named_adapters(layers, "select_adapters")
    known = set(named_adapters(model))
    unknown = sorted({n for n in names if n not in BASE_NAMES} - known)
    if unknown:
        raise ValueError(f"select_adapters: no adapter named {', '.join(map(repr, unknown))}; "
                         f"the model has {sorted(known)}")
    # The per-sequence ids go into this context only, never onto the shared layers;
    # an enclosing selection (say, of another model) stays in force.
    selection = dict(SELECTED_ADAPTERS.get() or {})
    for _, layer in layers:
        bank = layer.adapter_bank if layer.adapter_bank is not None else AdapterBank(layer.method)
        ids = [-1 if n in BASE_NAMES else bank.slot(n) for n in names]
        selection[id(layer)] = (bank, torch.tensor(ids, device=layer.weight.device))
    token = SELECTED_ADAPTERS.set(selection)
    try:
        yield
    finally:
        SELECTED_ADAPTERS.reset(token)
