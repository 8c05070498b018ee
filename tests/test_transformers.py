"""Adapters on transformers' Conv1D (GPT-2): weight stored (in_features, out_features),
y = x @ weight + bias. The ops get the free view weight.T; nothing is copied."""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import featadapt
from featadapt import LoRALinear, LoRFALinear, VeFALinear
from featadapt.model import adapter_layers
from featadapt.ops.dispatch import get_backend
from featadapt.nn import AdapterLinear
from helpers import TOL, rel_err, tiny_gpt2

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

OPTIONS = {"vefa": {"shift": True}, "lorfa": {"r": 4, "alpha": 8}, "lora": {"r": 4, "alpha": 8}}
CLASSES = {"vefa": VeFALinear, "lorfa": LoRFALinear, "lora": LoRALinear}
CONV1D_NAMES = [f"transformer.h.{i}.{layer}" for i in range(2) for layer in
                ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def perturb(model_or_layer, size=0.1):
    """Give every trainable (adapter) parameter non-trivial values, as training would."""
    with torch.no_grad():
        for param in model_or_layer.parameters():
            if param.requires_grad:
                param.add_(size * torch.randn_like(param))


def input_ids(batch=2, length=9, seed=3):
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def conv1d_weights(model):
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, Conv1D)}


def reference(method, layer, x):
    """The adapted layer in float64, written out with W0 = conv.weight.T."""
    conv = layer.base_layer
    w0 = conv.weight.detach().double().T  # (N, K)
    b = conv.bias.detach().double()
    p = {n: q.double() for n, q in layer.named_parameters(recurse=False)}
    x = x.double()
    if method == "vefa":
        x_tilde = x * p["scale"] + p["shift"]
    elif method == "lorfa":
        x_tilde = x + layer.scaling * (x @ p["lora_A"].T) @ p["lora_B"].T
    else:
        return x @ w0.T + b + layer.scaling * (x @ p["lora_A"].T) @ p["lora_B"].T
    return x_tilde @ w0.T + b


def test_featadapt_does_not_import_transformers():
    code = "import sys, featadapt; assert 'transformers' not in sys.modules, 'transformers was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_all_linear_takes_every_conv1d_and_leaves_the_tied_head():
    model = tiny_gpt2()
    names = featadapt.inject(model, "lora", r=4)
    assert names == CONV1D_NAMES
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, LoRALinear) and isinstance(layer.base_layer, Conv1D)


@pytest.mark.parametrize("head", ["none", "classifier"])
def test_all_linear_without_output_embeddings(head):
    # No output embeddings: the fallback head is the last nn.Linear (the
    # classifier's score), never a Conv1D; without any nn.Linear nothing is left out.
    config = tiny_gpt2().config
    config.num_labels, config.pad_token_id = 3, 0
    model = transformers.GPT2Model(config) if head == "none" else transformers.GPT2ForSequenceClassification(config)
    names = featadapt.inject(model, "vefa")
    prefix = "" if head == "none" else "transformer."
    assert names == [n.replace("transformer.", prefix, 1) for n in CONV1D_NAMES]
    if head == "classifier":
        assert type(model.score) is nn.Linear


def test_conv1d_adapter_shapes_follow_in_and_out_features():
    conv = tiny_gpt2().transformer.h[0].mlp.c_fc  # 32 -> 128, weight (32, 128)
    for method, cls in CLASSES.items():
        layer = cls(copy.deepcopy(conv), **OPTIONS[method])
        assert (layer.in_features, layer.out_features) == (32, 128)
        assert layer.weight.shape == (32, 128)  # the base parameter, as stored
        assert layer.original_weight().shape == layer.effective_weight().shape == (128, 32)
    assert LoRFALinear(copy.deepcopy(conv), r=4).lora_B.shape == (32, 4)
    assert LoRALinear(copy.deepcopy(conv), r=4).lora_B.shape == (128, 4)
    assert VeFALinear(copy.deepcopy(conv)).scale.shape == (32,)


@pytest.mark.parametrize("method", OPTIONS)
def test_inject_keeps_the_conv1d_weight_storage(method):
    model = tiny_gpt2()
    before = {n: (w, w.data_ptr(), w.shape) for n, w in conv1d_weights(model).items()}
    featadapt.inject(model, method, **OPTIONS[method])
    for name, (weight, ptr, shape) in before.items():
        layer = model.get_submodule(name)
        assert layer.base_layer.weight is weight and weight.data_ptr() == ptr and weight.shape == shape
        w0 = layer.original_weight()
        assert w0.data_ptr() == ptr and not w0.is_contiguous()  # the (N, K) view, not a copy


@pytest.mark.parametrize("method", OPTIONS)
def test_starts_equal_to_the_base_model(method):
    base = tiny_gpt2().eval()
    model = copy.deepcopy(base)
    featadapt.inject(model, method, **OPTIONS[method])
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", OPTIONS)
def test_forward_and_gradients_match_the_reference_with_transposed_weight(method):
    block = tiny_gpt2().transformer.h[0]
    for conv in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
        layer = CLASSES[method](conv, **OPTIONS[method])
        perturb(layer, 0.3)
        x = torch.randn(2, 7, layer.in_features, requires_grad=True)
        y = layer(x)
        x64 = x.detach().double().requires_grad_(True)
        y64 = reference(method, layer, x64)
        assert rel_err(y, y64) <= TOL[torch.float32]
        dy = torch.randn_like(y)
        params = [x] + [q for q in layer.parameters() if q.requires_grad]
        grads = torch.autograd.grad(y, params, dy)
        grads64 = torch.autograd.grad(y64, [x64] + params[1:], dy.double(), allow_unused=True)
        # the reference takes float64 copies of the parameters: its gradients flow back to them
        for q, g, g64 in zip(params, grads, grads64):
            assert g64 is not None and rel_err(g, g64) <= TOL[torch.float32]


@pytest.mark.parametrize("method", OPTIONS)
def test_a_training_step_changes_only_adapter_parameters(method):
    model = tiny_gpt2().train()
    featadapt.inject(model, method, **OPTIONS[method])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapter and all(".lora_" in n or n.endswith((".scale", ".shift")) for n in adapter)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = input_ids()
    losses = []
    for _ in range(2):  # LoRA/LoRFA's A gets a gradient once B has moved from 0
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    params = dict(model.named_parameters())
    for name, value in frozen.items():
        assert torch.equal(params[name], value), name
    for name, value in adapter.items():
        assert not torch.equal(params[name], value), f"{name} did not train"


@pytest.mark.parametrize("method", OPTIONS)
def test_merge_unmerge_and_unload_on_gpt2(method):
    base = tiny_gpt2().eval()
    model = copy.deepcopy(base)
    convs = {n: model.get_submodule(n) for n in CONV1D_NAMES}
    featadapt.inject(model, method, **OPTIONS[method])
    perturb(model)
    ids = input_ids()
    originals = {n: w.detach().clone() for n, w in conv1d_weights(base).items()}
    ptrs = {n: m.base_layer.weight.data_ptr() for n, m in adapter_layers(model)}
    with torch.no_grad():
        adapted = model(ids).logits
        effective = {n: m.effective_weight() for n, m in adapter_layers(model)}
        featadapt.merge_adapters(model)
        for name, layer in adapter_layers(model):
            conv = layer.base_layer
            # merged in the Conv1D's own layout and storage
            assert conv.weight.shape == originals[name].shape and conv.weight.data_ptr() == ptrs[name]
            torch.testing.assert_close(conv.weight.T, effective[name], rtol=0, atol=1e-6)
            assert not torch.equal(conv.weight, originals[name])
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-4, atol=1e-5)
        featadapt.unmerge_adapters(model)
        for name, layer in adapter_layers(model):
            assert torch.equal(layer.base_layer.weight, originals[name])
            assert torch.equal(layer.base_layer.bias, base.get_submodule(name).bias)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=0)

        merged = featadapt.unload(copy.deepcopy(model), merge=True)
        assert all(type(merged.get_submodule(n)) is Conv1D for n in CONV1D_NAMES)
        assert not any(isinstance(m, AdapterLinear) for m in merged.modules())
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-4, atol=1e-5)

        featadapt.merge_adapters(model)
        plain = featadapt.unload(model, merge=False)
        assert all(plain.get_submodule(n) is convs[n] for n in CONV1D_NAMES)  # the base layers themselves
        assert torch.equal(plain(ids).logits, base(ids).logits)


@pytest.mark.parametrize("method", OPTIONS)
def test_save_and_load_adapters_on_gpt2(method, tmp_path):
    model = tiny_gpt2().eval()
    featadapt.inject(model, method, **OPTIONS[method])
    perturb(model)
    ids = input_ids()
    featadapt.save_adapters(model, tmp_path)
    fresh = tiny_gpt2().eval()  # the same pretrained weights
    loaded = featadapt.load_adapters(fresh, tmp_path)
    assert loaded == CONV1D_NAMES
    assert all(isinstance(fresh.get_submodule(n).base_layer, Conv1D) for n in CONV1D_NAMES)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


@pytest.mark.usefixtures("true_float32")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("method", OPTIONS)
def test_kernel_backends_read_the_transposed_weight(method, backend):
    """The Triton kernels read the Conv1D's transposed weight through its
    strides: the same logits and adapter gradients as the torch backend, in
    float32. Without a GPU the triton backend runs in Triton's interpreter
    (conftest sets TRITON_INTERPRET=1) and the cuda backend is skipped; on a
    GPU the cuda backend refuses the transposed weight with the reason."""
    try:
        why = get_backend(backend).unavailable_reason()
    except ValueError:
        pytest.skip(f"no {backend!r} backend is registered")
    if why is not None:
        pytest.skip(why)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_gpt2().eval().to(device)
    featadapt.inject(model, method, **OPTIONS[method])
    perturb(model)
    ids = input_ids(length=7).to(device)
    if backend == "cuda":
        # CUTLASS reads row-major weights only: the cuda backend refuses the
        # transposed one, saying so, and automatic dispatch runs it on torch.
        for _, layer in adapter_layers(model):
            layer.backend = "cuda"
        with pytest.raises(featadapt.BackendUnavailableError, match="is not contiguous"):
            model(ids)
        return
    results = {}
    for name in ("torch", backend):
        for _, layer in adapter_layers(model):
            layer.backend = name
        model.zero_grad()
        logits = model(ids).logits
        logits.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[name] = logits.detach(), grads
    (torch_logits, torch_grads), (kernel_logits, kernel_grads) = results["torch"], results[backend]
    assert rel_err(kernel_logits, torch_logits) <= TOL[torch.float32]
    assert set(kernel_grads) == set(torch_grads)
    for name, grad in kernel_grads.items():
        assert rel_err(grad, torch_grads[name]) <= 1e-4, name


def test_errors_name_the_accepted_types(tmp_path):
    with pytest.raises(TypeError, match=r"base_layer must be an nn\.Linear or transformers' Conv1D, got Conv1d"):
        VeFALinear(nn.Conv1d(4, 4, 1))
    model = tiny_gpt2()
    not_linear = r"'transformer\.ln_f' .* is a LayerNorm, not an nn\.Linear, transformers' Conv1D, a quantized linear"
    with pytest.raises(TypeError, match=not_linear):
        featadapt.inject(model, "lora", ["ln_f"], r=2)
    with pytest.raises(ValueError, match=r"no nn\.Linear module matched .* \(nor any transformers' Conv1D\)"):
        featadapt.inject(model, "lora", ["no_such_layer"], r=2)
    featadapt.inject(model, "vefa", ["c_fc"])
    featadapt.save_adapters(model, tmp_path)
    other = nn.Module()
    other.transformer = nn.Module()
    other.transformer.h = nn.ModuleList([nn.Module(), nn.Module()])
    for block in other.transformer.h:
        block.mlp = nn.Module()
        block.mlp.c_fc = nn.Conv1d(32, 128, 1)
    # torch's own Conv1d is a base too (VeFA over its input channels): the file's scales fit it.
    featadapt.load_adapters(other, tmp_path)
    assert isinstance(other.transformer.h[0].mlp.c_fc, featadapt.nn.VeFABlackBox)
    other.transformer.h[1].mlp.c_fc = nn.LayerNorm(32)
    with pytest.raises(TypeError, match=r"'transformer\.h\.1\.mlp\.c_fc' is a LayerNorm, not an nn\.Linear"):
        featadapt.load_adapters(other, tmp_path)
