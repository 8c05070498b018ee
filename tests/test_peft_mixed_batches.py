"""Mixed-adapter batches through PEFT: ``model(..., adapter_names=[...])``.

PEFT's own mixed-batch tests for LoRA (tests/test_custom_models.py,
TestMixedAdapterBatches), rewritten for featadapt's VeFAConfig and
LoRFAConfig: the outputs for the base model, adapter 0 and adapter 1 are
computed separately, then one batch alternates between them. Plus what PEFT
leaves implicit: one batched op call per layer, 3-D inputs (GPT-2 with
generate), and `accelerate` running PEFT's own LoRA mixed batches through
the batched op.
"""

import pytest
import torch
from torch import nn

pytest.importorskip("peft", minversion="0.21")

from helpers import tiny_gpt2  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

import featadapt.integrations.peft as fp  # noqa: E402
import featadapt.ops as featadapt_ops  # noqa: E402
from featadapt.integrations.peft import LoRFAConfig, VeFAConfig, accelerate  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning"),
]


class MLP(nn.Module):
    """PEFT's test MLP: the input is passed as X, two linear layers around a dropout."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, X):
        return torch.log_softmax(self.lin1(self.drop(torch.relu(self.lin0(X.float())))), dim=-1)


class Conv1DModel(nn.Module):
    """A transformers Conv1D layer (GPT-2's), as PEFT's conv1d mixed-batch test."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.conv1d = Conv1D(7, 10)
        self.lin1 = nn.Linear(7, 2)

    def forward(self, X):
        return self.lin1(torch.relu(self.conv1d(X.float())))


# Two adapters per method that differ in their options (PEFT uses r=8 and r=16; LoRFA r <= K = 10).
CONFIGS = {
    "vefa": (lambda targets: VeFAConfig(target_modules=targets, init_weights=False),
             lambda targets: VeFAConfig(target_modules=targets, shift=True, init_weights=False)),
    "lorfa": (lambda targets: LoRFAConfig(target_modules=targets, init_weights=False),
              lambda targets: LoRFAConfig(target_modules=targets, r=4, lora_alpha=4, init_weights=False)),
}
METHODS = list(CONFIGS)


def two_adapters(method, targets0=("lin0",), targets1=("lin0",), base=None):
    torch.manual_seed(0)
    base = (base or MLP()).eval()
    config0, config1 = CONFIGS[method]
    model = get_peft_model(base, config0(list(targets0)), "adapter0").eval()
    model.add_adapter("adapter1", config1(list(targets1)))
    return model


def inputs(n=9):
    return {"X": torch.arange(n * 10).view(-1, 10)}


def run_checks(model, inputs):
    """PEFT's check: samples [0, 3, 6] use the base model, [1, 4, 7] adapter 0, [2, 5, 8] adapter 1."""
    name0, name1 = model.peft_config.keys()
    with model.disable_adapter():
        output_base = model(**inputs)
    model.set_adapter(name0)
    output0 = model(**inputs)
    model.set_adapter(name1)
    output1 = model(**inputs)
    assert len(output_base) >= 3
    assert not torch.allclose(output_base, output0)
    assert not torch.allclose(output_base, output1)

    adapters = ["__base__", name0, name1]
    mixed = model.forward(**inputs, adapter_names=[adapters[i % 3] for i in range(len(inputs["X"]))])
    assert torch.allclose(output_base[::3], mixed[::3])
    assert torch.allclose(output0[1::3], mixed[1::3])
    assert torch.allclose(output1[2::3], mixed[2::3])


@pytest.mark.parametrize("method", METHODS)
def test_mixed_adapter_batches_mlp(method):
    run_checks(two_adapters(method), inputs())


@pytest.mark.parametrize("method", METHODS)
def test_mixed_adapter_batches_different_target_layers(method):
    run_checks(two_adapters(method, ["lin0"], ["lin1"]), inputs())


@pytest.mark.parametrize("method", METHODS)
def test_mixed_adapter_batches_partly_overlapping_target_layers(method):
    run_checks(two_adapters(method, ["lin0"], ["lin0", "lin1"]), inputs())


@pytest.mark.parametrize("method", METHODS)
def test_mixed_adapter_batches_conv1d(method):
    run_checks(two_adapters(method, ["conv1d"], ["conv1d"], base=Conv1DModel()), inputs())


@pytest.mark.parametrize("method", METHODS)
def test_mixed_adapter_batches_length_mismatch_raises(method):
    model = two_adapters(method)
    msg = r"Length of `adapter_names` should be the same as the number of inputs, but got "
    with pytest.raises(ValueError, match=msg):
        model.forward(**inputs(), adapter_names=["__base__"] * 5)


@pytest.mark.parametrize("method", METHODS)
def test_mixed_adapter_batches_training_mode_raises(method):
    model = two_adapters(method).train()
    with pytest.raises(ValueError, match=r"Cannot pass `adapter_names` when the model is in training mode."):
        model.forward(**inputs(), adapter_names=["__base__"] * 9)


@pytest.mark.parametrize("method", METHODS)
def test_mixed_adapter_batches_disabled(method):
    """Disabling adapters has precedence over adapter names."""
    model = two_adapters(method)
    with model.disable_adapter():
        output_disabled = model(**inputs())
    adapters = ["__base__", "adapter0", "adapter1"]
    with model.disable_adapter():
        output_mixed = model.forward(**inputs(), adapter_names=[adapters[i % 3] for i in range(9)])
    assert torch.allclose(output_disabled, output_mixed)


@pytest.mark.parametrize("method", METHODS)
def test_mixed_adapter_batches_merged_raises(method):
    model = two_adapters(method)
    model.merge_adapter(["adapter0"])
    msg = r"Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
    with pytest.raises(ValueError, match=msg):
        model.forward(**inputs(), adapter_names=["adapter0"] * 9)


@pytest.mark.parametrize("method", METHODS)
def test_mixed_adapter_batches_unknown_names_raise(method):
    model = two_adapters(method)
    with pytest.raises(ValueError, match=r"Trying to infer with non-existing adapter\(s\): nope, other"):
        model.forward(**inputs(), adapter_names=["adapter0", "nope", "other"] * 3)


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls featadapt's PEFT layers make to the ops, and how many were indexed."""
    calls = {"vefa_linear": 0, "lorfa_linear": 0, "lora_linear": 0, "indexed": 0}

    def spy(name):
        op = getattr(featadapt_ops, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            calls["indexed"] += kwargs.get("adapter_index") is not None
            return op(*args, **kwargs)

        return counted

    for name in ("vefa_linear", "lorfa_linear", "lora_linear"):
        for module in (fp.fused, fp.acceleration):  # where featadapt's PEFT code calls the ops
            if hasattr(module, name):
                monkeypatch.setattr(module, name, spy(name))
    return calls


@pytest.mark.parametrize("method", METHODS)
def test_one_batched_call_per_layer(method, op_calls):
    model = two_adapters(method, ["lin0", "lin1"], ["lin0", "lin1"])
    model(**inputs(), adapter_names=["adapter0", "adapter1", "__base__"] * 3)
    assert op_calls[f"{method}_linear"] == 2 and op_calls["indexed"] == 2


@pytest.mark.parametrize("method", METHODS)
def test_gpt2_mixed_batch_logits_and_greedy_generate(method):
    """3-D inputs (batch, tokens, features) and generate(): each sequence as if run alone."""
    config0, config1 = CONFIGS[method]
    model = get_peft_model(tiny_gpt2(), config0("all-linear"), "adapter0").eval()
    model.add_adapter("adapter1", config1("all-linear"))
    ids = torch.randint(1, 100, (3, 6), generator=torch.Generator().manual_seed(1))
    names = ["adapter1", "__base__", "adapter0"]
    logits = model(input_ids=ids, adapter_names=names).logits
    generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                               max_new_tokens=5, do_sample=False, pad_token_id=0)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model(input_ids=ids[i:i + 1]).logits
                alone_generated = model.generate(input_ids=ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]),
                                                 max_new_tokens=5, do_sample=False, pad_token_id=0)
        else:
            model.set_adapter(name)
            alone = model(input_ids=ids[i:i + 1]).logits
            alone_generated = model.generate(input_ids=ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]),
                                             max_new_tokens=5, do_sample=False, pad_token_id=0)
        torch.testing.assert_close(logits[i:i + 1], alone, rtol=1e-5, atol=1e-5)
        assert torch.equal(generated[i:i + 1], alone_generated)


# -- accelerate: PEFT's own LoRA layers in mixed batches ------------------------


def two_lora_adapters():
    torch.manual_seed(0)
    base = MLP().eval()
    model = get_peft_model(base, LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False),
                           "adapter0").eval()
    model.add_adapter("adapter1", LoraConfig(target_modules=["lin0"], r=16, lora_alpha=4, init_lora_weights=False))
    return model


def test_accelerated_lora_mixed_batch_runs_the_batched_op_and_equals_peft(op_calls):
    model = two_lora_adapters()
    names = ["__base__", "adapter0", "adapter1"] * 3
    peft_mixed = model(**inputs(), adapter_names=names)
    report = accelerate(model)
    assert sorted(report.accelerated) == ["base_model.model.lin0", "base_model.model.lin1"]
    mixed = model(**inputs(), adapter_names=names)
    assert op_calls["lora_linear"] == 2 and op_calls["indexed"] == 2
    torch.testing.assert_close(mixed, peft_mixed, rtol=1e-5, atol=1e-6)
    run_checks(model, inputs())


def test_accelerated_lora_mixed_batch_keeps_peft_errors():
    model = two_lora_adapters()
    accelerate(model)
    with pytest.raises(ValueError, match=r"Length of `adapter_names` should be the same"):
        model(**inputs(), adapter_names=["adapter0"] * 4)
    model.merge_adapter(["adapter0"])
    with pytest.raises(ValueError, match=r"Cannot pass `adapter_names` when there are merged adapters"):
        model(**inputs(), adapter_names=["adapter0"] * 9)


# -- adapter_names travel with the call ---------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_adapter_names_reach_modules_to_save_and_leave_no_hooks(method):
    """PEFT's modules_to_save wrappers get the names too; after the call no hook or
    name is left on the shared modules (a concurrent call would have used them)."""
    torch.manual_seed(0)
    config0, config1 = CONFIGS[method]
    configs = config0(["lin0"]), config1(["lin0"])
    for config in configs:
        config.modules_to_save = ["lin1"]
    model = get_peft_model(MLP().eval(), configs[0], "adapter0")
    model.add_adapter("adapter1", configs[1])
    model.eval()
    with torch.no_grad():
        model.base_model.model.lin1.modules_to_save["adapter1"].weight.mul_(3)
    hooks = {name: len(m._forward_pre_hooks) for name, m in model.named_modules()}
    run_checks(model, inputs())
    assert {name: len(m._forward_pre_hooks) for name, m in model.named_modules()} == hooks
    assert fp.mixed_batches.CALL_ADAPTER_NAMES.get() is None
