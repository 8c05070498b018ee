"""Named adapters in featadapt's own modules, chosen per sequence:
add_named_adapter / load_named_adapters and the select_adapters context."""

import copy
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import featadapt
from featadapt import adapter_bank as na
from helpers import tiny_gpt2
from test_adapter_folders import assert_unchanged, model_state, rewrite

METHODS = ("vefa", "lorfa", "lora")
# Two adapters of each method with different options: they share one bank.
OPTIONS = {
    "vefa": ({"shift": False}, {"shift": True}),
    "lorfa": ({"r": 2, "alpha": 4}, {"r": 5, "alpha": 3, "rslora": True}),
    "lora": ({"r": 3, "alpha": 8}, {"r": 6, "alpha": 2}),
}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(11, 13), nn.ReLU(), nn.Linear(13, 7)).eval()


def randomise(model, seed):
    """Non-trivial adapter values (a fresh adapter is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in featadapt.model.adapter_layers(model):
            for param in layer.parameters(recurse=False):
                param.copy_(torch.randn(param.shape, generator=g) * 0.3 + (1.0 if param.dim() == 1 else 0.0))


def saved_adapter(tmp_path, method, options, seed, build=mlp):
    """A directory from save_adapters, and the adapted model it came from."""
    model = build()
    featadapt.inject(model, method, ["0", "2"] if build is mlp else "all-linear", **options)
    randomise(model, seed)
    path = tmp_path / f"{method}-{seed}"
    featadapt.save_adapters(model, str(path))
    return str(path), model


@pytest.mark.parametrize("method", METHODS)
def test_each_sequence_runs_its_named_adapter(method, tmp_path):
    path_a, model_a = saved_adapter(tmp_path, method, OPTIONS[method][0], seed=1)
    path_b, model_b = saved_adapter(tmp_path, method, OPTIONS[method][1], seed=2)
    served = mlp()
    assert featadapt.load_named_adapters(served, {"a": path_a, "b": path_b}) == ["a", "b"]
    assert featadapt.named_adapters(served) == ["a", "b"]
    x = torch.randn(5, 4, 11)
    names = ["b", None, "a", "__base__", "b"]
    with featadapt.select_adapters(served, names):
        y = served(x)
    expected = {"a": model_a(x), "b": model_b(x), None: mlp()(x), "__base__": mlp()(x)}
    for i, name in enumerate(names):
        torch.testing.assert_close(y[i], expected[name][i], rtol=1e-5, atol=1e-6)
    # outside the context, the layers run their own (identity-initialised) adapters again
    torch.testing.assert_close(served(x), mlp()(x))


@pytest.mark.parametrize("method", METHODS)
def test_a_snapshot_of_the_models_own_adapters(method):
    model = mlp()
    featadapt.inject(model, method, ["0", "2"], **OPTIONS[method][0])
    randomise(model, 3)
    reference = copy.deepcopy(model)
    featadapt.add_named_adapter(model, "first")
    randomise(model, 4)  # training goes on; the snapshot stays
    x = torch.randn(2, 11)
    with featadapt.select_adapters(model, ["first", None]):
        y = model(x)
    torch.testing.assert_close(y[0], reference(x)[0])
    torch.testing.assert_close(y[1], mlp()(x)[1])


def test_one_indexed_op_call_per_layer(tmp_path, monkeypatch):
    path_a, _ = saved_adapter(tmp_path, "vefa", {}, seed=1)
    served = mlp()
    featadapt.load_named_adapters(served, {"a": path_a, "b": path_a})
    calls = []
    real = na.vefa_linear
    monkeypatch.setattr(na, "vefa_linear", lambda *a, **k: calls.append(k["adapter_index"].shape) or real(*a, **k))
    with featadapt.select_adapters(served, ["a", "b", None]):
        served(torch.randn(3, 11))
    assert calls == [(3,), (3,)]


def test_banks_stay_out_of_the_state_dict_and_the_saved_adapters(tmp_path):
    path_a, _ = saved_adapter(tmp_path, "lora", {"r": 2}, seed=1)
    served = mlp()
    featadapt.inject(served, "lora", ["0", "2"], r=2)
    keys = set(served.state_dict())
    featadapt.add_named_adapter(served, "a", path_a)
    assert set(served.state_dict()) == keys
    featadapt.save_adapters(served, str(tmp_path / "own"))
    fresh = mlp()
    featadapt.load_adapters(fresh, str(tmp_path / "own"))
    x = torch.randn(3, 11)
    torch.testing.assert_close(fresh(x), served(x))


def test_greedy_generate_with_a_mixed_batch_equals_each_sequence_alone(tmp_path):
    path_a, model_a = saved_adapter(tmp_path, "vefa", {"shift": True}, seed=1, build=tiny_gpt2)
    path_b, model_b = saved_adapter(tmp_path, "vefa", {}, seed=2, build=tiny_gpt2)
    served = tiny_gpt2().eval()
    featadapt.load_named_adapters(served, {"a": path_a, "b": path_b})
    prompts = torch.randint(1, 100, (3, 5), generator=torch.Generator().manual_seed(0))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with featadapt.select_adapters(served, ["a", "b", None]):
        batch = served.generate(prompts, attention_mask=torch.ones_like(prompts), **kwargs)
    for i, alone_model in enumerate([model_a.eval(), model_b.eval(), tiny_gpt2().eval()]):
        alone = alone_model.generate(prompts[i:i + 1], attention_mask=torch.ones_like(prompts[i:i + 1]), **kwargs)
        assert torch.equal(batch[i:i + 1], alone)


def test_remove_and_replace(tmp_path):
    path_a, model_a = saved_adapter(tmp_path, "vefa", {}, seed=1)
    path_b, model_b = saved_adapter(tmp_path, "vefa", {}, seed=2)
    served = mlp()
    featadapt.load_named_adapters(served, {"a": path_a, "b": path_b})
    featadapt.add_named_adapter(served, "a", path_b)  # same name: replaced
    featadapt.remove_named_adapter(served, "b")
    assert featadapt.named_adapters(served) == ["a"]
    x = torch.randn(1, 11)
    with featadapt.select_adapters(served, ["a"]):
        torch.testing.assert_close(served(x), model_b(x))
    with pytest.raises(ValueError, match=r"no adapter named 'b'"):
        featadapt.remove_named_adapter(served, "b")


def test_errors_name_what_is_wrong(tmp_path):
    path_a, _ = saved_adapter(tmp_path, "vefa", {}, seed=1)
    path_l, _ = saved_adapter(tmp_path, "lora", {"r": 2}, seed=1)
    served = mlp()
    featadapt.add_named_adapter(served, "a", path_a)
    with pytest.raises(ValueError, match=r"select_adapters: no adapter named 'zzz'; the model has \['a'\]"):
        with featadapt.select_adapters(served, ["a", "zzz"]):
            pass
    with pytest.raises(ValueError, match="2 adapter names for an input of shape"):
        with featadapt.select_adapters(served, ["a", None]):
            served(torch.randn(3, 11))
    with pytest.raises(ValueError, match="module '0' has a vefa adapter, .* a lora adapter"):
        featadapt.add_named_adapter(served, "l", path_l)
    with pytest.raises(ValueError, match="adapter name must be a non-empty string"):
        featadapt.add_named_adapter(served, "__base__", path_a)
    featadapt.merge_adapters(served)
    with pytest.raises(ValueError, match="merged.*unmerge_adapters"):
        with featadapt.select_adapters(served, ["a", None, None]):
            served(torch.randn(3, 11))
    with pytest.raises(ValueError, match="the model has no adapter layers"):
        featadapt.add_named_adapter(mlp(), "x")


# -- refusals change nothing -----------------------------------------------------------


def _spoil_tensors(path, **changes):
    tensors = load_file(os.path.join(path, "adapters.safetensors"))
    tensors.update(changes)
    rewrite(path, tensors=tensors)


def _served(kind):
    """A model to add adapters to: plain (they would be injected) or with adapters and a named one."""
    model = mlp()
    if kind == "adapted":
        featadapt.inject(model, "vefa", ["0", "2"])
        randomise(model, 5)
        featadapt.add_named_adapter(model, "kept")
    return model


BAD_FILES = {
    # name: (how to spoil a saved VeFA folder (modules "0": K=11, "2": K=13), what the error names)
    "scale of K+1": (lambda p: _spoil_tensors(p, **{"2.scale": torch.ones(14)}),
                     r"module '2'.*scale.*\(13,\).*\(14,\)"),
    "2-d scale": (lambda p: _spoil_tensors(p, **{"0.scale": torch.ones(1, 11)}), r"module '0'.*scale.*1-D"),
    "integer scale": (lambda p: _spoil_tensors(p, **{"2.scale": torch.ones(13, dtype=torch.int64)}), "floating point"),
    "extra module": (lambda p: _spoil_tensors(p, **{"9.scale": torch.ones(13)}), "module '9'"),
    "bad json": (lambda p: rewrite(p, config="{"), "not valid JSON"),
}


@pytest.mark.parametrize("served", ["plain", "adapted"])
@pytest.mark.parametrize("case", BAD_FILES)
def test_a_refused_named_adapter_changes_nothing(case, served, tmp_path):
    spoil, message = BAD_FILES[case]
    path, _ = saved_adapter(tmp_path, "vefa", {}, seed=1)
    spoil(path)
    model = _served(served)
    before = model_state(model)
    with pytest.raises(ValueError, match=message):
        featadapt.add_named_adapter(model, "new", path)
    assert_unchanged(model, before)


def test_a_missing_module_or_another_method_changes_nothing(tmp_path):
    path_l, _ = saved_adapter(tmp_path, "lora", {"r": 2}, seed=1)
    model = _served("adapted")
    before = model_state(model)
    with pytest.raises(ValueError, match="module '0' has a vefa adapter, .* a lora adapter"):
        featadapt.add_named_adapter(model, "l", path_l)
    assert_unchanged(model, before)
    small = nn.Sequential(nn.Linear(11, 13))
    before = model_state(small)
    with pytest.raises(ValueError, match="module '2'.*does not have"):
        featadapt.add_named_adapter(small, "l", path_l)
    assert_unchanged(small, before)


def test_load_named_adapters_adds_all_or_nothing(tmp_path):
    good, _ = saved_adapter(tmp_path, "vefa", {}, seed=1)
    bad, _ = saved_adapter(tmp_path, "vefa", {"shift": True}, seed=2)
    _spoil_tensors(bad, **{"2.shift": torch.zeros(12)})
    model = mlp()
    before = model_state(model)
    with pytest.raises(ValueError, match="module '2'.*shift"):
        featadapt.load_named_adapters(model, {"good": good, "bad": bad})
    assert_unchanged(model, before)
    # and adapters that only conflict with one another are refused before either is added
    lora, _ = saved_adapter(tmp_path, "lora", {"r": 2}, seed=3)
    with pytest.raises(ValueError, match="module '0' has a vefa adapter, .* a lora adapter"):
        featadapt.load_named_adapters(model, {"good": good, "lora": lora})
    assert_unchanged(model, before)


def test_an_adapter_saved_from_a_bare_layer(tmp_path):
    torch.manual_seed(1)
    layer = featadapt.VeFALinear(nn.Linear(11, 13), shift=True)
    randomise(layer, 2)
    featadapt.save_adapters(layer, str(tmp_path))
    torch.manual_seed(1)
    linear = nn.Linear(11, 13)  # the same weights as the layer's base
    before = model_state(linear)
    with pytest.raises(ValueError, match=r"featadapt\.nn\.VeFALinear\(linear, shift=True\)"):
        featadapt.add_named_adapter(linear, "a", str(tmp_path))
    assert_unchanged(linear, before)
    served = featadapt.VeFALinear(linear)
    assert featadapt.add_named_adapter(served, "a", str(tmp_path)) == [""]
    x = torch.randn(2, 3, 11)
    with featadapt.select_adapters(served, ["a", None]):
        y = served(x)
    torch.testing.assert_close(y[0], layer(x)[0])
    torch.testing.assert_close(y[1], linear(x)[1])


def test_a_snapshot_needs_linear_adapter_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    featadapt.inject(model, "vefa", r"0")
    before = model_state(model)
    with pytest.raises(TypeError, match="add_named_adapter: .*'0' is a VeFABlackBox"):
        featadapt.add_named_adapter(model, "snap")
    assert_unchanged(model, before)


def test_select_adapters_leaves_nothing_on_the_shared_layers(tmp_path):
    """The per-sequence ids travel in a per-thread context, never on the layers (where
    concurrent requests would swap them); a layer without a bank gets none."""
    path_a, _ = saved_adapter(tmp_path, "lora", OPTIONS["lora"][0], seed=1)
    served = nn.Sequential(nn.Linear(11, 13), nn.ReLU(), nn.Linear(13, 7), nn.ReLU(), nn.Linear(7, 7)).eval()
    featadapt.load_named_adapters(served, {"a": path_a})
    featadapt.inject(served, "lora", ["4"], r=2)  # a layer with no named adapter: runs its base in a selection
    before = {name: dict(vars(layer)) for name, layer in featadapt.model.adapter_layers(served)}
    x = torch.randn(2, 11)
    with featadapt.select_adapters(served, ["a", None]):
        assert {name: dict(vars(layer)) for name, layer in featadapt.model.adapter_layers(served)} == before
        y, hidden = served(x), served[:4](x)
    assert served[4].adapter_bank is None and not hasattr(served[4], "selected_adapters")
    torch.testing.assert_close(y, served[4].base_layer(hidden))


def test_select_adapters_on_a_model_with_black_box_layers_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    featadapt.inject(model, "vefa", r"0")
    match = r"select_adapters: module '0' is a VeFABlackBox, which holds no named adapters"
    with pytest.raises(TypeError, match=match):
        with featadapt.select_adapters(model, [None]):
            pass


def test_select_adapters_under_torch_compile(tmp_path):
    """Each compiled layer reads its own ids from the per-thread selection."""
    path_a, _ = saved_adapter(tmp_path, "lora", OPTIONS["lora"][0], seed=1)
    served = mlp()
    featadapt.load_named_adapters(served, {"a": path_a})
    compiled = torch.compile(served, backend="eager")
    x = torch.randn(3, 11)
    with featadapt.select_adapters(served, ["a", None, "a"]):
        expected = served(x)
        torch.testing.assert_close(compiled(x), expected)
    torch.testing.assert_close(compiled(x), served(x))
