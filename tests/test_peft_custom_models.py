"""PEFT's custom-model cases (its tests/test_custom_models.py, the IA3 and LoRA
rows) for VeFAConfig and LoRFAConfig: small models built from nn.Linear,
nn.Embedding + transformers' Conv1D, and nn.Conv1d/2d/3d, run through PEFT's
own API — get_peft_model, merge_adapter / unmerge_adapter, merge_and_unload
(safe_merge), disable_adapter, add/set/delete_adapter, save_pretrained /
from_pretrained (low_cpu_mem_usage), half-precision forwards, training.

Each adapted model is also checked against an oracle that does not use
featadapt's layers: the plain model with a forward pre-hook that transforms
the targeted layers' inputs (VeFA ``x ⊙ s + t``, LoRFA ``x + γ (x Aᵀ) Bᵀ``
over the input channels), in float64.

Rows that cannot apply are refused with a clear error (`REFUSED`): an
nn.Embedding has no input features; LoRFA's low-rank map would mix the groups
of a grouped convolution; VeFA's shift would miss a zero-padded convolution's
padding; nn.MultiheadAttention reads its out_proj's weight directly.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("peft", minversion="0.21")
pytest.importorskip("transformers")

from peft import PeftModel, get_peft_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from featadapt.integrations.peft import LoRFAConfig, VeFAConfig  # noqa: E402
from helpers import rel_err  # noqa: E402

# ---------------------------------------------------------------------------
# Models: input X is (9, 10), float (token ids for EmbConv1D)
# ---------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, X):
        return torch.log_softmax(self.lin1(self.drop(torch.relu(self.lin0(X)))), dim=-1)


class EmbConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)  # in 5, out 1, weight stored (5, 1)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, X):
        h = torch.relu(self.conv1d(self.emb(X.long())))  # (9, 10, 1)
        return torch.log_softmax(self.lin0(h.flatten(1)), dim=-1)


class ConvModel(nn.Module):
    """A convolution, then flattened into a linear layer lin0."""

    def __init__(self, conv, reshape, flat):
        super().__init__()
        self.conv, self.reshape = conv, reshape
        self.lin0 = nn.Linear(flat, 2)

    def forward(self, X):
        h = self.conv(X.reshape(self.reshape))
        return torch.log_softmax(self.lin0(torch.relu(h).flatten(1)), dim=-1)


MODELS = {
    "MLP": MLP,
    "EmbConv1D": EmbConv1D,
    "Conv1d": lambda: ConvModel(nn.Conv1d(1, 3, 2), (-1, 1, 10), 27),
    "Conv2d": lambda: ConvModel(nn.Conv2d(5, 10, 3), (-1, 5, 3, 3), 10),
    "Conv2dPadded": lambda: ConvModel(nn.Conv2d(5, 6, 3, padding=1), (-1, 5, 3, 3), 54),
    "Conv2dGroups": lambda: ConvModel(nn.Conv2d(5, 10, 3, groups=5), (-1, 5, 3, 3), 10),
    "Conv3d": lambda: ConvModel(nn.Conv3d(5, 4, 2), (-1, 5, 3, 3, 2), 16),
}


def build(model_id, dtype=torch.float32):
    torch.manual_seed(0)
    return MODELS[model_id]().to(dtype).eval()


def inputs(model_id, dtype=torch.float32):
    X = torch.arange(90, dtype=torch.float64).view(9, 10)
    if model_id == "EmbConv1D":
        return {"X": X.long()}
    if model_id.startswith("Conv3d"):
        X = torch.cat([X, X + 90], dim=0)  # 180 values: two 5×3×3×2 samples
    return {"X": (X / 30).to(dtype)}  # values up to 3: the log-softmax stays informative


CASES = [
    ("MLP", VeFAConfig, {"target_modules": "lin0"}),
    ("MLP", VeFAConfig, {"target_modules": ["lin0", "lin1"]}),
    ("MLP", VeFAConfig, {"target_modules": ["lin1"], "shift": True}),
    ("MLP", VeFAConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("MLP", LoRFAConfig, {"target_modules": "lin0", "r": 4}),
    ("MLP", LoRFAConfig, {"target_modules": ["lin0", "lin1"], "r": 4, "lora_alpha": 8, "lora_dropout": 0.1}),
    ("MLP", LoRFAConfig, {"target_modules": ["lin0"], "r": 4, "use_rslora": True, "modules_to_save": ["lin1"]}),
    ("EmbConv1D", VeFAConfig, {"target_modules": ["conv1d"]}),
    ("EmbConv1D", VeFAConfig, {"target_modules": ["conv1d", "lin0"], "shift": True}),
    ("EmbConv1D", LoRFAConfig, {"target_modules": ["conv1d"], "r": 2}),
    ("EmbConv1D", LoRFAConfig, {"target_modules": ["conv1d", "lin0"], "r": 2}),
    ("Conv1d", VeFAConfig, {"target_modules": ["conv"], "shift": True}),
    ("Conv1d", LoRFAConfig, {"target_modules": ["conv"], "r": 1}),
    ("Conv2d", VeFAConfig, {"target_modules": ["conv"]}),
    ("Conv2d", VeFAConfig, {"target_modules": ["conv", "lin0"], "shift": True}),
    ("Conv2d", LoRFAConfig, {"target_modules": ["conv"], "r": 3}),
    ("Conv2d", LoRFAConfig, {"target_modules": ["conv", "lin0"], "r": 3, "lora_alpha": 6}),
    ("Conv2dPadded", VeFAConfig, {"target_modules": ["conv"]}),
    ("Conv2dPadded", LoRFAConfig, {"target_modules": ["conv"], "r": 2}),
    ("Conv2dGroups", VeFAConfig, {"target_modules": ["conv"]}),
    ("Conv3d", VeFAConfig, {"target_modules": ["conv"], "shift": True}),
    ("Conv3d", LoRFAConfig, {"target_modules": ["conv", "lin0"], "r": 2}),
]
IDS = [f"{model}-{cls.__name__[:-6]}-{i}" for i, (model, cls, _) in enumerate(CASES)]

REFUSED = [
    ("EmbConv1D", VeFAConfig, {"target_modules": ["emb"]}, TypeError,
     r"module 'emb' is a Embedding, which featadapt's VeFA layers cannot wrap: an nn.Embedding has no input "
     r"features to transform"),
    ("EmbConv1D", LoRFAConfig, {"target_modules": ["emb", "conv1d"], "r": 2}, TypeError,
     r"module 'emb' is a Embedding, which featadapt's LoRFA layers cannot wrap"),
    ("Conv2dGroups", LoRFAConfig, {"target_modules": ["conv"], "r": 2}, ValueError,
     r"grouped and depthwise convolutions \(groups=5\) are not supported"),
    ("Conv2dPadded", VeFAConfig, {"target_modules": ["conv"], "shift": True}, ValueError,
     r"shift=True on a convolution that pads with zeros \(padding=\(1, 1\)\)"),
]


def config_for(cls, kwargs, init_weights=True):
    return cls(**copy.deepcopy(kwargs), init_weights=init_weights)


def adapted(model_id, cls, kwargs, init_weights=False, dtype=torch.float32, **peft_kwargs):
    return get_peft_model(build(model_id, dtype), config_for(cls, kwargs, init_weights), **peft_kwargs)


def with_other_adapter(model_id, cls, kwargs, seed):
    """An adapted model in eval mode (adapter "default", active) with a second
    random adapter "other" added with the same config."""
    model = adapted(model_id, cls, kwargs).eval()
    torch.manual_seed(seed)
    model.add_adapter("other", config_for(cls, kwargs, init_weights=False))
    return model


def run(model, model_id, dtype=torch.float32):
    return model(**inputs(model_id, dtype))


def tuner_layers(model):
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


# ---------------------------------------------------------------------------
# The oracle: the plain model, its targeted layers' inputs transformed by hooks
# ---------------------------------------------------------------------------


def _channel_dim(layer, x):
    spatial = len(layer.kernel_size) if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else 0
    return x.dim() - spatial - 1


def _plain_copy(peft_model, model_id):
    """The base model in float64 with the weights `peft_model` computes with (its
    base layers', and the active copy of a module in modules_to_save)."""
    plain = build(model_id, torch.float64)
    wrapped = peft_model.get_base_model()
    for name, module in plain.named_modules():
        if not list(module.parameters(recurse=False)):
            continue
        source = wrapped.get_submodule(name)
        if hasattr(source, "modules_to_save"):
            source = source.modules_to_save[source.active_adapter]
        elif isinstance(source, BaseTunerLayer):
            source = source.get_base_layer()
        with torch.no_grad():
            for pname, param in module.named_parameters(recurse=False):
                param.copy_(getattr(source, pname).double())
    return plain


def oracle_output(peft_model, model_id):
    """The same computation without featadapt's layers: a float64 copy of the
    base model whose adapted layers get their input transformed by a pre-hook,
    from the adapter layers' parameters (every active adapter, in order)."""
    plain = _plain_copy(peft_model, model_id)
    for name, layer in peft_model.get_base_model().named_modules():
        if not isinstance(layer, BaseTunerLayer) or not hasattr(layer, "base_layer"):
            continue
        target = plain.get_submodule(name)
        active = [a for a in layer.active_adapters if a in getattr(layer, layer._main_dict)]

        def hook(module, args, layer=layer, active=active):
            (x,) = args
            dim = _channel_dim(module, x)
            h = x.movedim(dim, -1).double()
            if hasattr(layer, "vefa_scale"):  # applied in order: the first adapter transforms x first
                for a in active:
                    h = h * layer.vefa_scale[a].double()
                    if a in layer.vefa_shift:
                        h = h + layer.vefa_shift[a].double()
            else:  # the low-rank maps of x add up
                h = h + sum(layer.scaling[a] * (h @ layer.lorfa_A[a].double().T) @ layer.lorfa_B[a].double().T
                            for a in active)
            return (h.movedim(-1, dim),)

        target.register_forward_pre_hook(hook)
    X = inputs(model_id, torch.float64)
    return plain(**X)


@pytest.mark.parametrize("model_id, cls, kwargs", CASES, ids=IDS)
def test_forward_equals_the_hooked_float64_model(model_id, cls, kwargs):
    model = adapted(model_id, cls, kwargs).eval()
    expected = oracle_output(model, model_id)
    assert rel_err(run(model, model_id), expected) < 1e-5
    assert rel_err(run(model.double(), model_id, torch.float64), expected) < 1e-12


@pytest.mark.parametrize("model_id, cls, kwargs", CASES, ids=IDS)
def test_a_new_adapter_starts_as_the_base_model(model_id, cls, kwargs):
    model = adapted(model_id, cls, kwargs, init_weights=True)
    assert torch.equal(run(model, model_id), run(build(model_id), model_id))


@pytest.mark.parametrize("model_id, cls, kwargs, error, message", REFUSED,
                         ids=[f"{r[0]}-{r[1].__name__}" for r in REFUSED])
def test_rows_that_cannot_apply_are_refused_clearly(model_id, cls, kwargs, error, message):
    with pytest.raises(error, match=message):
        adapted(model_id, cls, kwargs)


def test_multihead_attention_is_refused():
    class MHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(10, 2)

    with pytest.raises(TypeError, match=r"module 'mha.out_proj' is a NonDynamicallyQuantizableLinear, which "
                                        r".* cannot wrap: nn.MultiheadAttention reads its out_proj's weight"):
        get_peft_model(MHA(), VeFAConfig(target_modules=["out_proj"]))
    with pytest.raises(TypeError, match=r"module 'mha' is a MultiheadAttention, which featadapt's LoRFA layers "
                                        r"cannot wrap"):
        get_peft_model(MHA(), LoRFAConfig(target_modules=["mha"], r=2))


# ---------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------

MERGE_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("model_id, cls, kwargs", CASES, ids=IDS)
def test_merge_unmerge_and_merge_and_unload(model_id, cls, kwargs, dtype):
    model = adapted(model_id, cls, kwargs, dtype=dtype).eval()
    base_state = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
    unmerged = run(model, model_id, dtype)
    model.merge_adapter()
    assert all(layer.merged for layer in tuner_layers(model) if hasattr(layer, "merged_adapters"))
    assert rel_err(run(model, model_id, dtype), unmerged) < MERGE_TOL[dtype]
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge_adapter()
    model.unmerge_adapter()
    after = {k: v for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
    assert all(torch.equal(after[k], v) for k, v in base_state.items())  # bit for bit
    assert torch.equal(run(model, model_id, dtype), unmerged)
    merged = model.merge_and_unload(safe_merge=True)
    assert not tuner_layers(merged) and not hasattr(merged, "peft_config")
    assert rel_err(merged(**inputs(model_id, dtype)), unmerged) < MERGE_TOL[dtype]


@pytest.mark.parametrize("model_id, cls, kwargs", CASES, ids=IDS)
def test_safe_merge_refuses_a_broken_adapter_and_leaves_the_base_unchanged(model_id, cls, kwargs):
    model = adapted(model_id, cls, kwargs)
    layer = tuner_layers(model)[0]
    base = layer.get_base_layer()
    before = (base.weight.clone(), None if base.bias is None else base.bias.clone())
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        layer.merge(safe_merge=True)
    assert not layer.merged and torch.equal(base.weight, before[0])
    assert before[1] is None or torch.equal(base.bias, before[1])


@pytest.mark.parametrize("model_id, cls, kwargs", CASES, ids=IDS)
def test_merging_is_deterministic_in_train_mode(model_id, cls, kwargs):
    model = adapted(model_id, cls, kwargs).train()
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    first.merge_adapter()
    second.merge_adapter()
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


# ---------------------------------------------------------------------------
# Adapters on and off, several adapters, deleting
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("model_id, cls, kwargs", CASES, ids=IDS)
def test_disable_adapter_gives_the_base_output_merged_or_not(model_id, cls, kwargs):
    model = adapted(model_id, cls, kwargs).eval()
    base_out = run(build(model_id), model_id)
    out = run(model, model_id)
    with model.disable_adapter():
        assert torch.allclose(run(model, model_id), base_out, atol=1e-6)
    assert torch.equal(run(model, model_id), out)
    model.merge_adapter()
    with model.disable_adapter():  # unmerges, as PEFT's layers do
        assert torch.allclose(run(model, model_id), base_out, atol=1e-6)
    assert torch.allclose(run(model, model_id), out, atol=1e-5)


@pytest.mark.parametrize("model_id, cls, kwargs", CASES, ids=IDS)
def test_two_active_adapters_compose_as_their_merge(model_id, cls, kwargs):
    if kwargs.get("modules_to_save"):
        pytest.skip("PEFT allows one active adapter at a time in a module of modules_to_save")
    model = with_other_adapter(model_id, cls, kwargs, seed=7)
    alone = run(model, model_id)
    model.base_model.set_adapter(["default", "other"])
    both = run(model, model_id)
    assert not torch.allclose(both, alone, atol=1e-5)
    assert rel_err(both, oracle_output(model, model_id)) < 1e-5
    model.merge_adapter()
    assert rel_err(run(model, model_id), both) < 1e-5
    model.unmerge_adapter()
    model.merge_adapter(["default"])  # one after the other equals both at once
    with pytest.warns(UserWarning, match="You are now additionally merging other"):
        model.merge_adapter(["other"])
    assert rel_err(run(model, model_id), both) < 1e-5


@pytest.mark.parametrize("model_id, cls, kwargs", CASES, ids=IDS)
def test_delete_adapter_leaves_no_trace(model_id, cls, kwargs):
    model = adapted(model_id, cls, kwargs)
    model.add_adapter("delete_me", config_for(cls, kwargs))
    model.delete_adapter("delete_me")
    assert model.active_adapters == ["default"]
    for layer in tuner_layers(model):
        for name in layer.adapter_layer_names + layer.other_param_names:
            assert "delete_me" not in getattr(layer, name)
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['default'\] while they are merged"):
        model.delete_adapter("default")
    model.unmerge_adapter()
    model.delete_adapter("default")
    assert model.active_adapters == []
    assert torch.equal(model.base_model(**inputs(model_id)), run(build(model_id), model_id))


# ---------------------------------------------------------------------------
# Training, files, dtypes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("model_id, cls, kwargs", CASES, ids=IDS)
def test_training_moves_only_the_adapters(model_id, cls, kwargs):
    model = adapted(model_id, cls, kwargs, init_weights=True).train()
    prefix = model.base_model.prefix
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        run(model, model_id).sum().backward()
        optimizer.step()
    for name, param in model.named_parameters():
        trainable = prefix in name or "modules_to_save" in name
        assert param.requires_grad == trainable, name
        moved = not torch.allclose(param, before[name], atol=1e-4, rtol=1e-4)
        # LoRFA's A gets no gradient while B is still zero at the first step, but moves after
        assert moved == trainable, name


@pytest.mark.parametrize("model_id, cls, kwargs", CASES, ids=IDS)
def test_save_pretrained_and_load_back_with_low_cpu_mem_usage(model_id, cls, kwargs, tmp_path):
    model = adapted(model_id, cls, kwargs).eval()
    out = run(model, model_id)
    model.save_pretrained(tmp_path)
    for low_cpu_mem_usage in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = PeftModel.from_pretrained(build(model_id), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        assert not [w for w in caught if "adapter keys" in str(w.message)], [str(w.message) for w in caught]
        assert {p.device.type for p in loaded.parameters()} == {"cpu"}
        # equal parameters; the CPU's convolution may round differently with or without autograd
        assert rel_err(run(loaded.eval(), model_id), out) < 1e-6
        loaded.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=low_cpu_mem_usage)
        assert {p.device.type for p in loaded.parameters()} == {"cpu"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("model_id, cls, kwargs", CASES, ids=IDS)
def test_half_precision_forward_merge_and_unload(model_id, cls, kwargs, dtype):
    model = adapted(model_id, cls, kwargs, dtype=dtype).eval()
    prefix = model.base_model.prefix
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if prefix in n)  # PEFT's autocast
    out = run(model, model_id, dtype)
    assert out.dtype == dtype and torch.isfinite(out).all()
    expected = oracle_output(model, model_id)
    assert rel_err(out, expected) < (2e-2 if dtype == torch.bfloat16 else 4e-3)
    model.merge_adapter(safe_merge=True)
    run(model, model_id, dtype)
    model.unmerge_adapter()
    merged = model.merge_and_unload()
    assert rel_err(merged(**inputs(model_id, dtype)), expected) < (3e-2 if dtype == torch.bfloat16 else 5e-3)


@pytest.mark.parametrize("model_id, cls, kwargs", CASES, ids=IDS)
def test_mixed_adapter_batch_equals_each_adapter_alone(model_id, cls, kwargs):
    if kwargs.get("modules_to_save"):
        pytest.skip("modules_to_save with mixed batches is covered by tests/test_peft_mixed_batches.py")
    model = with_other_adapter(model_id, cls, kwargs, seed=11)
    X = inputs(model_id)["X"]
    per_sample = {"default": run(model, model_id)}
    model.set_adapter("other")
    per_sample["other"] = run(model, model_id)
    with model.disable_adapter():
        per_sample["__base__"] = run(model, model_id)
    samples = len(per_sample["default"])
    names = (["default", "other", "__base__"] * samples)[:samples]
    # the models reshape X into `samples` sequences: give one name per sequence
    mixed = model(X=X, adapter_names=names)
    for i, name in enumerate(names):
        assert rel_err(mixed[i], per_sample[name][i]) < 1e-5, (i, name)


def test_the_rows_for_peft_own_suite_build_their_configs():
    """tools/peft_suite_cases.py (what `make peft-suite` adds to PEFT's own file): every row's config builds."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "tools" / "peft_suite_cases.py"
    spec = importlib.util.spec_from_file_location("peft_suite_cases", path)
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)
    assert len({row[0] for row in cases.TEST_CASES}) == len(cases.TEST_CASES)  # PEFT's ids must be unique
    for _, _, cls, kwargs in cases.TEST_CASES:
        cls(**copy.deepcopy(kwargs))
    for _, _, cls, first, second in cases.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES:
        cls(**first), cls(**second)
    assert all(isinstance(c, (VeFAConfig, LoRFAConfig)) for row in cases.MIXED_ADAPTER_TEST_CASES for c in row[1:])


@pytest.mark.parametrize("model_id", ["Conv2d", "Conv3d", "EmbConv1D"])
def test_add_weighted_adapter_on_convolution_and_conv1d_bases(model_id):
    target = ["conv1d"] if model_id == "EmbConv1D" else ["conv"]
    lorfa = with_other_adapter(model_id, LoRFAConfig, {"target_modules": target, "r": 2}, seed=5)
    lorfa.base_model.set_adapter(["default", "other"])
    both = run(lorfa, model_id)
    lorfa.add_weighted_adapter(["default", "other"], [1.0, 1.0], "sum")  # the low-rank maps add up exactly
    lorfa.set_adapter("sum")
    assert rel_err(run(lorfa, model_id), both) < 1e-5

    vefa = with_other_adapter(model_id, VeFAConfig, {"target_modules": target}, seed=6)
    vefa.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mean")
    vefa.set_adapter("mean")
    layer = vefa.get_base_model().get_submodule(target[0])
    expected = 1 + 0.5 * (layer.vefa_scale["default"] - 1) + 0.5 * (layer.vefa_scale["other"] - 1)
    assert torch.allclose(layer.vefa_scale["mean"], expected)
    assert rel_err(run(vefa, model_id), oracle_output(vefa, model_id)) < 1e-5
