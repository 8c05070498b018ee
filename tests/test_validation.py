"""Bad inputs fail early, with a message that names the argument, what was
expected and what was given."""

import math
import re

import pytest
import torch
from torch import nn

import featadapt
from helpers import call_op, make_inputs

K, N, R, M = 17, 13, 3, 5
LOW_RANK = ("lorfa", "lora")
OP_NAME = {"vefa": "vefa_linear", "lorfa": "lorfa_linear", "lora": "lora_linear"}


def pattern(*parts):
    """A regex matching the literal parts in this order, anything between them."""
    return ".*".join(re.escape(str(p)) for p in parts)


def inputs(method):
    return make_inputs(method, (M,), K, N, r=R, requires_grad=False)


def call_with(method, overrides=None, **kwargs):
    t = {**inputs(method), **(overrides or {})}
    return call_op(method, t, **kwargs)


def meta(shape):
    return torch.empty(shape, device="meta")


# -- the frozen layer: x, weight, bias (every op) --------------------------------

FROZEN_CASES = {
    # id: (overrides, exception, message parts in order)
    "x-last-dim": ({"x": torch.randn(M, 16)}, ValueError, ["x's last dimension", f"K={K}", "(5, 16)"]),
    "x-last-dim-3d": ({"x": torch.randn(2, 3, 18)}, ValueError, ["x's last dimension", f"K={K}", "(2, 3, 18)"]),
    "weight-1d": ({"weight": torch.randn(K)}, ValueError, ["weight must be 2-D", "(N, K)", f"({K},)"]),
    "weight-3d": ({"weight": torch.randn(N, K, 1)}, ValueError, ["weight must be 2-D", "(N, K)", f"({N}, {K}, 1)"]),
    "bias-shape": ({"bias": torch.randn(N - 1)}, ValueError, ["bias", f"({N},)", f"({N - 1},)"]),
    "bias-2d": ({"bias": torch.randn(1, N)}, ValueError, ["bias", f"({N},)", f"(1, {N})"]),
    "x-int": ({"x": torch.randint(0, 5, (M, K))}, TypeError, ["x", "floating dtype", "torch.int64"]),
    "weight-int": ({"weight": torch.randint(0, 5, (N, K), dtype=torch.int32)}, TypeError,
                   ["weight", "floating dtype", "torch.int32"]),
    "bias-int": ({"bias": torch.randint(0, 5, (N,))}, TypeError, ["bias", "floating dtype", "torch.int64"]),
    "weight-dtype": ({"weight": torch.randn(N, K, dtype=torch.float64)}, TypeError,
                     ["weight", "x's dtype torch.float32", "torch.float64"]),
    "bias-dtype": ({"bias": torch.randn(N).half()}, TypeError, ["bias", "x's dtype torch.float32", "torch.float16"]),
    "weight-meta": ({"weight": meta((N, K))}, ValueError, ["weight", "x's device cpu", "meta"]),
    "bias-meta": ({"bias": meta((N,))}, ValueError, ["bias", "x's device cpu", "meta"]),
    "x-meta": ({"x": meta((M, K))}, ValueError, ["weight", "x's device meta", "cpu"]),
    "x-not-tensor": ({"x": [[1.0] * K] * M}, TypeError, ["x", "torch.Tensor", "list"]),
}


@pytest.mark.parametrize("case", FROZEN_CASES.values(), ids=FROZEN_CASES.keys())
@pytest.mark.parametrize("method", ["vefa", "lorfa", "lora"])
def test_bad_frozen_layer_inputs(method, case):
    overrides, error, parts = case
    with pytest.raises(error, match=pattern(OP_NAME[method], *parts)):
        call_with(method, overrides)


# -- the adapter parameters ----------------------------------------------------

PARAM_CASES = {
    # id: (method, overrides, exception, message parts in order)
    "vefa-scale-shape": ("vefa", {"scale": torch.randn(K - 1)}, ValueError, ["scale", f"({K},)", f"({K - 1},)"]),
    "vefa-scale-2d": ("vefa", {"scale": torch.randn(1, K)}, ValueError, ["scale", f"({K},)", f"(1, {K})"]),
    "vefa-shift-shape": ("vefa", {"shift": torch.randn(N)}, ValueError, ["shift", f"({K},)", f"({N},)"]),
    "vefa-scale-int": ("vefa", {"scale": torch.ones(K, dtype=torch.int64)}, TypeError,
                       ["scale", "floating dtype", "torch.int64"]),
    "vefa-shift-bool": ("vefa", {"shift": torch.zeros(K, dtype=torch.bool)}, TypeError,
                        ["shift", "floating dtype", "torch.bool"]),
    "vefa-scale-meta": ("vefa", {"scale": meta((K,))}, ValueError, ["scale", "x's device cpu", "meta"]),
    "vefa-shift-meta": ("vefa", {"shift": meta((K,))}, ValueError, ["shift", "x's device cpu", "meta"]),
    "vefa-scale-not-tensor": ("vefa", {"scale": 1.0}, TypeError, ["scale", "torch.Tensor", "float"]),
    "lorfa-B-is-N-by-r": ("lorfa", {"lora_B": torch.randn(N, R)}, ValueError,
                          ["lora_B", "(K, r)", f"({K}, {R})", f"({N}, {R})"]),
    "lora-B-is-K-by-r": ("lora", {"lora_B": torch.randn(K, R)}, ValueError,
                         ["lora_B", "(N, r)", f"({N}, {R})", f"({K}, {R})"]),
}
for _method, _rows in (("lorfa", K), ("lora", N)):
    PARAM_CASES.update({
        f"{_method}-A-wrong-K": (_method, {"lora_A": torch.randn(R, K + 1)}, ValueError,
                                 ["lora_A", f"(r, {K})", f"({R}, {K + 1})"]),
        f"{_method}-A-1d": (_method, {"lora_A": torch.randn(K)}, ValueError, ["lora_A", f"(r, {K})", f"({K},)"]),
        f"{_method}-A-rank-0": (_method, {"lora_A": torch.randn(0, K), "lora_B": torch.randn(_rows, 0)},
                                ValueError, ["rank r", ">= 1", "0"]),
        f"{_method}-B-wrong-rank": (_method, {"lora_B": torch.randn(_rows, R + 1)}, ValueError,
                                    ["lora_B", f"({_rows}, {R})", f"({_rows}, {R + 1})"]),
        f"{_method}-A-int": (_method, {"lora_A": torch.ones(R, K, dtype=torch.int64)}, TypeError,
                             ["lora_A", "floating dtype", "torch.int64"]),
        f"{_method}-B-int": (_method, {"lora_B": torch.ones(_rows, R, dtype=torch.int32)}, TypeError,
                             ["lora_B", "floating dtype", "torch.int32"]),
        f"{_method}-A-meta": (_method, {"lora_A": meta((R, K))}, ValueError, ["lora_A", "x's device cpu", "meta"]),
        f"{_method}-B-meta": (_method, {"lora_B": meta((_rows, R))}, ValueError, ["lora_B", "x's device cpu", "meta"]),
    })


@pytest.mark.parametrize("method,overrides,error,parts", PARAM_CASES.values(), ids=PARAM_CASES.keys())
def test_bad_adapter_parameters(method, overrides, error, parts):
    with pytest.raises(error, match=pattern(OP_NAME[method], *parts)):
        call_with(method, overrides)


# -- scalar options and backend ------------------------------------------------


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, math.nan, True])
@pytest.mark.parametrize("method", LOW_RANK)
def test_dropout_p_outside_unit_interval(method, p):
    with pytest.raises(ValueError, match=pattern(OP_NAME[method], "dropout_p", "[0, 1)", f"got {p!r}")):
        call_with(method, dropout_p=p)


@pytest.mark.parametrize("scaling", [math.inf, -math.inf, math.nan, "2", None])
@pytest.mark.parametrize("method", LOW_RANK)
def test_scaling_must_be_finite(method, scaling):
    with pytest.raises(ValueError, match=pattern(OP_NAME[method], "scaling", "finite real", f"got {scaling!r}")):
        call_with(method, scaling=scaling)


@pytest.mark.parametrize("method", ["vefa", "lorfa", "lora"])
def test_unknown_backend(method):
    with pytest.raises(ValueError, match=pattern("unknown backend 'warp-drive'", "expected one of", "reference", "torch")):
        call_with(method, backend="warp-drive")


def test_valid_inputs_pass_the_same_checks():
    """The cases above fail because of their one bad argument, not the base inputs."""
    for method in ("vefa", "lorfa", "lora"):
        assert call_with(method, dropout_p=0.0 if method == "vefa" else 0.5).shape == (M, N)


# -- modules -------------------------------------------------------------------

LOW_RANK_MODULES = {"LoRALinear": featadapt.LoRALinear, "LoRFALinear": featadapt.LoRFALinear}
ALL_MODULES = {**LOW_RANK_MODULES, "VeFALinear": featadapt.VeFALinear}


@pytest.mark.parametrize("r", [0, -2, 18, 2.5, True])
@pytest.mark.parametrize("name", LOW_RANK_MODULES)
def test_module_rank_out_of_range(name, r):
    with pytest.raises(ValueError, match=pattern(name, "r must be an integer", "[1, in_features=17]", f"got {r!r}")):
        LOW_RANK_MODULES[name](nn.Linear(17, 13), r=r)


@pytest.mark.parametrize("name", LOW_RANK_MODULES)
def test_module_rank_equal_to_in_features_is_fine(name):
    layer = LOW_RANK_MODULES[name](nn.Linear(17, 13), r=17)
    assert layer(torch.randn(2, 17)).shape == (2, 13)


@pytest.mark.parametrize("dropout", [1.0, -0.1, 2.0])
@pytest.mark.parametrize("name", LOW_RANK_MODULES)
def test_module_dropout_outside_unit_interval(name, dropout):
    with pytest.raises(ValueError, match=pattern(name, "dropout", "[0, 1)", f"got {dropout!r}")):
        LOW_RANK_MODULES[name](nn.Linear(17, 13), r=4, dropout=dropout)


@pytest.mark.parametrize("base", [nn.Conv1d(17, 13, 1), nn.Bilinear(17, 17, 13), nn.Identity()],
                         ids=["Conv1d", "Bilinear", "Identity"])
@pytest.mark.parametrize("name", ALL_MODULES)
def test_module_base_layer_must_be_linear(name, base):
    with pytest.raises(TypeError, match=pattern(name, "base_layer must be an nn.Linear", f"got {type(base).__name__}")):
        ALL_MODULES[name](base)


# -- inject --------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(17, 13)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(13, 5)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_inject_unknown_method():
    with pytest.raises(ValueError, match=pattern("unknown method 'dora'", "'vefa'", "'lorfa'", "'lora'")):
        featadapt.inject(Tiny(), "dora")


@pytest.mark.parametrize("method,option", [("lora", "bogus"), ("lorfa", "rank"), ("vefa", "r")])
def test_inject_unknown_option(method, option):
    accepted = "shift" if method == "vefa" else "r, alpha, dropout"
    with pytest.raises(TypeError, match=pattern(f"method '{method}'", accepted, f"unexpected {option}")):
        featadapt.inject(Tiny(), method, **{option: 4})


@pytest.mark.parametrize("target", [["fc3"], r"encoder\..*"], ids=["suffix", "regex"])
def test_inject_nothing_matched(target):
    model = Tiny()
    with pytest.raises(ValueError, match=pattern("no nn.Linear module matched", f"target_modules={target!r}")):
        featadapt.inject(model, "lora", target_modules=target, r=2)
    assert type(model.fc1) is nn.Linear and type(model.fc2) is nn.Linear


@pytest.mark.parametrize("target", [["act"], ["fc1", "act"], r"act"], ids=["suffix", "mixed", "regex"])
def test_inject_target_that_is_not_linear(target):
    model = Tiny()
    with pytest.raises(TypeError, match=pattern("module 'act'", f"target_modules={target!r}", "ReLU", "nn.Linear")):
        featadapt.inject(model, "vefa", target_modules=target)
    assert type(model.fc1) is nn.Linear, "a failed inject must leave the model unchanged"


@pytest.mark.parametrize("second", ["lora", "vefa"])
def test_inject_twice_into_the_same_module(second):
    model = Tiny()
    featadapt.inject(model, "lora", target_modules=["fc1"], r=2)
    options = {"r": 2} if second == "lora" else {}
    with pytest.raises(ValueError, match=pattern("module 'fc1'", "already has a lora adapter")):
        featadapt.inject(model, second, target_modules=["fc1"], **options)
    assert isinstance(model.fc1, featadapt.LoRALinear) and isinstance(model.fc1.base_layer, nn.Linear)
