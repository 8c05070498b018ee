import json
import os

import pytest
import torch
from torch import nn

import featadapt
from featadapt import adapter_files

OPTIONS = {"vefa": {"shift": True}, "lorfa": {"r": 3, "alpha": 5}, "lora": {"r": 3, "alpha": 5, "rslora": True}}


def mlp(width=11):
    torch.manual_seed(7)  # the same "pretrained" weights every time
    return nn.Sequential(nn.Linear(width, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))


def adapted(method, width=11):
    model = mlp(width)
    featadapt.inject(model, method, ["0", "2"], **OPTIONS[method])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("method", OPTIONS)
def test_round_trip_into_a_fresh_model(method, tmp_path):
    model = adapted(method)
    featadapt.save_adapters(model, tmp_path)
    fresh = mlp()
    names = featadapt.load_adapters(fresh, tmp_path)
    assert names == ["0", "2"]
    x = torch.randn(5, 11)
    assert torch.equal(fresh(x), model(x))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_config_records_method_options_targets_and_version(tmp_path):
    featadapt.save_adapters(adapted("lora"), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["method"] == "lora"
    assert config["targets"] == ["0", "2"]
    assert config["featadapt_version"] == featadapt.__version__
    assert config["modules"]["2"] == {"method": "lora", "r": 3, "alpha": 5, "dropout": 0.0, "rslora": True}
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapters.safetensors"]


def test_round_trip_into_an_adapted_and_merged_model(tmp_path):
    model = adapted("lorfa")
    featadapt.save_adapters(model, tmp_path)
    target = mlp()
    featadapt.inject(target, "lorfa", ["0", "2"], **OPTIONS["lorfa"])
    featadapt.merge_adapters(target)
    featadapt.load_adapters(target, tmp_path)
    assert all(layer.merged for _, layer in featadapt.model.adapter_layers(target))
    x = torch.randn(5, 11)
    torch.testing.assert_close(target(x), model(x), rtol=1e-5, atol=1e-6)
    featadapt.unmerge_adapters(target)
    assert torch.equal(target[0].base_layer.weight, mlp()[0].weight)


def test_mixed_methods(tmp_path):
    model = mlp()
    featadapt.inject(model, "vefa", ["0"])
    featadapt.inject(model, "lora", ["2"], r=2)
    featadapt.save_adapters(model, tmp_path)
    fresh = mlp()
    featadapt.load_adapters(fresh, tmp_path)
    assert fresh[0].method == "vefa" and fresh[2].method == "lora"
    assert json.loads((tmp_path / "adapter_config.json").read_text())["method"] == "mixed"


def test_shape_mismatch_names_module_and_both_shapes(tmp_path):
    featadapt.save_adapters(adapted("lora"), tmp_path)
    other = mlp(width=12)
    with pytest.raises(ValueError, match=r"module '0': lora_A has shape \(3, 12\) in the model but \(3, 11\) in the file"):
        featadapt.load_adapters(other, tmp_path)
    assert type(other[0]) is nn.Linear  # nothing was changed


def test_missing_module_is_named(tmp_path):
    featadapt.save_adapters(adapted("vefa"), tmp_path)
    small = nn.Sequential(nn.Linear(11, 16))
    with pytest.raises(ValueError, match="module '2'.*does not have"):
        featadapt.load_adapters(small, tmp_path)


def test_method_or_option_mismatch_is_named(tmp_path):
    featadapt.save_adapters(adapted("lora"), tmp_path)
    model = mlp()
    featadapt.inject(model, "lora", ["0", "2"], r=4)
    with pytest.raises(ValueError, match="module '0' has a lora adapter with .*'r': 4.* the file a lora adapter with .*'r': 3"):
        featadapt.load_adapters(model, tmp_path)
    model = mlp()
    featadapt.inject(model, "vefa", ["0", "2"])
    with pytest.raises(ValueError, match="module '0' has a vefa adapter"):
        featadapt.load_adapters(model, tmp_path)


def test_model_adapters_missing_from_the_file_are_named(tmp_path):
    model = mlp()
    featadapt.inject(model, "vefa", ["0"])
    featadapt.save_adapters(model, tmp_path)
    target = mlp()
    featadapt.inject(target, "vefa", ["0", "2"])
    with pytest.raises(ValueError, match="adapters the file does not: 2"):
        featadapt.load_adapters(target, tmp_path)


def test_saving_a_model_without_adapters_fails(tmp_path):
    with pytest.raises(ValueError, match="no adapter layers"):
        featadapt.save_adapters(mlp(), tmp_path)


def test_loading_a_directory_without_config_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        featadapt.load_adapters(mlp(), tmp_path)


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    first = adapted("lora")
    featadapt.save_adapters(first, tmp_path)
    old_bytes = (tmp_path / "adapters.safetensors").read_bytes()

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(adapter_files, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        featadapt.save_adapters(adapted("lora"), tmp_path)
    assert (tmp_path / "adapters.safetensors").read_bytes() == old_bytes
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapters.safetensors"]


def test_loading_into_a_plain_model_uses_the_given_backend(tmp_path):
    featadapt.save_adapters(adapted("vefa"), tmp_path)
    fresh = mlp()
    featadapt.load_adapters(fresh, tmp_path, backend="reference")
    assert fresh[0].backend == "reference" and fresh[2].backend == "reference"


# -- root=: names relative to a submodule ------------------------------------------


class Wrapper(nn.Module):
    """A model around a "pretrained" body, as a task wrapper puts one: body plus a head."""

    def __init__(self, body):
        super().__init__()
        self.body = body
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("method", OPTIONS)
def test_root_saves_names_relative_to_the_submodule(method, tmp_path):
    wrapped = Wrapper(adapted(method))
    featadapt.save_adapters(wrapped, tmp_path, root=wrapped.body)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["targets"] == ["0", "2"]  # not "body.0", "body.2"

    bare = mlp()  # the body as it ships, without the wrapper
    assert featadapt.load_adapters(bare, tmp_path) == ["0", "2"]
    x = torch.randn(5, 11)
    assert torch.equal(bare(x), wrapped.body(x))

    other = Wrapper(mlp())  # and into the same submodule of another wrapper, named by string
    assert featadapt.load_adapters(other, tmp_path, root="body") == ["0", "2"]
    assert torch.equal(other.body(x), wrapped.body(x))
    # Loading froze the whole model but the adapters, the wrapper's head included.
    assert not any(p.requires_grad for p in other.head.parameters())


def test_a_file_saved_without_root_does_not_load_into_the_bare_body(tmp_path):
    wrapped = Wrapper(adapted("vefa"))
    featadapt.save_adapters(wrapped, tmp_path)
    with pytest.raises(ValueError, match="module 'body.0'.*does not have.*root="):
        featadapt.load_adapters(mlp(), tmp_path)


def test_root_must_hold_every_adapter(tmp_path):
    wrapped = Wrapper(adapted("lora"))
    featadapt.inject(wrapped, "vefa", ["head"])
    with pytest.raises(ValueError, match="root leaves out the adapters head"):
        featadapt.save_adapters(wrapped, tmp_path, root=wrapped.body)
    assert not (tmp_path / "adapter_config.json").exists()


def test_bad_roots_are_named(tmp_path):
    wrapped = Wrapper(adapted("lora"))
    with pytest.raises(ValueError, match="root='encoder' names no submodule"):
        featadapt.save_adapters(wrapped, tmp_path, root="encoder")
    with pytest.raises(ValueError, match="root must be the model or one of its submodules"):
        featadapt.save_adapters(wrapped, tmp_path, root=mlp())
    with pytest.raises(TypeError, match="root must be None, a submodule name or an nn.Module, got int"):
        featadapt.load_adapters(wrapped, tmp_path, root=3)
