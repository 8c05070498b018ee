"""Adapter folders as one unit: what a failed or concurrent save leaves, file
permissions, bare adapter layers, refused loads that change nothing, and the
checks of a folder's config against its tensors."""

import builtins
import json
import os
import threading
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import featadapt
from featadapt import adapter_files
from featadapt.model import adapter_layers

WEIGHTS, CONFIG = "adapters.safetensors", "adapter_config.json"


def mlp(width=11):
    torch.manual_seed(7)  # the same "pretrained" weights every time
    return nn.Sequential(nn.Linear(width, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))


def adapted(method="lora", seed=1, **options):
    model = mlp()
    featadapt.inject(model, method, ["0", "2"], **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for param in layer.parameters(recurse=False):
                param.add_(0.3 * torch.randn(param.shape, generator=g))
    return model


X = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))


def adapters_of(model):
    """Each adapter layer's name, method, hyper-parameters and tensors."""
    return [(name, layer.method, layer.config(), [p.detach() for p in layer.parameters(recurse=False)])
            for name, layer in adapter_layers(model)]


def which(path, models):
    """The name of the model whose adapters (tensors and hyper-parameters alike) the folder loads as."""
    fresh = mlp()
    featadapt.load_adapters(fresh, path)
    loaded = adapters_of(fresh)

    def same(model):
        theirs = adapters_of(model)
        return [a[:3] for a in loaded] == [a[:3] for a in theirs] and all(
            torch.equal(p, q) for a, b in zip(loaded, theirs) for p, q in zip(a[3], b[3]))

    matches = [name for name, model in models.items() if same(model)]
    assert matches, "the folder loads as none of the saved models: a mismatched pair"
    return matches[0]


def model_state(model):
    """Everything a refused load must leave as it was: the module tree (by identity), every
    parameter and buffer bit for bit with its requires_grad, and the named adapters of each layer."""
    return {
        "modules": [(name, id(m), type(m)) for name, m in model.named_modules()],
        "parameters": {n: (p.detach().clone(), p.dtype, p.requires_grad) for n, p in model.named_parameters()},
        "buffers": {n: (b.detach().clone(), b.dtype) for n, b in model.named_buffers()},
        "named": {n: list(getattr(layer, "adapter_bank", None).names)
                  for n, layer in adapter_layers(model) if getattr(layer, "adapter_bank", None) is not None},
    }


def assert_unchanged(model, before):
    after = model_state(model)
    assert after["modules"] == before["modules"]
    assert after["named"] == before["named"]
    for kind in ("parameters", "buffers"):
        assert after[kind].keys() == before[kind].keys()
        for name, (tensor, *rest) in before[kind].items():
            assert after[kind][name][1:] == tuple(rest), f"{kind} {name}: dtype or requires_grad changed"
            assert torch.equal(after[kind][name][0], tensor), f"{kind} {name} changed"
    model.state_dict()  # no cycle in the module tree


# -- one unit: failed saves ---------------------------------------------------------

# (module, function name) of every step a save goes through: creating, writing, syncing and renaming files.
STEPS = [(os, "open"), (os, "fsync"), (os, "replace"), (os, "chmod"), (adapter_files, "save_file"), (builtins, "open")]


def count_calls(monkeypatch, save):
    counts = {}
    for module, fname in STEPS:
        real = getattr(module, fname)

        def spy(*args, _real=real, _key=(module.__name__, fname), **kwargs):
            counts[_key] = counts.get(_key, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, fname, spy)
    try:
        save()
    finally:
        monkeypatch.undo()
    return counts


def failing_at(monkeypatch, module, fname, n):
    """Make the n-th call of module.fname (during the save) raise, after a partial write for writes."""
    real, calls = getattr(module, fname), []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            if fname == "save_file":
                with builtins.open(args[1], "wb") as f:
                    f.write(b"partial")
            raise OSError(f"injected failure in {fname} call {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, fname, broken)


def legacy_folder(path):
    """Turn a folder into one as earlier versions wrote it: the weights without the config inside."""
    tensors = load_file(os.path.join(path, WEIGHTS))
    save_file(tensors, os.path.join(path, WEIGHTS), metadata={"format": adapter_files.FORMAT})


@pytest.mark.parametrize("legacy", [False, True], ids=["current", "legacy"])
def test_a_save_that_fails_at_any_step_leaves_a_whole_pair(tmp_path, monkeypatch, legacy):
    old, new = adapted(seed=1, r=3, alpha=5), adapted(seed=2, r=3, alpha=7)  # same shapes, other alpha
    models = {"old": old, "new": new}
    path = str(tmp_path / "adapters")
    featadapt.save_adapters(old, path)
    if legacy:
        legacy_folder(path)
    snapshot = {f: open(os.path.join(path, f), "rb").read() for f in os.listdir(path)}
    counts = count_calls(monkeypatch, lambda: featadapt.save_adapters(new, str(tmp_path / "probe")))
    tried = 0
    for (module, fname) in STEPS:
        for n in range(1, counts.get((module.__name__, fname), 0) + 1):
            for f, data in snapshot.items():  # back to the old pair
                with open(os.path.join(path, f), "wb") as out:
                    out.write(data)
            failing_at(monkeypatch, module, fname, n)
            try:
                featadapt.save_adapters(new, path)
                raised = False
            except OSError:
                raised = True
            finally:
                monkeypatch.undo()
            tried += 1
            with warnings.catch_warnings():  # a save that failed at its last rename leaves a stale config copy
                warnings.filterwarnings("ignore", "load_adapters: .*adapter_config.json' does not match")
                loaded = which(path, models)
            if raised:
                # A save that raised changed nothing, except over an earlier version's folder once its
                # new weights (which carry their config) are in: then the new pair, whole.
                assert loaded == "old" or legacy, f"{module.__name__}.{fname} call {n}"
                assert sorted(os.listdir(path)) == [CONFIG, WEIGHTS], "a temporary file was left behind"
            else:
                assert loaded == "new", f"{module.__name__}.{fname} call {n}"
    assert tried >= 6


def test_the_config_file_is_a_copy_of_the_config_inside_the_weights(tmp_path):
    featadapt.save_adapters(adapted(r=3, alpha=5), tmp_path)
    with open(tmp_path / CONFIG) as f:
        config = json.load(f)
    from safetensors import safe_open

    with safe_open(str(tmp_path / WEIGHTS), framework="pt") as f:
        inside = json.loads(f.metadata()[adapter_files.CONFIG_METADATA_KEY])
    assert inside == config and config["modules"]["0"]["alpha"] == 5


def test_the_config_inside_the_weights_wins_over_a_stale_config_file(tmp_path):
    """After a save that failed between its two renames, adapter_config.json may describe the
    save that failed: the loader reads the config the weights carry, and says so."""
    old = adapted(r=3, alpha=5)
    featadapt.save_adapters(old, tmp_path)
    stale = json.loads((tmp_path / CONFIG).read_text())
    stale["modules"]["0"]["alpha"] = 7
    (tmp_path / CONFIG).write_text(json.dumps(stale))
    with pytest.warns(UserWarning, match=f"{CONFIG}.*does not match.*{WEIGHTS}"):
        assert which(str(tmp_path), {"old": old}) == "old"


def test_concurrent_saves_and_loads_see_whole_pairs_and_the_last_save_wins(tmp_path):
    path = str(tmp_path / "shared")
    models = {f"m{i}": adapted(seed=i, r=3, alpha=2 + i) for i in range(4)}
    featadapt.save_adapters(models["m0"], path)
    errors, done = [], threading.Event()

    def writer(model):
        try:
            for _ in range(25):
                featadapt.save_adapters(model, path)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def reader():
        try:
            while not done.is_set():
                which(path, models)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    writers = [threading.Thread(target=writer, args=(m,)) for m in models.values()]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    for t in readers:
        t.join()
    assert not errors, errors[0]
    last = which(path, models)
    with open(os.path.join(path, CONFIG)) as f:
        assert json.load(f)["modules"]["0"]["alpha"] == models[last][0].alpha  # both files from one save
    assert sorted(os.listdir(path)) == [CONFIG, WEIGHTS]


# -- permissions --------------------------------------------------------------------


def test_saved_files_and_folders_get_ordinary_permissions(tmp_path):
    if os.name != "posix":
        pytest.skip("POSIX permission bits")
    previous = os.umask(0o027)
    try:
        path = tmp_path / "new" / "adapters"
        featadapt.save_adapters(adapted(), str(path))
        featadapt.save_adapters(adapted(seed=2), str(path))  # replacing keeps them ordinary too
    finally:
        os.umask(previous)
    for f in (WEIGHTS, CONFIG):
        assert oct(os.stat(path / f).st_mode & 0o777) == oct(0o666 & ~0o027), f
    for d in (path, path.parent):
        assert oct(os.stat(d).st_mode & 0o777) == oct(0o777 & ~0o027), d


# -- bare adapter layers -------------------------------------------------------------


def bare_layer():
    torch.manual_seed(3)
    layer = featadapt.LoRALinear(nn.Linear(11, 5), r=2, alpha=3)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_a_bare_adapter_layer_round_trips_into_a_bare_adapter_layer(tmp_path):
    layer = bare_layer()
    featadapt.save_adapters(layer, tmp_path)
    torch.manual_seed(3)
    target = featadapt.LoRALinear(nn.Linear(11, 5), r=2, alpha=3)
    assert featadapt.load_adapters(target, tmp_path) == [""]
    assert torch.equal(target(X), layer(X))


def test_a_bare_adapter_layer_into_a_bare_linear_is_refused_saying_what_to_do(tmp_path):
    layer = bare_layer()
    featadapt.save_adapters(layer, tmp_path)
    torch.manual_seed(3)
    linear = nn.Linear(11, 5)
    before = model_state(linear)
    with pytest.raises(ValueError, match=r"in place.*featadapt\.nn\.LoRALinear\(linear, r=2, alpha=3, "
                                         r"dropout=0\.0, rslora=False\).*root="):
        featadapt.load_adapters(linear, tmp_path)
    assert_unchanged(linear, before)
    # what the message says to do
    wrapped = featadapt.nn.LoRALinear(linear, r=2, alpha=3, dropout=0.0, rslora=False)
    featadapt.load_adapters(wrapped, tmp_path)
    assert torch.equal(wrapped(X), layer(X))


def test_a_bare_adapter_layer_loads_into_a_submodule_named_by_root(tmp_path):
    layer = bare_layer()
    featadapt.save_adapters(layer, tmp_path)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(11, 5), nn.ReLU())
    assert featadapt.load_adapters(model, tmp_path, root="0") == [""]
    assert isinstance(model[0], featadapt.LoRALinear)
    assert torch.equal(model[0](X), layer(X))
    model.state_dict()
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(11, 5), nn.ReLU())
    featadapt.load_adapters(model, tmp_path, root=model[0])
    assert torch.equal(model[0](X), layer(X))


# -- refused loads change nothing ------------------------------------------------------


def rewrite(path, tensors=None, config=None):
    """Replace a folder's tensors and/or config (as the dict, or raw text), in the current layout."""
    path = str(path)
    old_tensors = load_file(os.path.join(path, WEIGHTS))
    tensors = old_tensors if tensors is None else tensors
    text = (open(os.path.join(path, CONFIG)).read() if config is None
            else config if isinstance(config, str) else json.dumps(config))
    metadata = {"format": adapter_files.FORMAT, getattr(adapter_files, "CONFIG_METADATA_KEY", "config"): text}
    save_file(tensors, os.path.join(path, WEIGHTS), metadata=metadata)
    with open(os.path.join(path, CONFIG), "w") as f:
        f.write(text)


def saved_config(path):
    with open(os.path.join(str(path), CONFIG)) as f:
        return json.load(f)


def lora_folder(tmp_path):
    path = tmp_path / "lora"
    featadapt.save_adapters(adapted(r=3, alpha=5), str(path))
    return path


def _int_tensors(path):
    tensors = load_file(os.path.join(str(path), WEIGHTS))
    tensors["0.lora_A"] = (tensors["0.lora_A"] * 100).to(torch.int32)
    rewrite(path, tensors=tensors)


def _extra_tensor(path):
    tensors = load_file(os.path.join(str(path), WEIGHTS))
    tensors["4.lora_A"] = torch.zeros(3, 16)
    rewrite(path, tensors=tensors)


def _rank_in_config(path):
    config = saved_config(path)
    config["modules"]["2"]["r"] = 4
    rewrite(path, config=config)


def _bad_json(path):
    rewrite(path, config='{"format": ')


REFUSALS = {
    # name: (the model to load into, how to spoil the folder or None, the error it gives)
    "shapes": (lambda: mlp(width=12), None, r"module '0': lora_A has shape \(3, 12\) in the model"),
    "rank above in_features": (lambda: mlp(width=2), None, r"module '0'.*r must be an integer in \[1, in_features=2\]"),
    "module missing": (lambda: nn.Sequential(nn.Linear(11, 16), nn.GELU()), None, "module '2'.*does not have"),
    "options": (lambda: adapted(r=4), None, "module '0' has a lora adapter with"),
    "integer tensors": (mlp, _int_tensors, r"'0\.lora_A'.*floating point.*int32"),
    "unlisted module": (mlp, _extra_tensor, r"'4\.lora_A'.*module '4'.*does not list"),
    "rank vs tensor": (mlp, _rank_in_config, r"module '2'.*lora_A.*r=4"),
    "malformed config": (mlp, _bad_json, "not valid JSON"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_refused_load_changes_nothing(case, tmp_path):
    build, spoil, message = REFUSALS[case]
    path = lora_folder(tmp_path)
    if spoil is not None:
        spoil(path)
    model = build()
    before = model_state(model)
    with pytest.raises((ValueError, TypeError), match=message):
        featadapt.load_adapters(model, str(path))
    assert_unchanged(model, before)


def test_loading_into_a_layer_merged_into_its_quantized_weight_is_refused(tmp_path):
    from quantized_bases import bnb_4bit  # skips without bitsandbytes

    torch.manual_seed(0)
    model = nn.Sequential(bnb_4bit(nn.Linear(20, 12)), nn.ReLU(), nn.Linear(12, 3))
    featadapt.inject(model, "lora", ["0"], r=2)
    with torch.no_grad():
        model[0].lora_B.normal_()
    featadapt.save_adapters(model, str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the re-quantization's error report
        model[0].merge(requantize=True)
    before = model_state(model)
    # loading unmerges and merges again, which would re-quantize: refused before anything changes
    with pytest.raises(ValueError, match="module '0' is merged into its quantized base weight.*unmerge_adapters"):
        featadapt.load_adapters(model, str(tmp_path))
    assert_unchanged(model, before)


def test_a_refused_load_leaves_frozen_and_trainable_flags_as_they_were(tmp_path):
    path = lora_folder(tmp_path)
    model = mlp(width=12)
    model[2].weight.requires_grad_(False)  # a mix the caller chose
    before = model_state(model)
    with pytest.raises(ValueError):
        featadapt.load_adapters(model, str(path))
    assert_unchanged(model, before)


# -- malformed configs and config integrity -------------------------------------------


def _config(**changes):
    def spoil(config):
        config.update(changes)
        return config
    return spoil


def _module(name, **changes):
    def spoil(config):
        config["modules"][name].update(changes)
        return config
    return spoil


def _drop(name, option):
    def spoil(config):
        del config["modules"][name][option]
        return config
    return spoil


MALFORMED = {
    # name: (the config text, or a function of the saved config dict; what the message must name)
    "not json": ('{"format": "featadapt-adapters", ', "not valid JSON"),
    "not utf-8": ("\udcff", "not valid JSON"),
    "deeply nested": ("[" * 100000 + "]" * 100000, "not valid JSON"),
    "a list": ("[1, 2]", "must hold a JSON object, got list"),
    "modules a list": (_config(modules=["0", "2"]), "'modules'"),
    "modules empty": (_config(modules={}), "'modules'"),
    "spec a string": (lambda c: _config(modules={"0": "lora", "2": c["modules"]["2"]})(c), r"modules\['0'\]"),
    "unknown method": (_module("0", method="dora"), r"modules\['0'\]\['method'\].*'dora'"),
    "rank a string": (_module("0", r="3"), r"modules\['0'\]\['r'\].*'3'"),
    "rank zero": (_module("2", r=0), r"modules\['2'\]\['r'\].*0"),
    "alpha nan": (_module("0", alpha=float("nan")), r"modules\['0'\]\['alpha'\].*nan"),
    "alpha a bool": (_module("0", alpha=True), r"modules\['0'\]\['alpha'\].*True"),
    "dropout one": (_module("0", dropout=1.0), r"modules\['0'\]\['dropout'\].*1\.0"),
    "rslora a string": (_module("0", rslora="yes"), r"modules\['0'\]\['rslora'\].*'yes'"),
    "unknown option": (_module("0", bias=True), r"modules\['0'\].*'bias'"),
    "missing option": (_drop("0", "alpha"), r"modules\['0'\].*'alpha'"),
    "targets": (_config(targets=["0"]), "'targets'"),
    "method": (_config(method="vefa"), "'method'.*'lora'.*'vefa'"),
    "format version": (_config(format_version=2), "format version 1"),
}


# Every case in both layouts: the config inside the weights file, and an earlier version's
# adapter_config.json alone (but bytes that are not UTF-8, which safetensors metadata cannot hold).
LAYOUTS = [(case, layout) for case in MALFORMED for layout in ("current", "legacy")
           if (case, layout) != ("not utf-8", "current")]


@pytest.mark.parametrize("case,layout", LAYOUTS)
def test_a_malformed_config_names_the_file_and_the_key(case, layout, tmp_path):
    text, message = MALFORMED[case]
    path = lora_folder(tmp_path)
    if callable(text):
        text = json.dumps(text(saved_config(path)))
    if layout == "legacy":
        legacy_folder(str(path))
        with open(os.path.join(str(path), CONFIG), "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
        where = os.path.join(str(path), CONFIG)
    else:
        rewrite(path, config=text)
        where = os.path.join(str(path), WEIGHTS)
    model = mlp()
    before = model_state(model)
    with pytest.raises(ValueError, match=message) as error:
        featadapt.load_adapters(model, str(path))
    assert where in str(error.value)
    assert_unchanged(model, before)


def _tensors(**changes):
    def spoil(tensors):
        for key, value in changes.items():
            if value is None:
                del tensors[key]
            else:
                tensors[key] = value
        return tensors
    return spoil


def _scale_2d(tensors):
    tensors["0.scale"] = tensors["0.scale"].reshape(1, 11)
    return tensors


INCONSISTENT = {
    # name: (method and options saved, how to spoil the tensors, what the message must name)
    "lora_A rows vs r": ("lora", _tensors(**{"0.lora_A": torch.zeros(4, 11)}), r"module '0'.*lora_A.*r=3"),
    "lora_B columns vs r": ("lora", _tensors(**{"0.lora_B": torch.zeros(16, 4)}), r"module '0'.*lora_B.*r=3"),
    "lorfa lora_B rows vs K": ("lorfa", _tensors(**{"0.lora_B": torch.zeros(12, 3)}), r"module '0'.*lora_B.*11"),
    "shift vs scale": ("vefa", _tensors(**{"0.shift": torch.zeros(12)}), r"module '0'.*shift.*\(12,\).*\(11,\)"),
    "2-d scale": ("vefa", _scale_2d, r"module '0'.*scale.*1-D.*\(1, 11\)"),
    "a tensor missing": ("vefa", _tensors(**{"2.shift": None}), r"module '2'.*shift"),
    "bool tensor": ("vefa", _tensors(**{"2.scale": torch.ones(16, dtype=torch.bool)}), r"'2\.scale'.*floating point"),
}
SAVED = {"lora": {"r": 3, "alpha": 5}, "lorfa": {"r": 3, "alpha": 5}, "vefa": {"shift": True}}


@pytest.mark.parametrize("case", INCONSISTENT)
def test_tensors_that_do_not_match_the_config_are_refused(case, tmp_path):
    method, spoil, message = INCONSISTENT[case]
    featadapt.save_adapters(adapted(method, **SAVED[method]), str(tmp_path))
    rewrite(tmp_path, tensors=spoil(load_file(str(tmp_path / WEIGHTS))))
    model = mlp()
    before = model_state(model)
    with pytest.raises(ValueError, match=message) as error:
        featadapt.load_adapters(model, str(tmp_path))
    assert str(tmp_path / WEIGHTS) in str(error.value)
    assert_unchanged(model, before)


def test_folders_written_by_earlier_versions_still_load(tmp_path):
    """The layout before the config went inside the weights file: adapter_config.json holds it alone."""
    model = adapted("lorfa", r=3, alpha=5)
    featadapt.save_adapters(model, str(tmp_path))
    legacy_folder(str(tmp_path))
    assert which(str(tmp_path), {"model": model}) == "model"


def test_a_path_that_is_no_path_is_named(tmp_path):
    with pytest.raises(TypeError, match="load_adapters: path must be a folder path .*got int"):
        featadapt.load_adapters(mlp(), 3)
    with pytest.raises(TypeError, match="save_adapters: path must be a folder path .*got NoneType"):
        featadapt.save_adapters(adapted(), None)
