import copy

import pytest
import torch
from torch import nn

import featadapt
from featadapt import LoRALinear, LoRFALinear, VeFALinear

METHODS = {
    "vefa": lambda base: VeFALinear(base, shift=True),
    "lorfa": lambda base: LoRFALinear(base, r=4, alpha=8),
    "lora": lambda base: LoRALinear(base, r=4, alpha=8),
}


def trained(layer):
    """Give the adapter non-trivial values, as training would."""
    with torch.no_grad():
        for name, param in layer.named_parameters(recurse=False):
            param.add_(0.3 * torch.randn_like(param))
    return layer


def make(method, dtype=torch.float32, bias=True):
    base = nn.Linear(19, 13, bias=bias).to(dtype)
    return trained(METHODS[method](base))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_starts_equal_to_base_layer(method, dtype):
    base = nn.Linear(19, 13).to(dtype)
    layer = METHODS[method](copy.deepcopy(base))
    x = torch.randn(5, 19, dtype=dtype)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("method", METHODS)
def test_parameter_names_dtypes_and_frozen_base(method):
    layer = METHODS[method](nn.Linear(19, 13).to(torch.bfloat16))
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    expected = {"vefa": {"scale", "shift"}, "lorfa": {"lora_A", "lora_B"}, "lora": {"lora_A", "lora_B"}}[method]
    assert names == expected
    assert not layer.base_layer.weight.requires_grad and not layer.base_layer.bias.requires_grad
    # float32 adapters on a bfloat16 layer by default
    assert all(p.dtype == torch.float32 for n, p in layer.named_parameters() if n in expected)


def test_low_rank_shapes_and_scaling():
    base = nn.Linear(19, 13)
    lorfa = LoRFALinear(base, r=4, alpha=8)
    lora = LoRALinear(nn.Linear(19, 13), r=4, alpha=8, rslora=True)
    assert lorfa.lora_A.shape == (4, 19) and lorfa.lora_B.shape == (19, 4)
    assert lora.lora_A.shape == (4, 19) and lora.lora_B.shape == (13, 4)
    assert lorfa.scaling == 2.0
    assert lora.scaling == pytest.approx(8 / 2.0)
    assert torch.count_nonzero(lorfa.lora_A) > 0 and torch.count_nonzero(lorfa.lora_B) == 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bias", [True, False])
def test_merge_matches_and_unmerge_is_bit_exact(method, bias):
    layer = make(method, bias=bias)
    weight = layer.base_layer.weight.detach().clone()
    old_bias = None if layer.base_layer.bias is None else layer.base_layer.bias.detach().clone()
    x = torch.randn(2, 7, 19)
    before = layer(x)
    layer.merge()
    assert layer.merged
    assert not torch.equal(layer.base_layer.weight, weight)
    merged = layer(x)
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.base_layer.weight, weight)
    if old_bias is None:
        assert layer.base_layer.bias is None
    else:
        assert torch.equal(layer.base_layer.bias, old_bias)
    assert torch.equal(layer(x), before)


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_merge_unmerge_is_bit_exact(method):
    layer = make(method, dtype=torch.bfloat16)
    weight = layer.base_layer.weight.detach().clone()
    x = torch.randn(9, 19, dtype=torch.bfloat16)
    before = layer(x)
    layer.merge()
    rel = (layer(x).double() - before.double()).norm() / before.double().norm()
    assert rel < 2e-2
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, weight)


@pytest.mark.parametrize("method", METHODS)
def test_effective_and_delta_weight(method):
    layer = make(method, bias=True)
    w0 = layer.base_layer.weight.detach().clone()
    eff = layer.effective_weight()
    torch.testing.assert_close(layer.delta_weight(), eff - w0)
    x = torch.randn(6, 19)
    expected = x @ eff.T + layer.effective_bias()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.merge()  # the views describe the same adapter while merged
    torch.testing.assert_close(layer.effective_weight(), eff)
    torch.testing.assert_close(layer.original_weight(), w0, rtol=0, atol=0)


def test_feature_space_methods_stay_in_column_space():
    # W_eff = W0 T: with a rank-deficient W0, the update has no component
    # outside W0's column space; LoRA's update does.
    base = nn.Linear(19, 13)
    with torch.no_grad():
        base.weight.copy_(torch.randn(13, 3) @ torch.randn(3, 19))
    u, s, _ = torch.linalg.svd(base.weight.double())
    basis = u[:, :3]
    for method in METHODS:
        delta = make_from(method, base).delta_weight().double()
        outside = delta - basis @ (basis.T @ delta)
        ratio = outside.norm() / delta.norm()
        if method == "lora":
            assert ratio > 0.1
        else:
            assert ratio < 1e-6


def make_from(method, base):
    return trained(METHODS[method](copy.deepcopy(base)))


def test_merge_twice_warns_and_changes_nothing():
    layer = make("lora")
    layer.merge()
    weight = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, weight)
    layer.unmerge()
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_dropout_only_in_training_mode():
    layer = trained(LoRALinear(nn.Linear(19, 13), r=4, dropout=0.5))
    x = torch.randn(8, 19)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(2)
    b = layer(x)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("method", METHODS)
def test_extra_repr_and_gradients(method):
    layer = make(method)
    text = repr(layer)
    assert f"method={method}" in text and "in_features=19" in text and "merged=False" in text
    layer(torch.randn(4, 19)).sum().backward()
    for name, p in layer.named_parameters(recurse=False):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_backend_option_reaches_the_op(backend, monkeypatch):
    layer = make("vefa")
    layer.backend = backend
    seen = []
    original = featadapt.ops.dispatch.choose

    def spy(op, tensors, requested=None):
        seen.append(requested)
        return original(op, tensors, requested)

    monkeypatch.setattr(featadapt.ops.functional, "choose", spy)
    layer(torch.randn(3, 19))
    assert seen == [backend]


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class ShiftedConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) + 1


@pytest.mark.parametrize("method", METHODS)
def test_a_subclass_with_its_own_forward_is_refused(method):
    """The adapter would compute with the weight as nn.Linear does, dropping the subclass's forward."""
    match = (r"base_layer must be an nn.Linear or transformers' Conv1D, got ScaledLinear: its class ScaledLinear "
             r"overrides the forward of Linear; .* silently dropped")
    with pytest.raises(TypeError, match=match):
        METHODS[method](ScaledLinear(19, 13))
    block = featadapt.nn.BLACK_BOX_CLASSES[method]
    with pytest.raises(TypeError, match=r"got ShiftedConv: its class ShiftedConv overrides the forward of Conv2d"):
        block(ShiftedConv(4, 4, 3), **({"r": 2} if method != "vefa" else {}))


def test_a_transformers_conv1d_subclass_with_its_own_forward_is_refused():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D

    class Doubled(conv1d):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(TypeError, match=r"overrides the forward of Conv1D"):
        VeFALinear(Doubled(13, 19))
    assert featadapt.nn.bases.base_kind(conv1d(13, 19)) == "linear"
