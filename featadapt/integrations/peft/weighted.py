"""`add_weighted_adapter` for featadapt's PEFT methods: a new adapter that
combines existing ones with weights.

- VeFA: ``scale = 1 + Σ wᵢ (sᵢ − 1)`` and ``shift = Σ wᵢ tᵢ`` — the scale
  vectors combined around 1, their natural origin (the weights need not sum
  to 1: weights (1, 1) add two adapters' changes, (0.5, 0.5) average them).
  An adapter a layer does not carry counts as s = 1, t = 0 there.
- LoRFA (``combination_type="cat"``, the only one): the low-rank input maps
  add up exactly, ``γ B A = Σ wᵢ γᵢ Bᵢ Aᵢ``, by concatenating the factors
  along the rank (r = Σ rᵢ, scaling 1, so lora_alpha = r). Layers that lack
  one of the adapters get zero rows for it.

As in PEFT, the new adapter is added, not activated: `set_adapter` it.
"""

import copy
import math
import numbers

import torch


def _check(tuner, adapters, weights, adapter_name):
    method = type(tuner).__name__
    if not isinstance(adapters, (list, tuple)) or not adapters:
        raise ValueError(f"{method}.add_weighted_adapter: adapters must be a non-empty list of names, got {adapters!r}")
    unknown = [name for name in adapters if name not in tuner.peft_config]
    if unknown:
        raise ValueError(
            f"{method}.add_weighted_adapter: no adapter named {unknown[0]!r}; "
            f"the model has {sorted(tuner.peft_config)}"
        )
    if not isinstance(weights, (list, tuple)) or len(weights) != len(adapters):
        raise ValueError(
            f"{method}.add_weighted_adapter: weights must be a list with one number per adapter "
            f"({len(adapters)}), got {weights!r}"
        )
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ValueError(f"{method}.add_weighted_adapter: weights must be finite real numbers, got {weights!r}")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"{method}.add_weighted_adapter: adapter_name must be a non-empty string, got {adapter_name!r}")
    if adapter_name in tuner.peft_config:
        raise ValueError(
            f"{method}.add_weighted_adapter: an adapter named {adapter_name!r} exists already; "
            "delete_adapter it first or choose another name"
        )


def _combined_config(tuner, adapters, **changes):
    configs = [tuner.peft_config[name] for name in adapters]
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, (set, list, tuple)) for t in targets):
        target_modules = set().union(*map(set, targets))
    elif all(t == targets[0] for t in targets):
        target_modules = targets[0]
    else:
        raise ValueError(
            f"{type(tuner).__name__}.add_weighted_adapter: the adapters select their modules in different ways "
            f"({targets!r}); combining needs them all name lists, or all the same pattern"
        )
    config = copy.deepcopy(configs[0])
    config.target_modules = target_modules
    config.inference_mode = configs[0].inference_mode
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def _add(tuner, adapter_name, config):
    tuner.peft_config[adapter_name] = config
    tuner.inject_adapter(tuner.model, adapter_name)
    return [m for m in tuner.model.modules() if isinstance(m, tuner.tuner_layer_cls)]


@torch.no_grad()
def add_weighted_vefa(tuner, adapters, weights, adapter_name):
    _check(tuner, adapters, weights, adapter_name)
    shift = any(tuner.peft_config[name].shift for name in adapters)
    for layer in _add(tuner, adapter_name, _combined_config(tuner, adapters, shift=shift)):
        if adapter_name not in layer.vefa_scale:
            continue
        scale = torch.ones_like(layer.vefa_scale[adapter_name])
        shifted = torch.zeros_like(scale)
        for name, weight in zip(adapters, weights):
            if name in layer.vefa_scale:
                scale += weight * (layer.vefa_scale[name].to(scale.dtype) - 1)
            if name in layer.vefa_shift:
                shifted += weight * layer.vefa_shift[name].to(scale.dtype)
        layer.vefa_scale[adapter_name].copy_(scale)
        if adapter_name in layer.vefa_shift:
            layer.vefa_shift[adapter_name].copy_(shifted)


@torch.no_grad()
def add_weighted_lorfa(tuner, adapters, weights, adapter_name, combination_type="cat"):
    owner = f"{type(tuner).__name__}.add_weighted_adapter"
    if combination_type != "cat":
        raise ValueError(
            f"{owner}: combination_type must be 'cat' (the exact sum of the low-rank maps), got {combination_type!r}"
        )
    _check(tuner, adapters, weights, adapter_name)
    configs = [tuner.peft_config[name] for name in adapters]
    dropouts = {name: c.lora_dropout for name, c in zip(adapters, configs)}
    if len(set(dropouts.values())) > 1:
        raise ValueError(f"{owner}: the adapters must share lora_dropout to be combined, got {dropouts}")
    rank = sum(c.r for c in configs)
    config = _combined_config(tuner, adapters, r=rank, lora_alpha=rank, use_rslora=False, init_weights=True)
    for layer in _add(tuner, adapter_name, config):
        if adapter_name not in layer.lorfa_A:
            continue
        A, B = layer.lorfa_A[adapter_name], layer.lorfa_B[adapter_name]
        A.zero_()
        B.zero_()
        start = 0
        for name, weight, c in zip(adapters, weights, configs):
            if name in layer.lorfa_A:
                A[start:start + c.r] = layer.lorfa_A[name]
                B[:, start:start + c.r] = weight * layer.scaling[name] * layer.lorfa_B[name]
            start += c.r
