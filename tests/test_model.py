import pytest
import torch
from torch import nn

import featadapt
from featadapt.nn import AdapterLinear

transformers = pytest.importorskip("transformers")

OPTIONS = {"vefa": {"shift": True}, "lorfa": {"r": 4, "alpha": 8}, "lora": {"r": 4, "alpha": 8}}
# Learning rates that move each method in a handful of steps on this toy problem.
LEARNING_RATES = {"vefa": 3e-2, "lorfa": 1e-2, "lora": 1e-2}


def small_bert():
    config = transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=32, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        initializer_range=0.2,  # a frozen random head that is not tiny, so adapters can move the logits
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def mlp():
    return nn.Sequential(nn.Linear(11, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))


def test_all_linear_takes_every_linear_but_the_head():
    model = small_bert()
    names = featadapt.inject(model, "lora", r=4)
    linears = 6 * 2 + 1  # q, k, v, attention out, intermediate, output per layer; pooler
    assert len(names) == linears
    assert "classifier" not in names and "bert.pooler.dense" in names
    assert isinstance(model.classifier, nn.Linear) and not isinstance(model.classifier, AdapterLinear)


def test_all_linear_uses_output_embeddings_when_declared():
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=20)
    model = transformers.BertForMaskedLM(config)
    names = featadapt.inject(model, "vefa")
    assert "cls.predictions.decoder" not in names
    assert "cls.predictions.transform.dense" in names


def test_suffix_list_and_regex_targets():
    model = small_bert()
    names = featadapt.inject(model, "lorfa", ["query", "value"], r=2)
    assert len(names) == 4 and all(n.endswith((".query", ".value")) for n in names)
    model = small_bert()
    names = featadapt.inject(model, "vefa", r"bert\.encoder\.layer\.1\..*\.dense")
    assert names == [
        "bert.encoder.layer.1.attention.output.dense",
        "bert.encoder.layer.1.intermediate.dense",
        "bert.encoder.layer.1.output.dense",
    ]


def test_injected_model_freezes_everything_but_adapters():
    model = mlp()
    featadapt.inject(model, "lora", ["0", "2", "4"], r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.{p}" for i in (0, 2, 4) for p in ("lora_A", "lora_B")}
    count, total = featadapt.trainable_parameters(model)
    assert count == 2 * (11 + 16) + 2 * (16 + 16) + 2 * (16 + 3)
    assert total == count + sum(p.numel() for p in mlp().parameters())


def test_print_trainable_parameters(capsys):
    model = mlp()
    featadapt.inject(model, "vefa", ["0"])
    featadapt.print_trainable_parameters(model)
    out = capsys.readouterr().out
    assert "trainable params: 11 ||" in out and "trainable%:" in out


@pytest.mark.parametrize("method", ["vefa", "lorfa", "lora"])
def test_training_a_bert_lowers_the_loss_and_keeps_the_base(method):
    model = small_bert()
    featadapt.inject(model, method, **OPTIONS[method])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATES[method])
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 97, (8, 12), generator=generator)
    labels = torch.randint(0, 2, (8,), generator=generator)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


@pytest.mark.parametrize("method", ["vefa", "lorfa", "lora"])
def test_merge_unmerge_and_unload_on_a_model(method):
    model = small_bert().eval()
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    featadapt.inject(model, method, **OPTIONS[method])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    input_ids = torch.randint(0, 97, (3, 10))
    adapted = model(input_ids=input_ids).logits
    featadapt.merge_adapters(model)
    torch.testing.assert_close(model(input_ids=input_ids).logits, adapted, rtol=1e-4, atol=1e-5)
    featadapt.unmerge_adapters(model)
    for name, layer in featadapt.model.adapter_layers(model):
        assert torch.equal(layer.base_layer.weight, originals[name])
    featadapt.unload(model, merge=True)
    assert not any(isinstance(m, AdapterLinear) for m in model.modules())
    torch.testing.assert_close(model(input_ids=input_ids).logits, adapted, rtol=1e-4, atol=1e-5)


def test_unload_without_merge_restores_the_pretrained_model():
    model = mlp()
    x = torch.randn(4, 11)
    expected = model(x)
    featadapt.inject(model, "lorfa", ["0", "2"], r=2)
    with torch.no_grad():
        model[0].lora_B.normal_()
    featadapt.merge_adapters(model)
    featadapt.unload(model, merge=False)
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))
    assert torch.equal(model(x), expected)


def test_multihead_attention_projection_is_refused():
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(TypeError, match="MultiheadAttention"):
        featadapt.inject(model, "lora", ["out_proj"], r=2)


# -- subclasses with their own forward, target_modules errors, unload of a layer, replace_module --


class ScaledLinear(nn.Linear):
    """An nn.Linear whose own forward an adapter would silently drop."""

    def forward(self, x):
        return 2 * super().forward(x)


class PlainSubclass(nn.Linear):
    """A subclass that keeps nn.Linear's forward: adaptable as any nn.Linear."""


@pytest.mark.parametrize("targets", [["0", "2"], "0|2", "all-linear"])
def test_inject_refuses_a_linear_subclass_with_its_own_forward(targets):
    model = nn.Sequential(nn.Linear(11, 16), nn.GELU(), ScaledLinear(16, 16), nn.GELU(), nn.Linear(16, 3))
    x = torch.randn(4, 11)
    expected = model(x)
    match = (r"module '2' matched target_modules=.* but cannot be adapted: its class ScaledLinear overrides the "
             r"forward of Linear; .* silently dropped and the model's output would change")
    with pytest.raises(TypeError, match=match):
        featadapt.inject(model, "vefa", targets)
    assert type(model[0]) is nn.Linear and type(model[2]) is ScaledLinear
    assert torch.equal(model(x), expected)


def test_inject_takes_a_linear_subclass_that_keeps_linears_forward():
    model = nn.Sequential(PlainSubclass(11, 16), nn.GELU(), nn.Linear(16, 3))
    x = torch.randn(4, 11)
    expected = model(x)
    assert featadapt.inject(model, "lora", r=2) == ["0"]
    torch.testing.assert_close(model(x), expected)


def test_all_linear_leaves_multihead_attentions_out_proj_alone():
    """nn.MultiheadAttention reads out_proj's weight directly: an adapter there would be bypassed."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.up = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.up(self.attention(x, x, x)[0]))

    assert featadapt.inject(Block(), "lora", r=2) == ["up"]


def test_a_bad_regex_in_target_modules_names_the_argument_the_pattern_and_the_problem():
    with pytest.raises(ValueError, match=r"target_modules='\.\*\(query' is not a valid regular expression: "
                                         r"missing \), unterminated subpattern at position 2"):
        featadapt.inject(mlp(), "lora", ".*(query")
    with pytest.raises(TypeError, match=r"target_modules must be 'all-linear', a regex string or a list of "
                                        r"module-name suffixes, got 3"):
        featadapt.inject(mlp(), "lora", 3)


def test_inject_keeps_each_layers_training_flag():
    model = mlp().eval()
    featadapt.inject(model, "lora", ["0"], r=2, dropout=0.5)
    assert not model[0].training
    x = torch.randn(4, 11)
    assert torch.equal(model(x), model(x))  # no adapter dropout in eval mode


@pytest.mark.parametrize("method", ["vefa", "lorfa", "lora"])
@pytest.mark.parametrize("merge", [True, False])
def test_unload_of_a_bare_adapter_layer_returns_its_base(method, merge):
    base = nn.Linear(11, 7)
    original = base.weight.detach().clone()
    layer = featadapt.model.adapter_class(method)(base, **OPTIONS[method])
    with torch.no_grad():
        for param in layer.parameters(recurse=False):
            param.add_(0.1 * torch.randn_like(param))
    x = torch.randn(4, 11)
    adapted = layer(x)
    plain = featadapt.unload(layer, merge=merge)
    assert plain is base and type(plain) is nn.Linear
    assert "" not in dict(layer.named_children()) and list(dict(layer._modules)) == ["base_layer"]
    if merge:
        torch.testing.assert_close(plain(x), adapted, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(plain.weight, original)


def test_replace_module_refuses_the_root_name():
    model = mlp()
    with pytest.raises(ValueError, match=r"replace_module: name must name a submodule of the model, got ''"):
        featadapt.model.replace_module(model, "", nn.Identity())
    assert "" not in model._modules
    featadapt.model.replace_module(model, "1", nn.ReLU())
    assert type(model[1]) is nn.ReLU
