"""Running PEFT layers on featadapt's fused ops: `set_backend` for featadapt's
own layers, and `accelerate` / `restore` for PEFT's IA3 (feedforward) and
LoRA Linear layers, in place."""

from dataclasses import dataclass, field
from typing import Dict, List

import torch
from peft.tuners.ia3.layer import Linear as _IA3Linear
from peft.tuners.lora.layer import Linear as _LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...nn.bases import LINEAR, is_conv1d
from ...ops import get_backend, lora_linear, vefa_linear
from ...ops.stacking import stack_low_rank
from .fused import LoRFAPeftLinear, VeFAPeftLinear
from .layers import FeatureAdapterLayer, peft_base_kind
from .mixed_batches import mixed_batch_rows

def _check_backend(owner, backend):
    """None, "auto" or a known backend name, lower-cased; raises naming the known ones."""
    if backend is None:
        return None
    if not isinstance(backend, str):
        raise TypeError(f"{owner}: backend must be a string or None, got {type(backend).__name__}")
    name = backend.strip().lower()
    if name == "auto":
        return name
    try:
        get_backend(name)
    except ValueError as exc:
        raise ValueError(f"{owner}: {exc}") from None
    return name


def set_backend(model, backend):
    """Choose the backend of every featadapt layer in `model` that runs a fused op.

    That is the VeFA and LoRFA PEFT layers on ``nn.Linear`` and ``Conv1D``, and
    the layers run by `accelerate`. Layers on quantized and convolution bases
    always compute with torch ops and are left as they are.

    Args:
        model: a ``PeftModel`` or any module holding such layers.
        backend: a backend name (``"torch"``, ``"triton"``, ...), ``"auto"``, or
            None: the ``FEATADAPT_BACKEND`` environment variable, else automatic
            (the default).

    Returns:
        int: how many layers it set.

    Raises:
        TypeError: `backend` is not a string or None.
        ValueError: an unknown backend name.
    """
    backend = _check_backend("set_backend", backend)
    count = 0
    for module in model.modules():
        fused = module.__dict__.get("forward")
        if isinstance(module, (VeFAPeftLinear, LoRFAPeftLinear)):
            module.backend = backend
            count += 1
        elif isinstance(fused, _FusedForward):
            fused.backend = backend
            count += 1
    return count


# ---------------------------------------------------------------------------
# accelerate: PEFT's own IA3 (feedforward) and LoRA layers on featadapt's ops
# ---------------------------------------------------------------------------


@dataclass
class AccelerationReport:
    """What `accelerate` did; ``print(report)`` lists it.

    Attributes:
        accelerated: the names of the layers now on featadapt's fused ops.
        skipped: ``{module name: reason}`` for the PEFT layers left alone.
    """

    accelerated: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)

    def __str__(self):
        lines = [
            f"{len(self.accelerated)} PEFT layer(s) on featadapt's fused ops, "
            f"{len(self.skipped)} left as they were"
        ]
        lines += [f"  accelerated: {name}" for name in self.accelerated]
        lines += [f"  skipped: {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


_IA3, _LORA = "ia3", "lora"


def _is_plain_linear(module):
    """An nn.Linear the fused ops can stand in for: a plain floating-point weight
    and nn.Linear's own forward (what featadapt's PEFT layers put on the fused
    ops, less transformers' Conv1D, whose weight PEFT's layers read transposed)."""
    return peft_base_kind(module) == LINEAR and not is_conv1d(module)


def _adapter_problem(layer, kind, adapter):
    """Why `adapter` of `layer` cannot run on the fused op, or None if it can."""
    if kind == _IA3:
        return None
    variant = layer.lora_variant.get(adapter)
    if variant is not None:
        return f"adapter {adapter!r} is a LoRA variant ({type(variant).__name__}, e.g. DoRA), not plain LoRA"
    if layer.lora_bias.get(adapter, False):
        return f"adapter {adapter!r} has lora_bias=True"
    dropout = layer.lora_dropout[adapter]
    if type(dropout) not in (nn.Identity, nn.Dropout):
        return f"adapter {adapter!r} has a {type(dropout).__name__} dropout, not nn.Dropout"
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A.bias is not None:
        return f"adapter {adapter!r} has non-standard lora_A/lora_B modules"
    return None


def _layer_problem(layer, kind):
    """Why the whole layer cannot run on the fused op (checked once, by `accelerate`)."""
    if kind == _IA3 and not layer.is_feedforward:
        return "IA3 in output mode (not a feedforward module) scales the output, which is not VeFA's math"
    base = layer.base_layer
    if not _is_plain_linear(base):
        return (
            f"its base layer is a {type(base).__name__}, not a plain floating-point nn.Linear "
            "(Conv1D, quantized and wrapped layers stay with PEFT)"
        )
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (the weight is stored transposed)"
    params = layer.ia3_l if kind == _IA3 else layer.lora_A
    for adapter in params:
        problem = _adapter_problem(layer, kind, adapter)
        if problem is not None:
            return problem
    active = [a for a in layer.active_adapters if a in params]
    if len(active) > 1:
        return f"{len(active)} active adapters {active}: the fused op runs one adapter at a time"
    return None


class _FusedForward:
    """A PEFT layer's forward on featadapt's ops, set as the layer's instance
    attribute `forward`. It takes the fused path only in the state it was built
    for (one active plain adapter, not merged, adapters enabled, no extra
    arguments) and otherwise calls the class's own forward, so merging,
    disable_adapter and switching adapters keep PEFT's behaviour."""

    def __init__(self, layer, kind, backend=None):
        self.layer = layer
        self.kind = kind
        self.backend = backend

    def _fused_adapter(self, args, kwargs):
        layer = self.layer
        if args or kwargs or layer.disable_adapters or layer.merged:
            return None
        params = layer.ia3_l if self.kind == _IA3 else layer.lora_A
        active = [a for a in layer.active_adapters if a in params]
        if len(active) != 1 or _adapter_problem(layer, self.kind, active[0]) is not None:
            return None
        return active[0]

    def _mixed_lora_rows(self, x, args, kwargs):
        """For a LoRA mixed-adapter batch (only adapter_names= besides x) that the batched
        op can run: (adapters, adapter_index); None otherwise (PEFT's forward runs it,
        or there is no adapter row: the base layer's output)."""
        layer = self.layer
        if self.kind != _LORA or args or set(kwargs) != {"adapter_names"}:
            return None
        adapter_names = kwargs["adapter_names"]
        layer._check_forward_args(x, adapter_names=adapter_names)  # PEFT's own errors first
        if layer.disable_adapters:
            return None
        rows = mixed_batch_rows(x, adapter_names, layer.lora_A)
        if rows is None or any(_adapter_problem(layer, _LORA, name) is not None for name in rows[0]):
            return None
        if any(isinstance(layer.lora_dropout[name], nn.Dropout) and layer.lora_dropout[name].training
               and layer.lora_dropout[name].p > 0 for name in rows[0]):
            return None  # training-mode dropout per adapter: PEFT's own loop
        return rows

    def __call__(self, x, *args, **kwargs):
        layer = self.layer
        mixed = self._mixed_lora_rows(x, args, kwargs)
        if mixed is not None:
            adapters, adapter_index = mixed
            base = layer.base_layer
            A, B = stack_low_rank([layer.lora_A[name].weight for name in adapters],
                                  [layer.lora_B[name].weight for name in adapters])
            scaling = torch.tensor([layer.scaling[name] for name in adapters], device=x.device)
            return lora_linear(x, base.weight, A, B, base.bias, scaling=scaling, adapter_index=adapter_index,
                               backend=self.backend)
        adapter = self._fused_adapter(args, kwargs)
        if adapter is None:
            return type(layer).forward(layer, x, *args, **kwargs)
        base = layer.base_layer
        if self.kind == _IA3:
            scale = layer.ia3_l[adapter].reshape(-1)  # (1, K) -> (K,), a view: gradients reach ia3_l
            return vefa_linear(x, base.weight, scale, base.bias, backend=self.backend)
        dropout = layer.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        return lora_linear(
            x, base.weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, base.bias,
            scaling=layer.scaling[adapter], dropout_p=p, backend=self.backend,
        )


def accelerate(model, *, backend=None):
    """Run the PEFT IA3 (feedforward) and LoRA Linear layers of `model` on featadapt's fused ops, in place.

    An IA3 layer in feedforward mode computes ``base(x * ia3_l)``, which is VeFA
    without shift (`featadapt.vefa_linear`); a plain LoRA Linear layer is
    `featadapt.lora_linear` with the layer's scaling and dropout. Results equal
    PEFT's own forward up to rounding. A mixed-adapter batch
    (``adapter_names=[...]``) on a LoRA layer runs as one batched call with
    ``adapter_index``. Layers that are merged, have adapters disabled, or run
    several adapters at once fall back to PEFT's forward at call time. Layers it
    cannot take (IA3 on outputs, DoRA and other LoRA variants, ``lora_bias``,
    Conv, Embedding, quantized or Conv1D layers, a forward already replaced by
    someone else) are left alone and listed in the report. `restore` undoes it.

    Args:
        model: a ``PeftModel``, or any module with PEFT layers injected.
        backend: the featadapt backend for these calls; None: the
            ``FEATADAPT_BACKEND`` environment variable, else automatic.

    Returns:
        AccelerationReport: the layers accelerated and those skipped, with why.

    Raises:
        TypeError: `model` is not an ``nn.Module``, or `backend` not a string.
        ValueError: an unknown backend name.

    Example:
        >>> report = accelerate(get_peft_model(model, LoraConfig(r=8, target_modules=["query"])))
        >>> print(report)      # how many layers, and each one skipped with the reason
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: model must be a torch.nn.Module (e.g. a PeftModel), got {type(model).__name__}")
    backend = _check_backend("accelerate", backend)
    report = AccelerationReport()
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if isinstance(module, FeatureAdapterLayer):
            report.skipped[name] = f"a featadapt {module.method} layer: already on featadapt's ops"
            continue
        if type(module) is _IA3Linear:
            kind = _IA3
        elif type(module) is _LoraLinear:
            kind = _LORA
        else:
            report.skipped[name] = (
                f"{type(module).__module__}.{type(module).__name__} is not PEFT's IA3 or LoRA Linear layer "
                "(Conv, Embedding, quantized and other methods' layers stay with PEFT)"
            )
            continue
        existing = module.__dict__.get("forward")
        if existing is not None and not isinstance(existing, _FusedForward):
            report.skipped[name] = "its forward is already replaced by something else (e.g. an accelerate hook)"
            continue
        problem = _layer_problem(module, kind)
        if problem is not None:
            report.skipped[name] = problem
            continue
        module.forward = _FusedForward(module, kind, backend)
        report.accelerated.append(name)
    return report


def restore(model):
    """Undo `accelerate`: the layers run PEFT's own forward again.

    Returns:
        list[str]: the names of the layers restored.
    """
    restored = []
    for name, module in model.named_modules():
        if isinstance(module.__dict__.get("forward"), _FusedForward):
            del module.forward
            restored.append(name)
    return restored
