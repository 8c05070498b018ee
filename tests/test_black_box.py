"""Adapters on bases called as black boxes: convolutions (exact merges) and
quantized linears (bitsandbytes 4-bit/8-bit, torchao weight-only).

The oracle for a quantized base is float64 math with its dequantized weight
(its own forward equals F.linear with it); for a convolution, the convolution
with the merged weight, computed independently of the forward.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import featadapt
from featadapt.nn import LoRABlackBox, LoRFABlackBox, VeFABlackBox
from featadapt.nn.bases import dequantized_weight
from helpers import rel_err
from quantized_bases import QUANTIZED, bnb_4bit, bnb_8bit, torchao_int8

CLASSES = {"vefa": VeFABlackBox, "lorfa": LoRFABlackBox, "lora": LoRABlackBox}
METHODS = list(CLASSES)


def randomise(layer, generator_seed=1):
    """Non-trivial adapter values (a fresh layer computes exactly its base)."""
    g = torch.Generator().manual_seed(generator_seed)
    with torch.no_grad():
        for name, param in layer.named_parameters(recurse=False):
            noise = torch.randn(param.shape, generator=g, dtype=torch.float64).to(param.dtype)
            param.copy_((1 + 0.3 * noise) if name == "scale" else 0.3 * noise)
    return layer


def make(method, base, **options):
    if method == "vefa":
        return randomise(CLASSES[method](base, **options))
    return randomise(CLASSES[method](base, r=options.pop("r", 3), alpha=options.pop("alpha", 5), **options))


# ---------------------------------------------------------------------------
# Convolutions
# ---------------------------------------------------------------------------

CONVS = {
    "conv1d": lambda dtype: nn.Conv1d(5, 7, 3, padding=1, dtype=dtype),
    "conv2d": lambda dtype: nn.Conv2d(5, 7, (3, 2), stride=(2, 1), padding=(1, 0), dtype=dtype),
    "conv2d-nobias": lambda dtype: nn.Conv2d(5, 7, 3, bias=False, dtype=dtype),
    "conv3d": lambda dtype: nn.Conv3d(5, 7, 2, dtype=dtype),
}
SPATIAL = {"conv1d": (9,), "conv2d": (9, 6), "conv2d-nobias": (7, 8), "conv3d": (4, 5, 3)}


def conv_input(kind, dtype, batch=3):
    return torch.randn((batch, 5) + SPATIAL[kind], dtype=dtype)


@pytest.mark.parametrize("kind", list(CONVS))
@pytest.mark.parametrize("method", METHODS)
def test_conv_forward_equals_the_merged_convolution_in_float64(method, kind):
    base = CONVS[kind](torch.float64)
    layer = make(method, base)
    x = conv_input(kind, torch.float64)
    weight, bias = layer.effective_weight(), layer.effective_bias()
    expected = base._conv_forward(x, weight, base.bias if bias is None else bias)
    assert rel_err(layer(x), expected) < 1e-12
    # float32 against the float64 oracle
    layer32 = copy.deepcopy(layer).float()
    assert rel_err(layer32(x.float()), expected) < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_conv_definitions(method):
    """Each method's formula, written out with F.conv2d in float64."""
    base = nn.Conv2d(5, 7, 3, padding=1, dtype=torch.float64)
    layer = make(method, base)
    x = conv_input("conv2d-nobias", torch.float64)
    if method == "vefa":
        expected = F.conv2d(x * layer.scale.view(-1, 1, 1), base.weight, base.bias, padding=1)
    elif method == "lorfa":
        mixed = x + layer.scaling * torch.einsum("cr,rd,ndhw->nchw", layer.lora_B, layer.lora_A, x)
        expected = F.conv2d(mixed, base.weight, base.bias, padding=1)
    else:
        u = F.conv2d(x, layer.lora_A, padding=1)
        expected = F.conv2d(x, base.weight, base.bias, padding=1) + layer.scaling * torch.einsum("or,nrhw->nohw", layer.lora_B, u)
    assert rel_err(layer(x), expected) < 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_conv_gradcheck_and_only_adapters_get_gradients(method):
    base = nn.Conv1d(5, 4, 3, padding=1, dtype=torch.float64)
    layer = make(method, base)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    params = [layer.get_parameter(n) for n in names]

    def run(x, *values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(run, (x, *[p.detach().clone().requires_grad_() for p in params]))
    layer(x).square().sum().backward()
    assert base.weight.grad is None and all(p.grad is not None for p in params)


@pytest.mark.parametrize("method", METHODS)
def test_conv_merge_is_exact_and_unmerge_bit_exact(method):
    base = nn.Conv2d(5, 7, 3, padding=1)
    original = (base.weight.detach().clone(), base.bias.detach().clone())
    layer = make(method, base)
    x = conv_input("conv2d", torch.float32)
    adapted = layer(x)
    layer.merge()
    assert layer.merged and rel_err(layer(x), adapted) < 1e-5
    layer.unmerge()
    assert torch.equal(base.weight, original[0]) and torch.equal(base.bias, original[1])
    assert torch.equal(layer(x), adapted)


def test_vefa_handles_grouped_and_depthwise_convolutions():
    for groups in (2, 6):
        base = nn.Conv2d(6, 12, 3, groups=groups, dtype=torch.float64)
        layer = make("vefa", base)
        x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
        expected = F.conv2d(x * layer.scale.view(-1, 1, 1), base.weight, base.bias, groups=groups)
        assert rel_err(layer(x), expected) < 1e-12
        layer.merge()
        assert rel_err(layer(x), expected) < 1e-12


@pytest.mark.parametrize("method", ["lorfa", "lora"])
def test_low_rank_methods_refuse_grouped_convolutions(method):
    with pytest.raises(ValueError, match=r"grouped and depthwise convolutions \(groups=4\) are not supported"):
        CLASSES[method](nn.Conv2d(8, 8, 3, groups=4), r=2)


def test_vefa_shift_on_convolutions():
    with pytest.raises(ValueError, match=r"shift=True on a convolution that pads with zeros \(padding=\(1, 1\)\)"):
        VeFABlackBox(nn.Conv2d(5, 7, 3, padding=1), shift=True)
    for base in (nn.Conv2d(5, 7, 3, dtype=torch.float64),
                 nn.Conv2d(5, 7, 3, padding=1, padding_mode="replicate", dtype=torch.float64)):
        layer = make("vefa", base, shift=True)
        x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
        adapted = layer(x)
        layer.merge()
        assert rel_err(layer(x), adapted) < 1e-12


def test_unbatched_conv_input_and_bad_channels():
    layer = make("lorfa", nn.Conv2d(5, 7, 3))
    x = torch.randn(5, 8, 8)
    assert torch.allclose(layer(x), layer(x[None])[0], atol=1e-6)
    with pytest.raises(ValueError, match=r"with 5 input channels, got shape \(2, 4, 8, 8\)"):
        layer(torch.randn(2, 4, 8, 8))


def test_inject_and_files_round_trip_a_conv_model(tmp_path):
    def model():
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 36, 4))

    net = model()
    names = featadapt.inject(net, "lorfa", target_modules=r"0|2", r=2)
    assert names == ["0", "2"] and isinstance(net[0], LoRFABlackBox)
    for _, layer in featadapt.model.adapter_layers(net):
        randomise(layer)
    x = torch.randn(2, 3, 6, 6)
    out = net(x)
    featadapt.save_adapters(net, tmp_path)
    fresh = model()
    featadapt.load_adapters(fresh, tmp_path)
    assert torch.equal(fresh(x), out)
    plain = featadapt.unload(fresh, merge=True)
    assert type(plain[0]) is nn.Conv2d and rel_err(plain(x), out) < 1e-5


# ---------------------------------------------------------------------------
# Quantized linears
# ---------------------------------------------------------------------------

def float64_oracle(method, layer, w0, b0, x):
    x = x.double()
    w0, b0 = w0.double(), None if b0 is None else b0.double()
    if method == "vefa":
        shifted = x * layer.scale.double() + (0 if layer.shift is None else layer.shift.double())
        return F.linear(shifted, w0, b0)
    u = x @ layer.lora_A.double().T
    if method == "lorfa":
        return F.linear(x + layer.scaling * u @ layer.lora_B.double().T, w0, b0)
    return F.linear(x, w0, b0) + layer.scaling * u @ layer.lora_B.double().T


@pytest.mark.parametrize("kind", list(QUANTIZED))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(1, 64), (97, 64), (2, 5, 64), (0, 64)])
def test_quantized_forward_against_float64_with_the_dequantized_weight(method, kind, shape):
    base = QUANTIZED[kind](nn.Linear(64, 40))
    layer = make(method, base, **({"shift": True} if method == "vefa" else {}))
    w0 = dequantized_weight(base)
    x = torch.randn(shape)
    out = layer(x)
    assert out.shape == shape[:-1] + (40,)
    assert rel_err(out, float64_oracle(method, layer, w0, base.bias, x)) < 1e-5


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-8bit", "torchao-int8"])
@pytest.mark.parametrize("method", METHODS)
def test_quantized_training_moves_the_adapters_only(method, kind):
    base = QUANTIZED[kind](nn.Linear(33, 17))
    stored = base.weight.detach().clone() if kind != "torchao-int8" else dequantized_weight(base).clone()
    layer = make(method, base)
    params = [p for p in layer.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in layer.parameters(recurse=False)}
    optimizer = torch.optim.SGD(params, lr=0.1)
    x = torch.randn(9, 33, requires_grad=True)
    before = [p.detach().clone() for p in params]
    layer(x).square().mean().backward()
    assert x.grad is not None and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
    after = base.weight if kind != "torchao-int8" else dequantized_weight(base)
    assert torch.equal(after, stored)


def test_bfloat16_compute_4bit_base():
    base = bnb_4bit(nn.Linear(64, 32), compute_dtype=torch.bfloat16)
    layer = make("lorfa", base)
    assert layer.lora_A.dtype == torch.float32  # adapters stay float32 on half-precision compute
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, float64_oracle("lorfa", layer, dequantized_weight(base), base.bias, x)) < 2e-2


def test_bnb_cpu_repacking_cannot_break_a_wrapped_layer():
    """On CPUs with AVX512-BF16 an eval-mode, no-grad forward would repack the
    4-bit weight into a CPU-only layout; a wrapped layer switches that off."""
    base = bnb_4bit(nn.Linear(48, 24))
    layer = make("vefa", base)
    assert base.support_avx512bf16_for_cpu is False
    stored = base.weight.detach().clone()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(3, 48))
    assert torch.equal(base.weight, stored)
    layer.train()
    x = torch.randn(4, 48)
    out = layer(x)
    assert rel_err(out, float64_oracle("vefa", layer, dequantized_weight(base), base.bias, x)) < 1e-5


def test_quantized_merge_refuses_by_default_and_requantizes_on_request():
    base = bnb_4bit(nn.Linear(64, 32))
    original = base.weight
    original_bytes = base.weight.detach().clone()
    layer = make("vefa", base, shift=True)
    x = torch.randn(5, 64)
    adapted = layer(x)
    with pytest.raises(ValueError, match=r"merging re-quantizes its weight and loses precision.*merge\(requantize=True\)"):
        layer.merge()
    with pytest.raises(ValueError, match=r"dequantize=True"):
        featadapt.merge_adapters(nn.Sequential(layer))
    with pytest.warns(UserWarning, match=r"re-quantized .* relative error"):
        layer.merge(requantize=True)
    assert layer.merged and 0 < layer.requantization_error < 0.2
    # the merged layer computes with the re-quantized weight: close, not equal
    assert rel_err(layer(x), adapted) < 0.2
    layer.unmerge()
    assert base.weight is original and torch.equal(base.weight, original_bytes)
    assert torch.equal(layer(x), adapted)


def test_8bit_requantizing_merge_and_unmerge():
    base = bnb_8bit(nn.Linear(40, 24))
    layer = make("lora", base)
    x = torch.randn(6, 40)
    adapted = layer(x)
    with pytest.warns(UserWarning):
        layer.merge(requantize=True)
    assert rel_err(layer(x), adapted) < 0.05
    layer.unmerge()
    assert torch.equal(layer(x), adapted)


def test_torchao_requantizing_merge_is_refused():
    layer = make("vefa", torchao_int8(nn.Linear(16, 8)))
    with pytest.raises(ValueError, match=r"re-quantizing a Linear with a Int8Tensor weight is not supported"):
        layer.merge(requantize=True)


@pytest.mark.parametrize("kind", list(QUANTIZED))
def test_unload_dequantizes_on_request(kind):
    model = nn.Sequential(QUANTIZED[kind](nn.Linear(32, 16)), nn.ReLU(), nn.Linear(16, 3))
    featadapt.inject(model, "lorfa", r=2)
    randomise(model[0])
    x = torch.randn(4, 32)
    out = model(x)
    with pytest.raises(ValueError, match="loses precision"):
        featadapt.unload(copy.deepcopy(model), merge=True)
    plain = featadapt.unload(copy.deepcopy(model), merge=True, dequantize=True)
    assert type(plain[0]) is nn.Linear and plain[0].weight.dtype == torch.float32
    assert rel_err(plain(x), out) < 1e-5
    kept = featadapt.unload(model, merge=False)
    assert featadapt.nn.bases.base_kind(kept[0]) == "quantized"


def test_dynamic_activation_quantization_is_refused_at_inject():
    quantization = pytest.importorskip("torchao.quantization")
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 2))
    quantization.quantize_(model[0], quantization.Int8DynamicActivationInt8WeightConfig(), filter_fn=None)
    with pytest.raises(TypeError, match=r"\(Linear with a Int8Tensor weight\) gives no gradient to its input"):
        featadapt.inject(model, "vefa")


def test_fused_backend_by_name_is_refused_on_black_boxes():
    with pytest.raises(ValueError, match=r"backend='triton' cannot run here"):
        VeFABlackBox(nn.Conv2d(3, 3, 1), backend="triton")


def test_4bit_model_inject_save_and_reload_into_a_fresh_4bit_model(tmp_path):
    def model():
        torch.manual_seed(5)
        full = nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 24), nn.GELU(), nn.Linear(24, 3))
        return nn.Sequential(bnb_4bit(full[0]), full[1], bnb_8bit(full[2]), full[3], full[4])

    net = model()
    names = featadapt.inject(net, "vefa", shift=True)  # all-linear: both quantized layers, not the head
    assert names == ["0", "2"]
    for _, layer in featadapt.model.adapter_layers(net):
        randomise(layer)
    x = torch.randn(5, 24)
    out = net(x)
    featadapt.save_adapters(net, tmp_path)
    fresh = model()
    featadapt.load_adapters(fresh, tmp_path)
    assert torch.equal(fresh(x), out)


def test_inject_guards_every_4bit_layer_of_the_model():
    model = nn.Sequential(bnb_4bit(nn.Linear(16, 16)), bnb_4bit(nn.Linear(16, 16)), nn.Linear(16, 2))
    featadapt.inject(model, "vefa", target_modules=["0"])
    assert model[1].support_avx512bf16_for_cpu is False  # not adapted, but inside the adapted model


def test_torchao_files_round_trip(tmp_path):
    def model():
        torch.manual_seed(2)
        return nn.Sequential(torchao_int8(nn.Linear(20, 12)), nn.ReLU(), nn.Linear(12, 3))

    net = model()
    featadapt.inject(net, "lora", r=2)
    randomise(net[0])
    x = torch.randn(4, 20)
    featadapt.save_adapters(net, tmp_path)
    fresh = model()
    featadapt.load_adapters(fresh, tmp_path)
    assert torch.equal(fresh(x), net(x))
