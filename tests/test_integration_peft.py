"""featadapt.integrations.peft against the real peft package: VeFA and LoRFA as
PEFT methods, and `accelerate` of PEFT's own IA3 (feedforward) and LoRA layers.

Models are tiny and randomly initialised from a config (no downloads): an MLP
whose second layer has no bias (so VeFA's shift has to create one on merge),
a two-layer BERT with hidden size 32, and a two-layer GPT-2 (transformers'
Conv1D layers, weight stored (in_features, out_features)).
"""

import copy
import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("peft", minversion="0.21")  # featadapt.integrations.peft.MIN_PEFT

from helpers import TOL, rel_err, tiny_gpt2  # noqa: E402
from peft import IA3Config, LoraConfig, PeftModel, PeftType, get_peft_model  # noqa: E402
from peft.mapping import (  # noqa: E402
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import featadapt  # noqa: E402
import featadapt.integrations.peft as fp  # noqa: E402
import featadapt.ops as featadapt_ops  # noqa: E402
from featadapt.integrations.peft import LoRFAConfig, VeFAConfig, accelerate, restore, set_backend  # noqa: E402

# Noise from transformers/PEFT internals that these tests cannot avoid.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning"),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.float64]
TARGETS = ["lin0", "lin1"]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(17, 23)
        self.lin1 = nn.Linear(23, 19, bias=False)
        self.head = nn.Linear(19, 5)

    def forward(self, x):
        return mlp_forward(self, x)


def mlp_forward(base, x, lin0=None, lin1=None):
    """The MLP's forward, with lin0 / lin1 replaced by the given callables."""
    h = torch.relu((lin0 or base.lin0)(x))
    h = torch.relu((lin1 or base.lin1)(h))
    return base.head(h)


def make_mlp(dtype):
    return MLP().to(dtype)


def tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=16,
    )
    return BertModel(config).eval()


def layer(model, name):
    """The (PEFT) layer called `name` inside a PeftModel."""
    return model.base_model.model.get_submodule(name)


def peft_model(base, config):
    """get_peft_model on a copy, so `base` stays the untouched reference."""
    return get_peft_model(copy.deepcopy(base), config)


def w0_of(module):
    """W0 (out_features, in_features) of an nn.Linear, or of a Conv1D: its weight.T."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def vefa_manual(base, model, adapters=("default",), names=TARGETS):
    """Plain torch VeFA for `names` (lin0/lin1) from the model's own parameter
    tensors, adapters applied in order: x -> x ⊙ s + t -> ... -> W0."""

    def apply(name):
        peft_layer, linear = layer(model, name), base.get_submodule(name)

        def forward(h):
            for adapter in adapters:
                h = h * peft_layer.vefa_scale[adapter]
                if adapter in peft_layer.vefa_shift:
                    h = h + peft_layer.vefa_shift[adapter]
            return F.linear(h, w0_of(linear), linear.bias)

        return forward

    return {name: apply(name) for name in names}


def lorfa_manual(base, model, adapters=("default",), names=TARGETS):
    """Plain torch LoRFA: x̃ = x + Σ γ (x Aᵀ) Bᵀ, then W0."""

    def apply(name):
        peft_layer, linear = layer(model, name), base.get_submodule(name)

        def forward(h):
            x_tilde = h
            for adapter in adapters:
                A, B = peft_layer.lorfa_A[adapter], peft_layer.lorfa_B[adapter]
                x_tilde = x_tilde + peft_layer.scaling[adapter] * (h @ A.T) @ B.T
            return F.linear(x_tilde, w0_of(linear), linear.bias)

        return forward

    return {name: apply(name) for name in names}


def adapter_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def assert_close(out, ref, dtype, what="output"):
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:g}"


def assert_grads_close(out, ref, params, dtype):
    """Gradients of <out, dy> and <ref, dy> w.r.t. params agree (and are non-zero)."""
    dy = torch.randn_like(out)
    names = list(params)
    got = torch.autograd.grad(out, [params[n] for n in names], dy)
    want = torch.autograd.grad(ref, [params[n] for n in names], dy)
    for name, g, w in zip(names, got, want):
        assert w.abs().sum() > 0, f"{name}: reference gradient is zero; the test would not see a bug"
        assert_close(g, w, dtype, f"d{name}")


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------


def test_methods_are_registered_as_real_peft_type_members():
    for name, config_cls, model_cls in (("VEFA", VeFAConfig, fp.VeFAModel), ("LORFA", LoRFAConfig, fp.LoRFAModel)):
        member = PeftType[name]
        assert isinstance(member, PeftType) and member.value == name  # transformers reads .value
        assert PeftType(name) is member and member in list(PeftType)
        assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is config_cls
        assert PEFT_TYPE_TO_TUNER_MAPPING[member] is model_cls
        assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == model_cls.prefix == name.lower() + "_"
    assert VeFAConfig(target_modules=["a"]).peft_type is PeftType.VEFA
    assert LoRFAConfig(target_modules=["a"]).peft_type is PeftType.LORFA


def test_peft_stays_an_optional_dependency():
    script = textwrap.dedent(
        """
        import sys
        import featadapt, featadapt.integrations
        assert "peft" not in sys.modules, "import featadapt imported peft"
        sys.modules["peft"] = None  # as if peft were not installed
        try:
            import featadapt.integrations.peft
        except ImportError as exc:
            assert "pip install featadapt[peft]" in str(exc), exc
        else:
            raise AssertionError("no ImportError without peft")
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


def test_registration_survives_a_second_import_and_a_reload():
    saved = dict(vars(fp))
    import featadapt.integrations.peft  # noqa: F401  (a second import is a no-op)

    try:
        importlib.reload(fp.tuners)  # new tuner classes,
        importlib.reload(fp)  # and the registration runs again with them
        assert fp.VeFAModel is not saved["VeFAModel"]
        assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.VEFA] is fp.VeFAModel
        assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LORFA] is fp.LoRFAConfig
        assert [member.name for member in PeftType].count("VEFA") == 1
        model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), fp.VeFAConfig(target_modules=["0"]))
        assert type(model.base_model) is fp.VeFAModel
    finally:
        # Back to the classes this file imported, registered again.
        vars(fp).update(saved)
        vars(fp.tuners).update(VeFAModel=saved["VeFAModel"], LoRFAModel=saved["LoRFAModel"])
        fp.register()
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.VEFA] is saved["VeFAModel"]


@pytest.mark.parametrize(
    "config_cls, kwargs, message",
    [
        (VeFAConfig, {}, "VeFAConfig: target_modules is required"),
        (VeFAConfig, {"target_modules": [1]}, "VeFAConfig: target_modules must contain only strings, got [1]"),
        (VeFAConfig, {"target_modules": ["a"], "shift": 1}, "VeFAConfig: shift must be True or False, got 1"),
        (VeFAConfig, {"target_modules": "lin.*", "layers_to_transform": [0]},
         "layers_to_transform works only with a list"),
        (LoRFAConfig, {"target_modules": ["a"], "r": 0}, "LoRFAConfig: r must be an integer >= 1, got 0"),
        (LoRFAConfig, {"target_modules": ["a"], "r": 2.5}, "LoRFAConfig: r must be an integer >= 1, got 2.5"),
        (LoRFAConfig, {"target_modules": ["a"], "lora_alpha": float("nan")},
         "lora_alpha must be a finite real number, got nan"),
        (LoRFAConfig, {"target_modules": ["a"], "lora_dropout": 1.0},
         "lora_dropout must be a number in [0, 1), got 1.0"),
        (LoRFAConfig, {"target_modules": ["a"], "use_rslora": "yes"}, "use_rslora must be True or False, got 'yes'"),
    ],
)
def test_bad_config_values_name_the_argument(config_cls, kwargs, message):
    with pytest.raises(ValueError) as info:
        config_cls(**kwargs)
    assert message in str(info.value)


def test_bad_targets_name_the_module():
    base = make_mlp(torch.float32)
    with pytest.raises(ValueError, match=r"r must be at most in_features=17 for module 'lin0', got 18"):
        peft_model(base, LoRFAConfig(r=18, target_modules=["lin0"]))
    embedding = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(TypeError, match=r"VeFA: module '0' is a Embedding, which featadapt's VeFA layers cannot "
                                        r"wrap: an nn.Embedding has no input features to transform"):
        get_peft_model(embedding, VeFAConfig(target_modules=["0"]))

    class OwnForwardConv1D(Conv1D):  # e.g. a quantized Conv1D: the merge could not know what it computes
        def forward(self, x):
            return super().forward(x)

    with pytest.raises(TypeError, match=r"LoRFA: module '0' is a OwnForwardConv1D, which .* cannot wrap: "
                                        r"its class overrides the forward of Conv1D"):
        get_peft_model(nn.Sequential(OwnForwardConv1D(4, 3)), LoRFAConfig(r=2, target_modules=["0"]))
    mha = nn.MultiheadAttention(4, 2)
    with pytest.raises(TypeError, match=r"VeFAPeftLinear: cannot wrap a NonDynamicallyQuantizableLinear: "
                                        r"nn.MultiheadAttention reads its out_proj's weight directly"):
        fp.VeFAPeftLinear(mha.out_proj, "default", VeFAConfig(target_modules=["0"]))


# ---------------------------------------------------------------------------
# The methods' math, through featadapt's ops
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift", [False, True])
def test_vefa_equals_plain_torch_math(dtype, shift):
    base = make_mlp(dtype)
    model = peft_model(base, VeFAConfig(target_modules=TARGETS, shift=shift, init_weights=False))
    x = torch.randn(2, 3, 17, dtype=dtype)
    out = model(x)
    ref = mlp_forward(base, x, **vefa_manual(base, model))
    assert out.dtype == dtype and rel_err(ref, base(x)) > 1e-3  # the adapter matters
    assert_close(out, ref, dtype)
    assert_grads_close(out, ref, adapter_params(model), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rslora", [False, True])
def test_lorfa_equals_plain_torch_math(dtype, rslora):
    base = make_mlp(dtype)
    config = LoRFAConfig(r=3, lora_alpha=5, use_rslora=rslora, target_modules=TARGETS, init_weights=False)
    model = peft_model(base, config)
    assert layer(model, "lin0").scaling["default"] == (5 / 3 ** 0.5 if rslora else 5 / 3)
    x = torch.randn(2, 3, 17, dtype=dtype)
    out = model(x)
    ref = mlp_forward(base, x, **lorfa_manual(base, model))
    assert rel_err(ref, base(x)) > 1e-3
    assert_close(out, ref, dtype)
    assert_grads_close(out, ref, adapter_params(model), dtype)


@pytest.mark.parametrize("config", [VeFAConfig(target_modules=TARGETS), LoRFAConfig(target_modules=TARGETS)])
def test_a_new_adapter_starts_as_the_base_model(config):
    base = make_mlp(torch.float64)
    x = torch.randn(4, 17, dtype=torch.float64)
    assert_close(peft_model(base, copy.deepcopy(config))(x), base(x), torch.float64)


@pytest.mark.parametrize("config", [VeFAConfig(target_modules=TARGETS, shift=True, init_weights=False),
                                    LoRFAConfig(target_modules=TARGETS, init_weights=False)])
def test_layers_call_featadapt_ops_through_the_backend_dispatch(config, monkeypatch):
    base = make_mlp(torch.float32)
    model = peft_model(base, config)
    x = torch.randn(4, 17)
    expected = model(x)
    monkeypatch.setenv("FEATADAPT_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="FEATADAPT_BACKEND='no-such-backend' names no backend"):
        model(x)
    assert set_backend(model, "reference") == 2  # an explicit backend beats the environment
    assert_close(model(x), expected, torch.float32)
    with pytest.raises(ValueError, match="set_backend: unknown backend 'bogus'"):
        set_backend(model, "bogus")


def test_gradients_reach_only_adapter_parameters():
    base = make_mlp(torch.float32)
    model = peft_model(base, LoRFAConfig(r=2, target_modules=TARGETS, init_weights=False))
    model(torch.randn(4, 17)).square().sum().backward()
    for name, param in model.named_parameters():
        is_adapter = ".lorfa_A." in name or ".lorfa_B." in name
        assert param.requires_grad == is_adapter, name
        if is_adapter:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize(
    "config, expected",
    [
        (VeFAConfig(target_modules=TARGETS), 17 + 23),
        (VeFAConfig(target_modules=TARGETS, shift=True), 2 * (17 + 23)),
        (LoRFAConfig(r=4, target_modules=TARGETS), 2 * 4 * 17 + 2 * 4 * 23),
    ],
)
def test_print_trainable_parameters_counts_only_adapter_parameters(config, expected, capsys):
    base = make_mlp(torch.float32)
    model = peft_model(base, config)
    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    base_count = sum(p.numel() for p in base.parameters())
    assert f"trainable params: {expected:,} || all params: {base_count + expected:,}" in printed, printed


# ---------------------------------------------------------------------------
# PEFT's model-level API
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, peft_type, prefix",
    [
        (VeFAConfig(target_modules=["query", "value", "dense"], shift=True, init_weights=False), "VEFA", "vefa_"),
        (LoRFAConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_weights=False), "LORFA", "lorfa_"),
    ],
)
def test_save_pretrained_and_from_pretrained_round_trip(config, peft_type, prefix, tmp_path):
    base = tiny_bert()
    model = peft_model(base, config).eval()
    ids = torch.randint(0, 50, (2, 7))
    out = model(input_ids=ids).last_hidden_state
    assert rel_err(out, base(input_ids=ids).last_hidden_state) > 1e-4
    model.save_pretrained(tmp_path)

    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == peft_type
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    trainable = adapter_params(model)
    assert len(tensors) == len(trainable) and all(f".{prefix}" in key for key in tensors)

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert type(loaded.base_model) is type(model.base_model)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference by default
    assert torch.equal(loaded(input_ids=ids).last_hidden_state, out)
    trainable_again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert set(adapter_params(trainable_again)) == set(trainable)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [VeFAConfig(target_modules=TARGETS, shift=True, init_weights=False),
                                    LoRFAConfig(r=3, target_modules=TARGETS, init_weights=False)],
                         ids=["vefa", "lorfa"])
def test_merge_and_unload_equals_the_unmerged_model(dtype, config):
    base = make_mlp(dtype)
    model = peft_model(base, copy.deepcopy(config))
    x = torch.randn(5, 17, dtype=dtype)
    with torch.no_grad():
        out = model(x)
        merged = model.merge_and_unload()
        assert type(merged.lin0) is nn.Linear and type(merged.lin1) is nn.Linear
        assert (merged.lin1.bias is not None) == isinstance(config, VeFAConfig)  # VeFA's shift became a bias
        assert_close(merged(x), out, dtype)


@pytest.mark.parametrize("config", [VeFAConfig(target_modules=TARGETS, shift=True, init_weights=False),
                                    LoRFAConfig(r=3, target_modules=TARGETS, init_weights=False)],
                         ids=["vefa", "lorfa"])
def test_add_weighted_adapter(config):
    """VeFA: scale 1 + Σ wᵢ(sᵢ − 1), shift Σ wᵢ tᵢ; LoRFA: the input maps add up
    exactly, so the weighted adapter's delta weight is Σ wᵢ ΔWᵢ."""
    torch.manual_seed(4)
    model = peft_model(make_mlp(torch.float64), copy.deepcopy(config))
    second = copy.deepcopy(config)
    if isinstance(config, VeFAConfig):
        second.target_modules, second.shift = ["lin0"], False  # lin1 lacks it: counts as s = 1, t = 0
    model.add_adapter("second", second)
    weights = [0.7, -0.4]
    model.add_weighted_adapter(["default", "second"], weights, "mix")
    assert model.active_adapters == ["default"]  # added, not activated, as in PEFT
    lin0, lin1 = model.base_model.model.lin0, model.base_model.model.lin1
    if isinstance(config, VeFAConfig):
        expected = 1 + 0.7 * (lin0.vefa_scale["default"] - 1) - 0.4 * (lin0.vefa_scale["second"] - 1)
        assert torch.allclose(lin0.vefa_scale["mix"], expected)
        assert torch.allclose(lin1.vefa_scale["mix"], 1 + 0.7 * (lin1.vefa_scale["default"] - 1))
        assert torch.allclose(lin1.vefa_shift["mix"], 0.7 * lin1.vefa_shift["default"])
    else:
        for layer in (lin0, lin1):
            assert layer.r["mix"] == 6 and layer.scaling["mix"] == 1.0
            combined = 0.7 * layer.get_delta_weight("default") - 0.4 * layer.get_delta_weight("second")
            assert rel_err(layer.get_delta_weight("mix"), combined) < 1e-12
    model.set_adapter("mix")
    x = torch.randn(3, 17, dtype=torch.float64)
    assert torch.isfinite(model(x)).all()
    with pytest.raises(ValueError, match="an adapter named 'mix' exists already"):
        model.add_weighted_adapter(["default"], [1.0], "mix")
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        model.add_weighted_adapter(["nope"], [1.0], "other")
    with pytest.raises(ValueError, match="one number per adapter"):
        model.add_weighted_adapter(["default", "second"], [1.0], "other")
    if isinstance(config, LoRFAConfig):
        with pytest.raises(ValueError, match="combination_type must be 'cat'"):
            model.add_weighted_adapter(["default"], [1.0], "other", combination_type="svd")


@pytest.mark.parametrize("config", [VeFAConfig(target_modules=TARGETS, init_weights=False),
                                    LoRFAConfig(r=3, target_modules=TARGETS, init_weights=False)],
                         ids=["vefa", "lorfa"])
def test_safe_merge_names_the_broken_adapter_in_peft_words(config):
    model = peft_model(make_mlp(torch.float32), copy.deepcopy(config))
    model.add_adapter("second", copy.deepcopy(config))
    with torch.no_grad():
        param = next(p for n, p in model.named_parameters() if ".second" in n and "lin0" in n)
        param.fill_(float("nan"))
    model.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter second seems to be broken"):
        model.merge_and_unload(safe_merge=True)


@pytest.mark.parametrize("config", [VeFAConfig(target_modules=TARGETS, shift=True, init_weights=False),
                                    LoRFAConfig(r=3, target_modules=TARGETS, init_weights=False)],
                         ids=["vefa", "lorfa"])
def test_merge_adapter_and_unmerge_restore_the_base_weights_exactly(config):
    base = make_mlp(torch.float32)
    model = peft_model(base, copy.deepcopy(config))
    x = torch.randn(5, 17)
    with torch.no_grad():
        out = model(x)
        model.merge_adapter()
        assert layer(model, "lin0").merged
        assert_close(model(x), out, torch.float32)
        with model.disable_adapter():  # as PEFT: disabling a merged layer unmerges it
            assert torch.equal(model(x), base(x))
        assert not layer(model, "lin0").merged
        model.merge_adapter()
        model.unmerge_adapter()
        for name in TARGETS:
            assert torch.equal(layer(model, name).base_layer.weight, base.get_submodule(name).weight)
        assert layer(model, "lin1").base_layer.bias is None
        assert torch.equal(model(x), out)


@pytest.mark.parametrize("config", [VeFAConfig(target_modules=TARGETS, shift=True, init_weights=False),
                                    LoRFAConfig(r=3, target_modules=TARGETS, init_weights=False)],
                         ids=["vefa", "lorfa"])
def test_disable_adapter_gives_the_base_output(config):
    base = make_mlp(torch.float32)
    model = peft_model(base, config)
    x = torch.randn(5, 17)
    out = model(x)
    with model.disable_adapter():
        assert torch.equal(model(x), base(x))
    assert torch.equal(model(x), out)


@pytest.mark.parametrize("method", ["vefa", "lorfa"])
def test_named_adapters_switch_with_set_adapter_and_compose_when_active_together(method):
    dtype = torch.float64
    if method == "vefa":
        make, manual = (lambda: VeFAConfig(target_modules=TARGETS, shift=True, init_weights=False)), vefa_manual
    else:
        make, manual = (lambda: LoRFAConfig(r=2, target_modules=TARGETS, init_weights=False)), lorfa_manual
    base = make_mlp(dtype)
    model = peft_model(base, make())
    model.add_adapter("second", make())
    x = torch.randn(5, 17, dtype=dtype)
    first = model(x)
    assert_close(first, mlp_forward(base, x, **manual(base, model, ["default"])), dtype)

    model.set_adapter("second")
    second = model(x)
    assert rel_err(second, first) > 1e-3
    assert_close(second, mlp_forward(base, x, **manual(base, model, ["second"])), dtype)
    assert all(".second" in name for name in adapter_params(model))  # only the active adapter trains
    model.set_adapter("default")
    assert torch.equal(model(x), first)

    # Several active adapters: VeFA composes them in order, LoRFA adds them up;
    # merging them gives the same layer.
    model.base_model.set_adapter(["default", "second"])
    both = model(x)
    assert_close(both, mlp_forward(base, x, **manual(base, model, ["default", "second"])), dtype)
    with torch.no_grad():
        assert_close(model.merge_and_unload()(x), both, dtype)


def test_transformers_adapter_methods_take_featadapt_configs(tmp_path):
    reason = fp.adapter_methods_unsupported_reason()
    if reason is not None:  # transformers demands a peft that is not installed (the pins avoid it)
        pytest.skip(reason)
    base = tiny_bert()
    ids = torch.randint(0, 50, (2, 7))
    ref = base(input_ids=ids).last_hidden_state
    model = copy.deepcopy(base)
    model.add_adapter(VeFAConfig(target_modules=["value", "dense"], init_weights=False), adapter_name="featadapt")
    assert isinstance(model.encoder.layer[0].attention.self.value, fp.VeFAPeftLinear)
    out = model(input_ids=ids).last_hidden_state
    assert rel_err(out, ref) > 1e-4
    model.disable_adapters()
    assert torch.equal(model(input_ids=ids).last_hidden_state, ref)
    model.enable_adapters()
    model.save_pretrained(tmp_path)
    other = copy.deepcopy(base)
    other.load_adapter(str(tmp_path), adapter_name="featadapt")
    assert torch.equal(other(input_ids=ids).last_hidden_state, out)
    # PEFT's own methods keep working beside featadapt's registration.
    other.add_adapter(LoraConfig(target_modules=["query"], init_lora_weights=False), adapter_name="lora")
    assert other.active_adapters() == ["lora"]
    assert rel_err(other(input_ids=ids).last_hidden_state, ref) > 1e-4
    other.set_adapter("featadapt")
    assert torch.equal(other(input_ids=ids).last_hidden_state, out)


def test_transformers_adapter_methods_name_both_versions_when_peft_is_too_old(monkeypatch):
    """Where transformers needs a newer peft (5.24 wants 0.22 while 0.21.2 is the
    newest), its adapter methods fail with featadapt's error naming both versions
    and PEFT's own API, which keeps working with the same pair."""
    import peft
    import transformers
    from transformers.integrations import peft as hf_peft

    monkeypatch.setattr(hf_peft, "MIN_PEFT_VERSION", "99.0.0")
    reason = fp.adapter_methods_unsupported_reason()
    assert f"transformers {transformers.__version__}" in reason
    assert "peft>=99.0.0" in reason and f"peft {peft.__version__} is installed" in reason
    model = tiny_bert()
    with pytest.raises(fp.PeftVersionError, match=r"add_adapter: transformers .* need peft>=99\.0\.0") as error:
        model.add_adapter(VeFAConfig(target_modules=["value"]), adapter_name="featadapt")
    assert isinstance(error.value, ValueError)  # what transformers' own check raises
    with pytest.raises(fp.PeftVersionError, match="load_adapter"):
        model.load_adapter("unused-path", adapter_name="featadapt")
    # PEFT's API does not go through those methods.
    peft_model = get_peft_model(model, VeFAConfig(target_modules=["value"], init_weights=False))
    ids = torch.randint(0, 50, (2, 7))
    assert torch.isfinite(peft_model(input_ids=ids).last_hidden_state).all()


def test_adapter_method_guard_is_installed_once():
    from transformers.integrations.peft import PeftAdapterMixin

    from featadapt.integrations import transformers_adapters

    before = PeftAdapterMixin.add_adapter
    transformers_adapters.guard_adapter_methods()
    assert PeftAdapterMixin.add_adapter is before
    assert fp.adapter_methods_unsupported_reason() is None or "peft>=" in fp.adapter_methods_unsupported_reason()


# ---------------------------------------------------------------------------
# transformers' Conv1D (GPT-2): W0 is the free view conv.weight.T
# ---------------------------------------------------------------------------

GPT2_CONV1D = [f"transformer.h.{i}.{name}" for i in range(2)
               for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
GPT2_METHODS = {
    # "all-linear" is PEFT's: every nn.Linear and Conv1D but the output layer (lm_head).
    "vefa": (lambda **kw: VeFAConfig(target_modules="all-linear", shift=True, **kw), GPT2_CONV1D),
    "lorfa": (lambda **kw: LoRFAConfig(r=4, target_modules=["c_attn", "c_fc"], **kw),
              [n for n in GPT2_CONV1D if n.endswith(("c_attn", "c_fc"))]),
}
GPT2_LAYERS = {"vefa": fp.VeFAPeftLinear, "lorfa": fp.LoRFAPeftLinear}
GPT2_MANUAL = {"vefa": vefa_manual, "lorfa": lorfa_manual}


def gpt2_ids(batch=2, length=9):
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(3))


def gpt2_adapted(model):
    """{name relative to the GPT-2: the PEFT layer} for every tuner layer in a PeftModel."""
    inner = model.base_model.model
    return {name: m for name, m in inner.named_modules() if isinstance(m, BaseTunerLayer)}


def gpt2_reference(base, manual):
    """A copy of `base` whose adapted Conv1D layers return `manual`'s plain-torch forward instead."""
    ref = copy.deepcopy(base)
    for name, forward in manual.items():
        ref.get_submodule(name).register_forward_hook(lambda module, args, out, f=forward: f(args[0]))
    return ref


@pytest.mark.parametrize("method", GPT2_METHODS)
def test_gpt2_adapts_exactly_the_conv1d_layers_in_place(method):
    make, names = GPT2_METHODS[method]
    base = tiny_gpt2().eval()
    model = copy.deepcopy(base)
    weights = {n: (m.weight, m.weight.data_ptr()) for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert sorted(weights) == sorted(GPT2_CONV1D)
    model = get_peft_model(model, make())
    adapted = gpt2_adapted(model)
    assert sorted(adapted) == sorted(names)
    inner = model.base_model.model
    for name, (weight, ptr) in weights.items():
        module = inner.get_submodule(name)
        if name in names:  # wrapped around the Conv1D itself: its weight neither copied nor transposed
            assert type(module) is GPT2_LAYERS[method] and type(module.base_layer) is Conv1D
            assert module.base_layer.weight is weight and weight.data_ptr() == ptr
            assert (module.in_features, module.out_features) == tuple(weight.shape)
        else:
            assert type(module) is Conv1D
    assert type(inner.lm_head) is nn.Linear  # "all-linear" leaves the output layer out, as PEFT does
    assert inner.lm_head.weight is inner.transformer.wte.weight  # still tied
    ids = gpt2_ids()
    with torch.no_grad():
        assert_close(model(ids).logits, base(ids).logits, torch.float32, "logits at init")


@pytest.mark.parametrize("method", GPT2_METHODS)
def test_gpt2_equals_plain_torch_math_with_w0_from_the_conv1d_weight(method):
    dtype = torch.float64
    make, names = GPT2_METHODS[method]
    base = tiny_gpt2().to(dtype).eval()
    model = peft_model(base, make(init_weights=False))
    ids = gpt2_ids()
    out = model(ids).logits
    ref = gpt2_reference(base, GPT2_MANUAL[method](base, model, names=names))(ids).logits
    assert rel_err(ref, base(ids).logits) > 1e-3  # the adapters matter
    assert_close(out, ref, dtype, "logits")
    assert_grads_close(out, ref, adapter_params(model), dtype)
    # get_delta_weight is (out_features, in_features), from W0 = conv.weight.T.
    for name, peft_layer in gpt2_adapted(model).items():
        w0 = base.get_submodule(name).weight.T
        if method == "vefa":
            effective = w0 * peft_layer.vefa_scale["default"]
        else:
            A, B = peft_layer.lorfa_A["default"], peft_layer.lorfa_B["default"]
            effective = w0 + peft_layer.scaling["default"] * w0 @ B @ A
        delta = peft_layer.get_delta_weight("default")
        assert delta.shape == w0.shape == (peft_layer.out_features, peft_layer.in_features)
        assert_close(delta, effective - w0, dtype, f"{name} delta weight")


@pytest.mark.parametrize("method", GPT2_METHODS)
def test_gpt2_merge_writes_the_conv1d_layout_and_unmerge_is_exact(method):
    make, names = GPT2_METHODS[method]
    base = tiny_gpt2().eval()
    model = peft_model(base, make(init_weights=False))
    ids = gpt2_ids()
    layers = gpt2_adapted(model)
    with torch.no_grad():
        out = model(ids).logits
        deltas = {n: m.get_delta_weight("default") for n, m in layers.items()}
        ptrs = {n: m.base_layer.weight.data_ptr() for n, m in layers.items()}
        model.merge_adapter()
        for name, peft_layer in layers.items():
            weight, original = peft_layer.base_layer.weight, base.get_submodule(name).weight
            # merged in the Conv1D's own (in_features, out_features) storage
            assert peft_layer.merged and weight.shape == original.shape and weight.data_ptr() == ptrs[name]
            assert_close(weight, original + deltas[name].T, torch.float32, f"{name} merged weight")
        assert_close(model(ids).logits, out, torch.float32, "merged logits")
        model.unmerge_adapter()
        for name, peft_layer in layers.items():
            conv, original = peft_layer.base_layer, base.get_submodule(name)
            assert torch.equal(conv.weight, original.weight) and torch.equal(conv.bias, original.bias), name
            assert conv.weight.is_contiguous()
        assert torch.equal(model(ids).logits, out)

        unloaded = model.merge_and_unload()
        for name in GPT2_CONV1D:
            assert type(unloaded.get_submodule(name)) is Conv1D, name
        assert type(unloaded.lm_head) is nn.Linear
        assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
        assert_close(unloaded(ids).logits, out, torch.float32, "unloaded logits")


@pytest.mark.parametrize("method", GPT2_METHODS)
def test_gpt2_save_pretrained_and_from_pretrained_round_trip(method, tmp_path):
    make, names = GPT2_METHODS[method]
    base = tiny_gpt2().eval()
    model = peft_model(base, make(init_weights=False)).eval()
    ids = gpt2_ids()
    with torch.no_grad():
        out = model(ids).logits
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        adapted = gpt2_adapted(loaded)
        assert sorted(adapted) == sorted(names)
        assert all(type(m.base_layer) is Conv1D for m in adapted.values())
        assert torch.equal(loaded(ids).logits, out)


@pytest.mark.parametrize("method", GPT2_METHODS)
def test_gpt2_gradients_reach_only_adapter_parameters(method):
    make, names = GPT2_METHODS[method]
    model = peft_model(tiny_gpt2(), make(init_weights=False))
    ids = gpt2_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    keys = (".vefa_scale.", ".vefa_shift.") if method == "vefa" else (".lorfa_A.", ".lorfa_B.")
    adapters = 0
    for name, param in model.named_parameters():
        is_adapter = any(key in name for key in keys)
        adapters += is_adapter
        assert param.requires_grad == is_adapter, name
        if is_adapter:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    assert adapters == 2 * len(names)


# ---------------------------------------------------------------------------
# accelerate: PEFT's IA3 (feedforward) and LoRA layers on featadapt's ops
# ---------------------------------------------------------------------------


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls `accelerate`d layers make to featadapt's ops."""
    calls = {"vefa_linear": 0, "lora_linear": 0}

    def spy(name):
        op = getattr(featadapt_ops, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return op(*args, **kwargs)

        return counted

    for name in calls:
        for module in (fp.fused, fp.acceleration):  # where featadapt's PEFT code calls the ops
            if hasattr(module, name):
                monkeypatch.setattr(module, name, spy(name))
    return calls


def check_accelerated_matches_peft(model, x, dtype, op_calls, op, expected_names):
    """Output and adapter gradients with and without `accelerate` agree, and
    the accelerated run really calls featadapt's `op` once per layer."""
    params = adapter_params(model)
    ref = model(x)
    assert op_calls[op] == 0
    report = accelerate(model)
    assert report.accelerated == expected_names and report.skipped == {}
    out = model(x)
    assert op_calls[op] == len(expected_names)
    assert_close(out, ref, dtype)
    assert_grads_close(out, ref, params, dtype)
    clone = copy.deepcopy(model)  # the copy's forward runs the copy's own layers
    clone_layer = clone.base_model.model.lin0
    assert clone_layer.forward.layer is clone_layer
    assert torch.equal(clone(x), out)
    assert restore(model) == expected_names
    model(x)
    assert op_calls[op] == 2 * len(expected_names)  # the clone's calls; restored: PEFT's forward again


@pytest.mark.parametrize("dtype", DTYPES)
def test_accelerate_ia3_feedforward_equals_peft(dtype, op_calls):
    base = make_mlp(dtype)
    config = IA3Config(target_modules=TARGETS, feedforward_modules=TARGETS, init_ia3_weights=False)
    model = peft_model(base, config)
    check_accelerated_matches_peft(model, torch.randn(2, 3, 17, dtype=dtype), dtype, op_calls, "vefa_linear",
                                   ["base_model.model.lin0", "base_model.model.lin1"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rslora", [False, True])
def test_accelerate_lora_equals_peft(dtype, rslora, op_calls):
    base = make_mlp(dtype)
    config = LoraConfig(r=3, lora_alpha=5, use_rslora=rslora, target_modules=TARGETS, init_lora_weights=False)
    model = peft_model(base, config)
    check_accelerated_matches_peft(model, torch.randn(2, 3, 17, dtype=dtype), dtype, op_calls, "lora_linear",
                                   ["base_model.model.lin0", "base_model.model.lin1"])


def test_accelerate_lora_on_a_transformer(op_calls):
    base = tiny_bert()
    model = peft_model(base, LoraConfig(r=4, target_modules=["query", "value", "dense"], init_lora_weights=False))
    ids = torch.randint(0, 50, (2, 7))
    ref = model(input_ids=ids).last_hidden_state
    report = accelerate(model)
    assert len(report.accelerated) == 2 * 5 + 1 and report.skipped == {}  # q, v, 3 dense per layer; the pooler
    out = model(input_ids=ids).last_hidden_state
    assert op_calls["lora_linear"] == 2 * 5 + 1
    assert_close(out, ref, torch.float32)


def test_accelerate_lora_dropout_uses_the_layers_p(op_calls):
    dtype = torch.float64
    base = make_mlp(dtype)
    model = peft_model(base, LoraConfig(r=3, lora_alpha=5, lora_dropout=0.3, target_modules=TARGETS,
                                        init_lora_weights=False))
    x = torch.randn(6, 17, dtype=dtype)
    model.eval()
    ref = model(x)
    accelerate(model)
    assert_close(model(x), ref, dtype)  # eval: no dropout on either side

    # Training: the fused op draws its own mask (not nn.Dropout's), so compare
    # with lora_linear called directly with the layer's p and the same seeds.
    model.train()
    torch.manual_seed(7)
    out = model(x)
    torch.manual_seed(7)

    def fused(name):
        peft_layer = layer(model, name)
        return lambda h: featadapt.lora_linear(
            h, peft_layer.base_layer.weight, peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight,
            peft_layer.base_layer.bias, scaling=peft_layer.scaling["default"], dropout_p=0.3,
        )

    expected = mlp_forward(base, x, lin0=fused("lin0"), lin1=fused("lin1"))
    assert rel_err(out, ref) > 1e-3  # dropout did something
    assert_close(out, expected, dtype)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_params(model).values())


def _conv_model():
    class WithConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.lin0 = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin0(self.conv(x).mean((2, 3)))

    return WithConv()


def _two_active_lora(base):
    model = peft_model(base, LoraConfig(r=2, target_modules=["lin0"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["lin0"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    return model


def _forward_replaced(base):
    model = peft_model(base, LoraConfig(r=2, target_modules=["lin0"], init_lora_weights=False))
    peft_layer = layer(model, "lin0")
    peft_layer.forward = lambda x, _layer=peft_layer: type(_layer).forward(_layer, x)  # e.g. an accelerate hook
    return model


@pytest.mark.parametrize(
    "build, skipped_name, reason",
    [
        (lambda b: peft_model(b, IA3Config(target_modules=["lin0"], feedforward_modules=[])),
         "lin0", "IA3 in output mode"),
        (lambda b: peft_model(b, LoraConfig(r=2, target_modules=["lin0"], use_dora=True)),
         "lin0", "adapter 'default' is a LoRA variant (DoraLinearVariant"),
        (lambda b: peft_model(b, LoraConfig(r=2, target_modules=["lin0"], lora_bias=True)),
         "lin0", "adapter 'default' has lora_bias=True"),
        (lambda b: peft_model(_conv_model(), LoraConfig(r=2, target_modules=["conv"])),
         "conv", "peft.tuners.lora.layer.Conv2d is not PEFT's IA3 or LoRA Linear layer"),
        (_two_active_lora, "lin0", "2 active adapters ['default', 'other']"),
        (_forward_replaced, "lin0", "forward is already replaced"),
    ],
    ids=["ia3-output-mode", "dora", "lora-bias", "conv", "two-active-adapters", "forward-replaced"],
)
def test_accelerate_leaves_unsupported_layers_alone_and_says_why(build, skipped_name, reason, op_calls):
    model = build(make_mlp(torch.float32))
    x = torch.randn(2, 3, 4, 4) if skipped_name == "conv" else torch.randn(4, 17)
    ref = model(x)
    report = accelerate(model)
    name = "base_model.model." + skipped_name
    assert name in report.skipped and reason in report.skipped[name], report.skipped
    assert name not in report.accelerated and f"skipped: {name}" in str(report)
    assert torch.equal(model(x), ref)
    assert op_calls == {"vefa_linear": 0, "lora_linear": 0}


def test_accelerate_still_leaves_peft_lora_on_conv1d_alone(op_calls):
    model = peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    report = accelerate(model)
    assert report.accelerated == [] and len(report.skipped) == 2
    assert all("its base layer is a Conv1D" in reason for reason in report.skipped.values()), report.skipped
    model(gpt2_ids())
    assert op_calls == {"vefa_linear": 0, "lora_linear": 0}


def test_accelerated_layers_keep_peft_behaviour_when_merged_disabled_or_switched(op_calls):
    dtype = torch.float64
    base = make_mlp(dtype)
    model = peft_model(base, LoraConfig(r=3, target_modules=TARGETS, init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS, init_lora_weights=False))
    x = torch.randn(5, 17, dtype=dtype)

    def peft_outputs():
        """PEFT's own outputs for: default, other, default+other, merged default, disabled."""
        with torch.no_grad():
            outputs = {}
            for active in (["default"], ["other"], ["default", "other"]):
                model.base_model.set_adapter(active)
                outputs["+".join(active)] = model(x)
            model.set_adapter("default")
            model.merge_adapter()
            outputs["merged"] = model(x)
            model.unmerge_adapter()
            with model.disable_adapter():
                outputs["disabled"] = model(x)
        return outputs

    ref = peft_outputs()
    assert len(accelerate(model).accelerated) == 2
    calls_before = op_calls["lora_linear"]
    got = peft_outputs()
    # Fused for "default" and "other" (2 layers each); PEFT's forward otherwise.
    assert op_calls["lora_linear"] - calls_before == 4
    for key, value in ref.items():
        assert_close(got[key], value, dtype, key)
    assert_close(got["disabled"], base(x), dtype)  # PEFT's LoRA unmerge subtracts: close, not bit-exact


def test_accelerate_checks_its_arguments():
    with pytest.raises(TypeError, match="accelerate: model must be a torch.nn.Module"):
        accelerate("not a model")
    with pytest.raises(ValueError, match="accelerate: unknown backend 'bogus'"):
        accelerate(nn.Linear(2, 2), backend="bogus")
