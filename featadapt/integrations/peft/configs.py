"""VeFAConfig and LoRFAConfig: featadapt's methods' PEFT configurations, checked on construction."""

import math
import numbers
from dataclasses import dataclass, field
from typing import List, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from . import peft_types  # noqa: F401  (adds PeftType.VEFA and PeftType.LORFA)

def check_bool(owner, name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {name} must be True or False, got {value!r}")


def _check_targets(owner, config):
    targets = config.target_modules
    if targets is None:
        raise ValueError(
            f"{owner}: target_modules is required (featadapt has no per-architecture defaults): "
            "a list of module names or name suffixes, a regex string, or 'all-linear'; got None"
        )
    if isinstance(targets, (list, tuple, set)):
        if not all(isinstance(t, str) for t in targets):
            raise ValueError(f"{owner}: target_modules must contain only strings, got {targets!r}")
        config.target_modules = set(targets)  # PEFT's convention for lists
    elif not isinstance(targets, str):
        raise ValueError(
            f"{owner}: target_modules must be a list of module names or a regex string, "
            f"got {type(targets).__name__} {targets!r}"
        )
    if isinstance(config.exclude_modules, (list, tuple)):
        config.exclude_modules = set(config.exclude_modules)
    if isinstance(targets, str):
        for name in ("layers_to_transform", "layers_pattern"):
            if getattr(config, name) is not None:
                raise ValueError(
                    f"{owner}: {name} works only with a list of target_modules, "
                    f"got target_modules={targets!r} (a regex) and {name}={getattr(config, name)!r}"
                )


_TARGET_HELP = (
    "The modules to adapt: a list of module names (a name matches itself and any module whose name ends "
    "with '.' + it), a regex matched against the full module name, or 'all-linear'. nn.Linear layers, "
    "transformers' Conv1D (as in GPT-2), quantized linears (bitsandbytes 4-bit and 8-bit, torchao weight-only) "
    "and nn.Conv1d/2d/3d can be adapted; 'all-linear' takes the linears and leaves out the output layer "
    "(e.g. lm_head)."
)


@dataclass
class _TargetedConfig(PeftConfig):
    """The fields both methods share: which modules to adapt, as in PEFT's own methods."""

    target_modules: Optional[Union[List[str], str]] = field(default=None, metadata={"help": _TARGET_HELP})
    exclude_modules: Optional[Union[List[str], str]] = field(
        default=None, metadata={"help": "Modules not to adapt: names, name suffixes or a regex."}
    )
    modules_to_save: Optional[List[str]] = field(
        default=None, metadata={"help": "Other modules to train and save with the adapter, e.g. a new classifier."}
    )
    layers_to_transform: Optional[Union[List[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices (with a list of target_modules)."}
    )
    layers_pattern: Optional[Union[List[str], str]] = field(
        default=None, metadata={"help": "The name of the layer list that layers_to_transform indexes."}
    )


@dataclass
class VeFAConfig(_TargetedConfig):
    """Configuration of a VeFA adapter: ``y = base(x ⊙ scale + shift)``.

    Args:
        target_modules: the modules to adapt (names, name suffixes, a regex, or
            "all-linear"); required. nn.Linear, transformers' Conv1D,
            quantized linears and nn.Conv1d/2d/3d (not nn.Embedding, which
            has no input features to transform).
        exclude_modules: modules not to adapt (same forms).
        shift: also learn the per-input-channel shift t (starts at 0).
        init_weights: True (default) starts at the identity (scale 1, shift 0);
            False draws random values, for tests only.
        modules_to_save, layers_to_transform, layers_pattern: as in PEFT's LoRA.

    Example:
        >>> model = get_peft_model(base_model, VeFAConfig(target_modules=["query", "value"], shift=True))
    """

    shift: bool = field(default=False, metadata={"help": "Also learn a per-input-channel shift t (starts at 0)."})
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: start at the identity (scale 1, shift 0). False: random values, for tests only."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.VEFA
        _check_targets("VeFAConfig", self)
        check_bool("VeFAConfig", "shift", self.shift)
        check_bool("VeFAConfig", "init_weights", self.init_weights)


@dataclass
class LoRFAConfig(_TargetedConfig):
    """Configuration of a LoRFA adapter: ``y = base(x + γ · dropout(x) Aᵀ Bᵀ)``.

    A is (r, in_features), B is (in_features, r) and starts at 0;
    γ = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.

    Args:
        r: the rank, an integer in [1, in_features] of every adapted layer.
        lora_alpha: the scaling numerator (default 8, as PEFT's LoraConfig).
        lora_dropout: dropout probability on the adapter path's input, in [0, 1).
        use_rslora: γ = lora_alpha / sqrt(r) instead of lora_alpha / r.
        target_modules: the modules to adapt (names, name suffixes, a regex, or
            "all-linear"); required. nn.Linear, transformers' Conv1D,
            quantized linears and nn.Conv1d/2d/3d (not nn.Embedding, which
            has no input features to transform).
        exclude_modules: modules not to adapt (same forms).
        init_weights: True (default) starts at the identity (B = 0); False
            draws a random B too, for tests only.
        modules_to_save, layers_to_transform, layers_pattern: as in PEFT's LoRA.

    Example:
        >>> model = get_peft_model(base_model, LoRFAConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    """

    r: int = field(default=8, metadata={"help": "The rank, an integer in [1, in_features]."})
    lora_alpha: float = field(default=8, metadata={"help": "Scaling numerator: γ = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter path's input, in [0, 1)."})
    use_rslora: bool = field(default=False, metadata={"help": "γ = lora_alpha / sqrt(r) (rank-stabilised)."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: start at the identity (B = 0). False: random B, for tests only."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.LORFA
        owner = "LoRFAConfig"
        r = self.r
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
            raise ValueError(f"{owner}: r must be an integer >= 1, got {r!r}")
        alpha = self.lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
            raise ValueError(f"{owner}: lora_alpha must be a finite real number, got {alpha!r}")
        p = self.lora_dropout
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
            raise ValueError(f"{owner}: lora_dropout must be a number in [0, 1), got {p!r}")
        check_bool(owner, "use_rslora", self.use_rslora)
        check_bool(owner, "init_weights", self.init_weights)
        _check_targets(owner, self)
