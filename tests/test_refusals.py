"""A model-changing call that refuses leaves the model exactly as it was.

Each test provokes one refusal of inject, merge_adapters, unload or
replace_module, on a model where an eager implementation would already have
changed something (a layer before the one that fails), and compares a
bit-for-bit snapshot of the model before and after: parameter and buffer
values, dtypes and requires_grad flags, the module tree as (name, class)
pairs and every module's training flag.
"""

import re

import pytest
import torch
from torch import nn

import featadapt
from featadapt.model import replace_module
from quantized_bases import bnb_4bit, torchao_int8


def _bits(tensor):
    """The tensor's bytes (of each inner tensor, for a tensor subclass such as torchao's)."""
    tensor = tensor.detach()
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return [_bits(getattr(tensor, name)) for name in names]
    return tensor.clone().contiguous().reshape(-1).view(torch.uint8)


def snapshot(model):
    tensors = {}
    for kind, named in (("parameter", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, tensor in named:
            tensors[kind, name] = (tensor.dtype, tuple(tensor.shape), tensor.requires_grad, _bits(tensor))
    modules = list(model.named_modules(remove_duplicate=False))
    return {"tree": [(name, type(m)) for name, m in modules],
            "training": [(name, m.training) for name, m in modules],
            "tensors": tensors}


def _same_bits(a, b):
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same_bits, a, b))
    return not isinstance(b, list) and a.shape == b.shape and torch.equal(a, b)


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["tree"] == before["tree"], "the module tree changed"
    assert after["training"] == before["training"], "a training flag changed"
    assert after["tensors"].keys() == before["tensors"].keys(), "parameters or buffers were added or removed"
    for key, (dtype, shape, requires_grad, bits) in before["tensors"].items():
        now = after["tensors"][key]
        assert now[:3] == (dtype, shape, requires_grad), f"{key}: {now[:3]} != {(dtype, shape, requires_grad)}"
        assert _same_bits(now[3], bits), f"{key}: values changed"


def refuses(model, call, error, match):
    """call() raises `error` matching `match`, and the model is unchanged."""
    before = snapshot(model)
    with pytest.raises(error, match=match):
        call()
    assert_unchanged(model, before)


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass with its own forward: an adapter would drop it."""

    def forward(self, x):
        return 2 * super().forward(x)


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 11), nn.ReLU(), nn.Linear(11, 7), nn.ReLU(), nn.Linear(7, 3))
    model[4].train(False)  # mixed training flags, so a reset shows
    return model


def adapted_mlp():
    model = mlp()
    featadapt.inject(model, "lora", ["0", "2"], r=2)
    with torch.no_grad():
        for _, layer in featadapt.model.adapter_layers(model):
            layer.lora_B.normal_()
    return model


# -- inject ----------------------------------------------------------------------


def test_inject_bad_method():
    model = mlp()
    refuses(model, lambda: featadapt.inject(model, "dora"), ValueError, r"unknown method 'dora'")


@pytest.mark.parametrize("target_modules, error, match", [
    ("(0|2", ValueError, r"target_modules='\(0\|2' is not a valid regular expression: missing \)"),
    (None, TypeError, r"target_modules must be 'all-linear', a regex string or a list of module-name suffixes, "
                      r"got None"),
    (["0", 2], TypeError, r"target_modules must be .* got \['0', 2\]"),
    (["nothing"], ValueError, r"no nn.Linear module matched target_modules=\['nothing'\]"),
    (["1"], TypeError, r"module '1' matched target_modules=\['1'\] but is a ReLU"),
])
def test_inject_bad_target_modules(target_modules, error, match):
    model = mlp()
    refuses(model, lambda: featadapt.inject(model, "lora", target_modules, r=2), error, match)


def test_inject_bad_option_name():
    model = mlp()
    refuses(model, lambda: featadapt.inject(model, "lora", rank=2), TypeError, r"got unexpected rank")


@pytest.mark.parametrize("method, options, match", [
    ("lora", {"r": 12}, r"r must be an integer in \[1, in_features=11\], got 12"),  # fits layer 0 (K=16), not layer 2
    ("lorfa", {"dropout": 1.5}, r"dropout"),
    ("vefa", {"dtype": "float32"}, r"dtype"),
])
def test_inject_bad_option_value(method, options, match):
    model = mlp()
    refuses(model, lambda: featadapt.inject(model, method, ["0", "2"], **options), (TypeError, ValueError), match)


def test_inject_a_subclass_with_its_own_forward_among_the_targets():
    model = mlp()
    model[2] = ScaledLinear(11, 7)
    match = (r"module '2' matched target_modules=.* but cannot be adapted: its class ScaledLinear overrides the "
             r"forward of Linear.*dropped")
    for targets in (["0", "2"], "0|2", "all-linear"):
        refuses(model, lambda: featadapt.inject(model, "vefa", targets), TypeError, match)


def test_inject_on_an_adapted_module():
    model = adapted_mlp()
    refuses(model, lambda: featadapt.inject(model, "vefa", ["4", "2"]), ValueError,
            r"module '2' already has a lora adapter")


def test_inject_lora_on_a_grouped_convolution_after_a_linear():
    model = nn.Sequential(nn.Linear(8, 8), nn.Unflatten(1, (8, 1)), nn.Conv1d(8, 8, 1, groups=2))
    refuses(model, lambda: featadapt.inject(model, "lora", ["0", "2"], r=2), ValueError,
            r"grouped and depthwise convolutions \(groups=2\) are not supported")


# -- merge_adapters, unload --------------------------------------------------------


def test_merge_adapters_bad_option():
    model = adapted_mlp()
    refuses(model, lambda: featadapt.merge_adapters(model, requantize="yes"), TypeError,
            r"merge_adapters: requantize must be True or False, got 'yes'")


@pytest.mark.parametrize("options, error, match", [
    ({"merge": "yes"}, TypeError, r"unload: merge must be True or False, got 'yes'"),
    ({"dequantize": 1}, TypeError, r"unload: dequantize must be True or False, got 1"),
    ({"merge": False, "dequantize": True}, ValueError, r"dequantize=True .* needs merge=True; got merge=False"),
])
def test_unload_bad_options(options, error, match):
    model = adapted_mlp()
    refuses(model, lambda: featadapt.unload(model, **options), error, match)


def quantized_after_plain(quantize):
    """A plain adapted layer first, then one on a quantized base."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), quantize(nn.Linear(32, 8)))
    featadapt.inject(model, "vefa", ["0", "2"], shift=True)
    with torch.no_grad():
        for _, layer in featadapt.model.adapter_layers(model):
            layer.scale.add_(0.1)
    return model


def test_merge_adapters_on_a_quantized_base_without_requantize():
    model = quantized_after_plain(bnb_4bit)
    refuses(model, lambda: featadapt.merge_adapters(model), ValueError,
            r"merge_adapters: module '2': the base is a bitsandbytes Linear4bit .* loses precision.*"
            r"merge_adapters\(model, requantize=True\)")


def test_merge_adapters_requantizing_torchao_is_refused():
    model = quantized_after_plain(torchao_int8)
    refuses(model, lambda: featadapt.merge_adapters(model, requantize=True), ValueError,
            r"merge_adapters: module '2': re-quantizing a Linear with a Int8Tensor weight is not supported")


def test_unload_merging_into_a_quantized_base():
    model = quantized_after_plain(bnb_4bit)
    refuses(model, lambda: featadapt.unload(model, merge=True), ValueError,
            r"unload: module '2': .* loses precision.*dequantize=True")


# -- replace_module ------------------------------------------------------------------


@pytest.mark.parametrize("name, error, match", [
    ("", ValueError, r"replace_module: name must name a submodule of the model, got ''"),
    ("7", ValueError, r"replace_module: the model has no submodule '7'"),
    ("0.inner", ValueError, r"replace_module: the model has no submodule '0.inner'"),
])
def test_replace_module_refusals(name, error, match):
    model = mlp()
    refuses(model, lambda: replace_module(model, name, nn.Identity()), error, match)


def test_snapshot_sees_each_kind_of_change():
    """The helper itself: each change the refusals must not make is detected."""
    changes = [
        lambda m: m[0].weight.data.view(-1)[0].add_(1),
        lambda m: m[0].bias.requires_grad_(False),
        lambda m: m[0].to(torch.float64),
        lambda m: m[2].train(True) if not m[2].training else m[2].train(False),
        lambda m: m[4].train(True),
        lambda m: setattr(m, "3", nn.Tanh()),
        lambda m: m[0].register_buffer("extra", torch.zeros(1)),
    ]
    for change in changes:
        model = mlp()
        before = snapshot(model)
        change(model)
        with pytest.raises(AssertionError):
            assert_unchanged(model, before)
    # and -0.0 vs 0.0, which torch.equal on values would miss
    model = mlp()
    with torch.no_grad():
        model[0].bias[0] = 0.0
    before = snapshot(model)
    with torch.no_grad():
        model[0].bias[0] = -0.0
    with pytest.raises(AssertionError, match=re.escape("('parameter', '0.bias'): values changed")):
        assert_unchanged(model, before)
