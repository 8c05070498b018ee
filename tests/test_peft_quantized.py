"""VeFAConfig and LoRFAConfig through PEFT on quantized bases (QLoRA-style):
bitsandbytes Linear4bit / Linear8bitLt and torchao weight-only linears.

The oracle is float64 math with each base's dequantized weight (its own
forward equals F.linear with it). Merging into a quantized base is refused by
default; merge_and_unload(requantize=True) re-quantizes (lossy, reported) and
merge_and_unload(dequantize=True) returns float32 layers, exactly merged.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("peft", minversion="0.21")
pytest.importorskip("transformers")

from peft import PeftModel, get_peft_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

from featadapt.integrations.peft import LoRFAConfig, VeFAConfig, set_backend  # noqa: E402
from featadapt.nn.bases import base_kind, dequantized_weight  # noqa: E402
from helpers import rel_err  # noqa: E402
from quantized_bases import QUANTIZED, bnb_4bit  # noqa: E402

CONFIGS = {
    "vefa": lambda **kw: VeFAConfig(target_modules=["up", "down"], shift=True, init_weights=False, **kw),
    "lorfa": lambda **kw: LoRFAConfig(target_modules=["up", "down"], r=4, lora_alpha=8, init_weights=False, **kw),
}


class Net(nn.Module):
    def __init__(self, quantize):
        super().__init__()
        torch.manual_seed(3)
        self.up, self.down, self.head = nn.Linear(32, 48), nn.Linear(48, 24), nn.Linear(24, 3)
        self.up, self.down = quantize(self.up), quantize(self.down)

    def forward(self, x):
        return self.head(F.gelu(self.down(F.gelu(self.up(x)))))


def quantized_net(kind):
    return Net(QUANTIZED[kind])


def oracle(model, x):
    """float64: each adapted layer's input transformed, then F.linear with its dequantized weight."""
    net = model.get_base_model()
    h = x.double()
    for name in ("up", "down"):
        layer = net.get_submodule(name)
        base = layer.get_base_layer()
        for a in layer.active_adapters:
            if hasattr(layer, "vefa_scale"):
                h = h * layer.vefa_scale[a].double() + layer.vefa_shift[a].double()
            else:
                h = h + layer.scaling[a] * (h @ layer.lorfa_A[a].double().T) @ layer.lorfa_B[a].double().T
        h = F.gelu(F.linear(h, dequantized_weight(base).double(), base.bias.double()))
    return F.linear(h, net.head.weight.double(), net.head.bias.double())


@pytest.mark.parametrize("kind", list(QUANTIZED))
@pytest.mark.parametrize("method", list(CONFIGS))
def test_forward_against_float64_with_the_dequantized_weights(method, kind):
    model = get_peft_model(quantized_net(kind), CONFIGS[method]())
    layer = model.get_base_model().up
    assert type(layer).__name__.endswith("PeftBlackBox") and base_kind(layer.get_base_layer()) == "quantized"
    for shape in ((7, 32), (2, 5, 32), (0, 32)):
        x = torch.randn(shape)
        out = model(x)
        assert out.shape == shape[:-1] + (3,)
        assert rel_err(out, oracle(model, x)) < 1e-5


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-8bit", "torchao-int8"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_training_moves_the_adapters_and_leaves_the_quantized_weights(method, kind):
    model = get_peft_model(quantized_net(kind), CONFIGS[method]())
    bases = [model.get_base_model().get_submodule(n).get_base_layer() for n in ("up", "down")]
    stored = [dequantized_weight(b).clone() for b in bases]
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(model.base_model.prefix in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 32)).square().mean().backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, trainable[name]), name
        else:
            assert param.grad is None, name
    assert all(torch.equal(dequantized_weight(b), w) for b, w in zip(bases, stored))


@pytest.mark.parametrize("method", list(CONFIGS))
def test_merging_into_4bit_refuses_by_default_and_requantizes_on_request(method):
    model = get_peft_model(quantized_net("bnb-nf4"), CONFIGS[method]())
    x = torch.randn(6, 32)
    adapted = model(x)
    up = model.get_base_model().up
    original = up.get_base_layer().weight
    with pytest.raises(ValueError, match=r"Linear4bit \(nf4\); merging re-quantizes its weight and loses "
                                         r"precision.*merge_and_unload\(dequantize=True\)"):
        model.merge_adapter()
    assert not up.merged and up.get_base_layer().weight is original
    w0 = dequantized_weight(up.get_base_layer()).clone()
    exact = w0 + up.get_delta_weight("default")
    with pytest.warns(UserWarning, match=r"re-quantized .* relative error"):
        up.merge(requantize=True)
    # the reported error is the re-quantized weight's, against the exact merge
    assert up.merged and up.get_base_layer().weight is not original
    assert up.requantization_error == pytest.approx(rel_err(dequantized_weight(up.get_base_layer()), exact), rel=1e-3)
    assert 0 < up.requantization_error < 0.5
    up.unmerge()
    assert up.get_base_layer().weight is original and torch.equal(model(x), adapted)
    with pytest.warns(UserWarning, match=r"re-quantized"):
        merged = copy.deepcopy(model).merge_and_unload(requantize=True)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert base_kind(merged.up) == "quantized" and rel_err(merged(x), adapted) < 0.5


@pytest.mark.parametrize("kind", list(QUANTIZED))
@pytest.mark.parametrize("method", list(CONFIGS))
def test_merge_and_unload_dequantizes_on_request(method, kind):
    model = get_peft_model(quantized_net(kind), CONFIGS[method]())
    x = torch.randn(5, 32)
    adapted = model(x)
    with pytest.raises(ValueError, match="loses precision"):
        copy.deepcopy(model).merge_and_unload()
    with pytest.raises(ValueError, match="pass requantize=True or dequantize=True, not both"):
        model.merge_and_unload(requantize=True, dequantize=True)
    plain = model.merge_and_unload(dequantize=True)
    assert type(plain.up) is nn.Linear and plain.up.weight.dtype == torch.float32
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    assert rel_err(plain(x), adapted) < 1e-5


def test_torchao_requantizing_is_refused_with_the_way_round():
    model = get_peft_model(quantized_net("torchao-int8"), CONFIGS["vefa"]())
    with pytest.raises(ValueError, match=r"re-quantizing a Linear with a Int8Tensor weight is not supported.*"
                                         r"merge_and_unload\(dequantize=True\)"):
        model.merge_and_unload(requantize=True)


def test_dynamic_activation_quantization_is_refused_naming_the_class():
    quantization = pytest.importorskip("torchao.quantization")
    net = Net(lambda linear: linear)
    quantization.quantize_(net.up, quantization.Int8DynamicActivationInt8WeightConfig(), filter_fn=None)
    with pytest.raises(TypeError, match=r"VeFAPeftBlackBox: the base layer \(Linear with a Int8Tensor weight\) "
                                        r"gives no gradient to its input"):
        get_peft_model(net, CONFIGS["vefa"]())


@pytest.mark.parametrize("kind", list(QUANTIZED))
@pytest.mark.parametrize("method", list(CONFIGS))
def test_save_and_load_into_a_fresh_quantized_model(method, kind, tmp_path):
    model = get_peft_model(quantized_net(kind), CONFIGS[method]())
    x = torch.randn(4, 32)
    out = model.eval()(x)  # from_pretrained gives an eval-mode model; Linear8bitLt computes differently in eval
    model.save_pretrained(tmp_path)
    fresh = PeftModel.from_pretrained(quantized_net(kind), tmp_path)
    assert torch.equal(fresh(x), out)


def test_every_4bit_layer_of_the_model_is_guarded_against_cpu_repacking():
    net = Net(lambda linear: bnb_4bit(linear))
    get_peft_model(net, VeFAConfig(target_modules=["up"]))
    assert net.down.support_avx512bf16_for_cpu is False  # not adapted, but inside the adapted model


@pytest.mark.parametrize("method", list(CONFIGS))
def test_mixed_adapter_batch_on_a_4bit_model(method):
    model = get_peft_model(quantized_net("bnb-nf4"), CONFIGS[method]()).eval()
    torch.manual_seed(9)
    model.add_adapter("other", CONFIGS[method]())
    x = torch.randn(6, 4, 32)
    per = {"default": model(x)}
    model.set_adapter("other")
    per["other"] = model(x)
    with model.disable_adapter():
        per["__base__"] = model(x)
    names = ["other", "__base__", "default", "default", "__base__", "other"]
    mixed = model(x, adapter_names=names)
    for i, name in enumerate(names):
        assert rel_err(mixed[i], per[name][i]) < 1e-5


def test_set_backend_leaves_black_box_layers_alone():
    model = get_peft_model(quantized_net("torchao-int8"), CONFIGS["lorfa"]())
    assert set_backend(model, "triton") == 0
    assert torch.isfinite(model(torch.randn(2, 32))).all()


def test_bfloat16_compute_4bit_model():
    net = Net(lambda linear: bnb_4bit(linear, compute_dtype=torch.bfloat16))
    model = get_peft_model(net, CONFIGS["vefa"]())
    x = torch.randn(3, 32)
    assert rel_err(model(x), oracle(model, x)) < 2e-2


def test_add_weighted_adapter_on_a_4bit_model():
    model = get_peft_model(quantized_net("bnb-nf4"), CONFIGS["lorfa"]()).eval()
    torch.manual_seed(4)
    model.add_adapter("other", CONFIGS["lorfa"]())
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(5, 32)
    both = model(x)
    model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "sum")
    model.set_adapter("sum")
    assert rel_err(model(x), both) < 1e-5
