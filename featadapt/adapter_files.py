"""Adapter files: the adapter tensors in safetensors plus a JSON config.

A folder holds `adapters.safetensors` (one tensor per adapter parameter,
keyed "<module name>.<parameter>", names relative to the model or to the
`root=` submodule it was saved from) and `adapter_config.json` (method,
hyper-parameters, targets, featadapt version).

The weights file carries the config too, in its safetensors metadata, and that
is the config the loaders read: tensors and hyper-parameters always come from
one file, hence from one save. adapter_config.json is its copy for people and
tools. A save writes both files beside their places, then renames the config
copy in and the weights last: that rename commits it. So a save that fails
leaves the adapters that loaded before, and of concurrent saves to one folder
(serialized by a lock on the folder where the system has one) the last wins
whole. Folders of earlier versions, whose weights carry no config, load from
adapter_config.json as before.
"""

import json
import math
import os
import warnings

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .fileio import folder_lock, replace_files
from .model import ADAPTABLE, adapter_class, adapter_layers, freeze_all_but_adapters, replace_module
from .nn import AdapterLayer
from .nn.bases import QUANTIZED, is_adaptable
from .version import __version__

WEIGHTS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
CONFIG_METADATA_KEY = "featadapt_config"  # the weights file's metadata entry that holds the config
FORMAT = "featadapt-adapters"
FORMAT_VERSION = 1


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# The options each method's adapter classes take (the keys of their config()), and
# what a valid value of each is.
METHOD_OPTIONS = {"vefa": ("shift",), "lorfa": ("r", "alpha", "dropout", "rslora"),
                  "lora": ("r", "alpha", "dropout", "rslora")}
OPTION_RULES = {
    "shift": ("true or false", lambda v: isinstance(v, bool)),
    "rslora": ("true or false", lambda v: isinstance(v, bool)),
    "r": ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "alpha": ("a finite number", lambda v: _is_number(v) and math.isfinite(v)),
    "dropout": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
}


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


def _carries_config(weights_path):
    """Whether the weights file holds its config (it was written by this version or a later one)."""
    try:
        with safe_open(weights_path, framework="pt") as f:
            return CONFIG_METADATA_KEY in (f.metadata() or {})
    except (OSError, SafetensorError):
        return False


def _folder(path, caller):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{caller}: path must be a folder path (a str or os.PathLike), got {type(path).__name__}")
    return os.fspath(path)


def write_adapter_files(layers, tensors, path):
    """Write `tensors` ("<module>.<parameter>" -> full tensor) and the config of
    `layers` ((name, adapter layer) pairs) into the directory `path`, as one unit."""
    path = _folder(path, "save_adapters")
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
    text = json.dumps(config, indent=2) + "\n"
    weights_path, config_path = os.path.join(path, WEIGHTS_FILE), os.path.join(path, CONFIG_FILE)

    def write_weights(tmp):
        save_file(tensors, tmp, metadata={"format": FORMAT, CONFIG_METADATA_KEY: text})

    def write_config(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    with folder_lock(path):
        # The weights, config inside, are what loads: renamed in last, they commit the save.
        # Weights of an earlier version need their own config file until they are replaced,
        # so over them the new weights go first.
        order = [(config_path, write_config), (weights_path, write_weights)]
        if os.path.exists(weights_path) and not _carries_config(weights_path):
            order.reverse()
        replace_files(order)


def save_adapters(model, path, *, root=None):
    """Save every adapter of `model` into the directory `path` (created if missing).

    Writes ``adapters.safetensors`` (the adapter tensors only) and
    ``adapter_config.json`` (each module's method and options), as one unit: a
    reader sees the old pair or the new one, never a mix.

    Args:
        model: a model with adapters, or one adapter layer. A
            ``DistributedDataParallel`` model is saved as the model it wraps; a
            model whose adapters are sharded (FSDP2) needs
            `save_adapters_distributed`.
        path: the directory to write.
        root: a submodule of `model`, or its name, that the saved module names are
            relative to: ``save_adapters(classifier, path, root=classifier.encoder)``
            writes ``layer.0.attention.self.query`` rather than
            ``encoder.layer.0...``, so the files load into the bare encoder.

    Raises:
        ValueError: the model has no adapters, or one lies outside `root`.

    Example:
        >>> featadapt.save_adapters(model, "adapters/")
    """
    layers = _saved_layers(model, "save_adapters", root)
    write_adapter_files(layers, _local_tensors(layers), path)


def _brief(value):
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _parse_config(text, where, caller):
    """The config in `text` (from `where`, for messages), every key checked."""
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{caller}: {where} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{caller}: {where} must hold a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{caller}: {where} is not a featadapt adapter config of format version {FORMAT_VERSION} "
            f"(format={_brief(config.get('format'))}, version={_brief(config.get('format_version'))})"
        )

    def refuse(key, expected, got):
        return ValueError(f"{caller}: {where}: {key} must be {expected}, got {_brief(got)}")

    modules = config.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise refuse("'modules'", "an object of module name -> adapter options, not empty", modules)
    for name, spec in modules.items():
        key = f"modules[{name!r}]"
        if not isinstance(spec, dict):
            raise refuse(key, "an object of adapter options", spec)
        method = spec.get("method")
        if method not in METHOD_OPTIONS:
            raise refuse(f"{key}['method']", f"one of {', '.join(map(repr, METHOD_OPTIONS))}", method)
        missing = sorted(set(METHOD_OPTIONS[method]) - set(spec))
        unexpected = sorted(set(spec) - set(METHOD_OPTIONS[method]) - {"method"})
        if missing or unexpected:
            raise ValueError(f"{caller}: {where}: {key} must have the {method} options "
                             f"{sorted(METHOD_OPTIONS[method])}; missing {missing}, unexpected {unexpected}")
        for option in METHOD_OPTIONS[method]:
            expected, valid = OPTION_RULES[option]
            if not valid(spec[option]):
                raise refuse(f"{key}[{option!r}]", expected, spec[option])
    if config.get("targets") != list(modules):
        raise refuse("'targets'", f"the list of the modules' names {list(modules)}", config.get("targets"))
    methods = sorted({spec["method"] for spec in modules.values()})
    method = methods[0] if len(methods) == 1 else "mixed"
    if config.get("method") != method:
        raise refuse("'method'", f"{method!r}, from the modules' methods", config.get("method"))
    return config


def module_tensors(tensors, name):
    """{parameter: tensor} of module `name` among the file's "<module>.<parameter>" tensors."""
    return {key.rpartition(".")[2]: t for key, t in tensors.items() if key.rpartition(".")[0] == name}


def _parameter_names(spec):
    if spec["method"] == "vefa":
        return ["scale", "shift"] if spec["shift"] else ["scale"]
    return ["lora_A", "lora_B"]


def _shape_problem(spec, own):
    """What makes a module's tensors `own` ({parameter: tensor}) disagree with its config `spec`, or None."""
    if spec["method"] == "vefa":
        scale, shift = own["scale"], own.get("shift")
        if scale.dim() != 1:
            return f"scale must be 1-D, (in_features,), got shape {tuple(scale.shape)}"
        if shift is not None and shift.shape != scale.shape:
            return f"shift has shape {tuple(shift.shape)} and scale {tuple(scale.shape)}: they must be the same"
        return None
    a, b, r = own["lora_A"], own["lora_B"], spec["r"]
    # lora_A is (r, in_features), or (r, in_channels, *kernel) for LoRA on a convolution
    if a.dim() < 2 or a.shape[0] != r or (spec["method"] == "lorfa" and a.dim() != 2):
        return f"lora_A has shape {tuple(a.shape)}, but the config's r={r} makes it (r, in_features)"
    if b.dim() != 2 or b.shape[1] != r:
        return f"lora_B has shape {tuple(b.shape)}, but the config's r={r} makes it (rows, r)"
    if spec["method"] == "lorfa" and b.shape[0] != a.shape[1]:
        return (f"lora_B has shape {tuple(b.shape)}, but LoRFA's lora_B is (in_features, r) and lora_A's "
                f"shape {tuple(a.shape)} says in_features={a.shape[1]}")
    return None


def _check_tensors(config, tensors, where, caller):
    """The file's tensors are exactly those its config describes: its modules', floating point, of its shapes."""
    modules = config["modules"]
    for key, tensor in tensors.items():
        module = key.rpartition(".")[0]
        if module not in modules:
            raise ValueError(f"{caller}: {where}: tensor {key!r} belongs to module {module!r}, which the config "
                             f"does not list (it lists {list(modules)})")
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"{caller}: {where}: tensor {key!r} must be floating point, as every adapter "
                             f"parameter is, got {tensor.dtype}")
    for name, spec in modules.items():
        own = module_tensors(tensors, name)
        if sorted(own) != _parameter_names(spec):
            raise ValueError(f"{caller}: {where}: module {name!r}: its config {_brief(spec)} needs the tensors "
                             f"{_parameter_names(spec)}, the file has {sorted(own)}")
        problem = _shape_problem(spec, own)
        if problem is not None:
            raise ValueError(f"{caller}: {where}: module {name!r}: {problem}")


def _read_weights(weights_path, caller):
    """(config text or None, tensors), from one opening of the weights file: both from one save."""
    try:
        with safe_open(weights_path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as error:
        raise ValueError(f"{caller}: {weights_path!r} is not a safetensors file: {error}") from None
    return metadata.get(CONFIG_METADATA_KEY), tensors


def read_adapter_files(path, caller="load_adapters"):
    """(config, tensors) of the adapter folder `path`, each checked and checked
    against the other; errors name the file and the key."""
    path = _folder(path, caller)
    weights_path, config_path = os.path.join(path, WEIGHTS_FILE), os.path.join(path, CONFIG_FILE)
    with folder_lock(path, shared=True):  # a concurrent save's two renames happen before or after
        has_config_file = os.path.isfile(config_path)
        if not os.path.isfile(weights_path):
            if has_config_file:
                raise FileNotFoundError(f"{caller}: no {WEIGHTS_FILE} in {path!r} (it has {CONFIG_FILE} alone)")
            raise FileNotFoundError(f"{caller}: no {CONFIG_FILE} nor {WEIGHTS_FILE} in {path!r}: "
                                    "not a folder written by featadapt.save_adapters")
        text, tensors = _read_weights(weights_path, caller)
        copy = None
        if has_config_file:
            with open(config_path, "rb") as f:
                copy = f.read()
    if text is None:  # an earlier version's folder: adapter_config.json alone holds the config
        if copy is None:
            raise FileNotFoundError(f"{caller}: no {CONFIG_FILE} in {path!r}, and {WEIGHTS_FILE} carries no config")
        config = _parse_config(copy, repr(config_path), caller)
    else:
        config = _parse_config(text, f"{weights_path!r} (its {CONFIG_METADATA_KEY!r} metadata)", caller)
        if copy is not None and not _same_config(copy, config):
            warnings.warn(
                f"{caller}: {config_path!r} does not match the config inside {WEIGHTS_FILE} (left by a save that "
                f"failed, or edited by hand); loading the one inside {WEIGHTS_FILE}, which matches its tensors",
                stacklevel=3,
            )
    _check_tensors(config, tensors, repr(weights_path), caller)
    return config, tensors


def _same_config(text, config):
    try:
        return json.loads(text) == config
    except (ValueError, RecursionError):
        return False


def new_adapter_layer(module, spec, backend, caller, where, name):
    """A new adapter layer of `spec` ({"method": ..., options}) around `module`, the
    module left as it was: the adapter classes freeze their base, which the loaders
    do, for the whole model, only once every check has passed."""
    cls = adapter_class(spec["method"], module)
    options = {k: v for k, v in spec.items() if k != "method"}
    flags = [(param, param.requires_grad) for param in module.parameters()]
    try:
        layer = cls(module, **options, backend=backend)
    except ValueError as error:
        raise ValueError(f"{caller}: {where}: module {name!r}: {error}") from error
    except TypeError as error:
        raise TypeError(f"{caller}: {where}: module {name!r}: {error}") from error
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
    layer.training = module.training  # an adapter in an eval-mode model runs no dropout
    return layer


def bare_layer_error(caller, where, module, spec, alternative=""):
    """The error for an adapter saved from a bare adapter layer (module name "") that would
    have to replace the very module the caller passed, which no in-place change can do."""
    cls = adapter_class(spec["method"], module)
    options = ", ".join(f"{k}={v!r}" for k, v in spec.items() if k != "method")
    kind = type(module).__name__
    return ValueError(
        f"{caller}: {where} holds an adapter for the module passed itself (it was saved from a "
        f"bare adapter layer); {caller} changes a model in place and cannot turn the {kind} passed into an "
        f"adapter layer: build one around it, e.g. layer = featadapt.nn.{cls.__name__}({kind.lower()}, {options}), "
        f"and pass that{alternative}"
    )


def _layer_for(model_modules, name, spec, backend, where, replaceable):
    """The adapter layer that will receive module `name`'s tensors: the model's
    own, or a new one around its nn.Linear or Conv1D. Raises on any mismatch."""
    module = model_modules.get(name)
    if module is None:
        raise ValueError(
            f"load_adapters: {where} has module {name!r}, which the model does not have "
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
        if module.merged and getattr(module, "kind", None) == QUANTIZED:
            # Loading unmerges and merges again, which would re-quantize the weight: never silently.
            raise ValueError(f"load_adapters: module {name!r} is merged into its quantized base weight; call "
                             "featadapt.unmerge_adapters(model) before loading, and merge again if you choose to")
        return module
    if not is_adaptable(module):
        raise TypeError(f"load_adapters: module {name!r} is a {type(module).__name__}, not {ADAPTABLE}")
    if not replaceable:
        raise bare_layer_error("load_adapters", where, module, spec,
                               "; or load into a model that holds it, with root= naming it")
    return new_adapter_layer(module, spec, backend, "load_adapters", where, name)


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

    Modules that are plain ``nn.Linear`` (or ``Conv1D``) layers get the saved
    adapter injected; modules that already carry one must match its method and
    options. Every check runs before anything changes. A
    ``DistributedDataParallel`` model loads into the model it wraps; sharded
    (FSDP2) adapters load on every rank, each rank keeping its shard.

    Args:
        model: a plain model, or one with matching adapters; or one layer.
        path: a directory written by `save_adapters`.
        root: a submodule of `model`, or its name, that the saved names are
            relative to: ``load_adapters(clf, path, root=clf.bert)`` puts adapters
            saved from a bare BERT encoder into a classifier built around one.
        backend: the backend the injected layers compute with; None: automatic.

    Returns:
        list[str]: the names of the modules loaded, relative to `root`.

    Raises:
        FileNotFoundError: `path` holds no adapter files.
        ValueError: a module the file names is missing, or its adapter's method,
            options or shapes differ (the message names the module and both shapes).
        TypeError: a module the file names cannot take an adapter.

    Example:
        >>> names = featadapt.load_adapters(model, "adapters/")
    """
    whole_model = _unwrap(model)
    model = resolve_root(whole_model, root, "load_adapters")
    config, tensors = read_adapter_files(path, "load_adapters")
    where = repr(_folder(path, "load_adapters"))
    prefix = next(name for name, module in whole_model.named_modules() if module is model)

    def in_whole_model(name):
        return ".".join(part for part in (prefix, name) if part)

    model_modules = dict(model.named_modules())
    plan = [(name, _layer_for(model_modules, name, spec, backend, where, replaceable=in_whole_model(name) != ""))
            for name, spec in config["modules"].items()]

    in_file = set(config["modules"])
    not_in_file = [name for name, _ in adapter_layers(model) if name not in in_file]
    if not_in_file:
        raise ValueError(f"load_adapters: the model has adapters the file does not: {', '.join(not_in_file)}")
    for name, layer in plan:
        expected = dict(layer.named_parameters(recurse=False))
        saved = module_tensors(tensors, name)
        if set(saved) != set(expected):
            raise ValueError(
                f"load_adapters: {where}: module {name!r}: the file has tensors {sorted(saved)}, "
                f"the adapter needs {sorted(expected)}"
            )
        for pname, param in expected.items():
            if saved[pname].shape != param.shape:
                raise ValueError(
                    f"load_adapters: {where}: module {name!r}: {pname} has shape {tuple(param.shape)} "
                    f"in the model but {tuple(saved[pname].shape)} in the file"
                )

    injected = False
    for name, layer in plan:
        if model_modules[name] is not layer:
            replace_module(whole_model, in_whole_model(name), layer)
            injected = True
        was_merged = layer.merged
        if was_merged:
            layer.unmerge()
        saved = module_tensors(tensors, name)
        with torch.no_grad():
            for pname, param in layer.named_parameters(recurse=False):
                param.copy_(_like(param, saved[pname]))
        if was_merged:
            layer.merge()
    if injected:
        freeze_all_but_adapters(whole_model)
    return [name for name, _ in plan]
