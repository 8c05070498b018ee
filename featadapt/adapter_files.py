"""Adapter files: the adapter tensors in safetensors plus a JSON config.

A directory holds `adapters.safetensors` (one tensor per adapter parameter,
keyed "<module name>.<parameter>", names relative to the model or to the
`root=` submodule it was saved from) and `adapter_config.json` (method,
hyper-parameters, targets, featadapt version). Each file is written to a
temporary file in the same directory and renamed into place, so a crash never
leaves a half-written file behind.
"""

import json
import os

import torch
from safetensors.torch import load_file, save_file

from .fileio import write_atomically
from .model import ADAPTABLE, adapter_class, adapter_layers, freeze_all_but_adapters, replace_module
from .nn import AdapterLayer
from .nn.bases import is_adaptable
from .version import __version__

WEIGHTS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "featadapt-adapters"
FORMAT_VERSION = 1


def _module_spec(layer):
    return {"method": layer.method, **layer.config()}


def _unwrap(model):
    """The module inside a DistributedDataParallel wrapper, so that names carry
    no "module." prefix and files move freely between wrapped and plain models."""
    if torch.distributed.is_available():
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            return model.module
    return model


def _is_dtensor(tensor):
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def resolve_root(model, root, caller):
    """The module whose names the files use: `model` itself (root=None), the
    submodule `root` names ("encoder"), or `root` given as one of its submodules.

    Saving from a submodule and loading into that submodule of another model
    lets adapters trained inside a wrapper load into the bare model, and back.
    """
    if root is None:
        return model
    if isinstance(root, str):
        try:
            return model.get_submodule(root)
        except AttributeError:
            raise ValueError(f"{caller}: root={root!r} names no submodule of the model") from None
    if not isinstance(root, torch.nn.Module):
        raise TypeError(f"{caller}: root must be None, a submodule name or an nn.Module, got {type(root).__name__}")
    if not any(module is root for module in model.modules()):
        raise ValueError(f"{caller}: root must be the model or one of its submodules, got a {type(root).__name__} "
                         "that is not inside the model")
    return root


def _saved_layers(model, caller, root=None):
    model = _unwrap(model)
    base = resolve_root(model, root, caller)
    layers = adapter_layers(base)
    if not layers:
        raise ValueError(f"{caller}: the model has no adapter layers{' under root' if root is not None else ''}; "
                         "call featadapt.inject first")
    inside = {id(layer) for _, layer in layers}
    outside = [name for name, layer in adapter_layers(model) if id(layer) not in inside]
    if outside:
        # Saving only part of the adapters would make a file that silently reproduces a different model.
        raise ValueError(f"{caller}: root leaves out the adapters {', '.join(outside)}; choose a root that holds them all")
    return layers


def _local_tensors(layers):
    tensors = {}
    for name, layer in layers:
        for pname, param in layer.named_parameters(recurse=False):
            if _is_dtensor(param):
                # Its local shard is only part of the tensor, and gathering the rest is a
                # collective that every rank must join: save_adapters runs on one rank.
                raise ValueError(
                    f"save_adapters: parameter {name}.{pname} is sharded (a DTensor, e.g. under FSDP2 "
                    "fully_shard); call featadapt.save_adapters_distributed(model, path) "
                    "on every rank instead"
                )
            tensors[f"{name}.{pname}"] = param.detach()
    return tensors


def write_adapter_files(layers, tensors, path):
    """Write `tensors` ("<module>.<parameter>" -> full tensor) and the config of
    `layers` ((name, adapter layer) pairs) into the directory `path`."""
    os.makedirs(path, exist_ok=True)
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}
    methods = sorted({layer.method for _, layer in layers})
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "featadapt_version": __version__,
        "method": methods[0] if len(methods) == 1 else "mixed",
        "targets": [name for name, _ in layers],
        "modules": {name: _module_spec(layer) for name, layer in layers},
    }
    write_atomically(os.path.join(path, WEIGHTS_FILE), lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))

    def write_config(tmp):
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")

    write_atomically(os.path.join(path, CONFIG_FILE), write_config)


def save_adapters(model, path, *, root=None):
    """Save every adapter of `model` into the directory `path` (created if missing).

    root (a submodule of `model`, or its name) names modules relative to it:
    `save_adapters(classifier, path, root=classifier.encoder)` writes
    "layer.0.attention.self.query" rather than "encoder.layer.0...", so the
    files load into the bare encoder. Every adapter must lie under root.
    A DistributedDataParallel model is saved as the model it wraps. A model whose
    adapters are sharded (FSDP2) needs featadapt.save_adapters_distributed.
    """
    layers = _saved_layers(model, "save_adapters", root)
    write_adapter_files(layers, _local_tensors(layers), path)


def read_adapter_config(path):
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"load_adapters: no {CONFIG_FILE} in {path!r}")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"load_adapters: {config_path!r} is not a featadapt adapter config of format version "
            f"{FORMAT_VERSION} (format={config.get('format')!r}, version={config.get('format_version')!r})"
        )
    return config


def _layer_for(model_modules, name, spec, backend):
    """The adapter layer that will receive module `name`'s tensors: the model's
    own, or a new one around its nn.Linear or Conv1D. Raises on any mismatch."""
    module = model_modules.get(name)
    if module is None:
        raise ValueError(
            f"load_adapters: the adapter file has module {name!r}, which the model does not have "
            "(names are relative to the module the file was saved from: load into that module with root=)"
        )
    method = spec["method"]
    options = {k: v for k, v in spec.items() if k != "method"}
    if isinstance(module, AdapterLayer):
        if module.method != method or module.config() != options:
            raise ValueError(
                f"load_adapters: module {name!r} has a {module.method} adapter with {module.config()}, "
                f"the file a {method} adapter with {options}"
            )
        return module
    if not is_adaptable(module):
        raise TypeError(f"load_adapters: module {name!r} is a {type(module).__name__}, not {ADAPTABLE}")
    return adapter_class(method, module)(module, **options, backend=backend)


def _like(param, value):
    """`value` laid out as `param`: for a sharded parameter (a DTensor, e.g. under
    FSDP2), this rank's shard of it. Every rank reads the same file, so each cuts
    its own shard out of its copy, with no communication."""
    if not _is_dtensor(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    value = value.to(device=param.to_local().device, dtype=param.dtype)
    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)


def load_adapters(model, path, *, root=None, backend=None):
    """Load adapters saved by `save_adapters` into `model`, in place.

    root (a submodule of `model`, or its name) is the module the saved names
    are relative to: `load_adapters(clf, path, root=clf.bert)` puts adapters
    saved from a bare BERT encoder into a classifier built around one. The
    returned names are relative to root too.

    Modules that are plain nn.Linear (or Conv1D) layers get the saved adapter injected
    (computing with `backend`, automatic by default); modules that already
    carry one must match its method and hyper-parameters. Every check runs
    before anything is changed. A DistributedDataParallel model loads into the
    model it wraps; sharded (FSDP2) adapters load on every rank, each rank keeping
    its shard. Returns the loaded names.
    """
    whole_model = _unwrap(model)
    model = resolve_root(whole_model, root, "load_adapters")
    config = read_adapter_config(path)
    tensors = load_file(os.path.join(path, WEIGHTS_FILE))
    model_modules = dict(model.named_modules())
    plan = [(name, _layer_for(model_modules, name, spec, backend)) for name, spec in config["modules"].items()]

    in_file = set(config["modules"])
    not_in_file = [name for name, _ in adapter_layers(model) if name not in in_file]
    if not_in_file:
        raise ValueError(f"load_adapters: the model has adapters the file does not: {', '.join(not_in_file)}")
    for name, layer in plan:
        expected = {f"{name}.{pname}": param for pname, param in layer.named_parameters(recurse=False)}
        saved = {key for key in tensors if key.rpartition(".")[0] == name}
        if saved != set(expected):
            raise ValueError(
                f"load_adapters: module {name!r}: the file has tensors {sorted(saved)}, the adapter needs {sorted(expected)}"
            )
        for key, param in expected.items():
            if tensors[key].shape != param.shape:
                raise ValueError(
                    f"load_adapters: module {name!r}: {key.rpartition('.')[2]} has shape {tuple(param.shape)} "
                    f"in the model but {tuple(tensors[key].shape)} in the file"
                )

    injected = False
    for name, layer in plan:
        if model_modules[name] is not layer:
            replace_module(model, name, layer)
            injected = True
        was_merged = layer.merged
        if was_merged:
            layer.unmerge()
        with torch.no_grad():
            for pname, param in layer.named_parameters(recurse=False):
                param.copy_(_like(param, tensors[f"{name}.{pname}"]))
        if was_merged:
            layer.merge()
    if injected:
        freeze_all_but_adapters(whole_model)
    return [name for name, _ in plan]
