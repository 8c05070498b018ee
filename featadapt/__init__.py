"""featadapt: fused kernels for feature-space fine-tuning (VeFA, LoRFA) and the LoRA baseline."""

from .adapter_bank import add_named_adapter, load_named_adapters, named_adapters, remove_named_adapter, select_adapters
from .adapter_files import load_adapters, save_adapters
from .distributed import save_adapters_distributed
from .model import (
    inject,
    merge_adapters,
    print_trainable_parameters,
    trainable_parameters,
    unload,
    unmerge_adapters,
)
from .nn import LoRALinear, LoRFALinear, VeFALinear
from .ops import BackendUnavailableError, lora_linear, lorfa_linear, vefa_linear
from .self_check import check_backends
from .version import __version__

__all__ = [
    "__version__",
    "BackendUnavailableError",
    "LoRALinear",
    "LoRFALinear",
    "VeFALinear",
    "add_named_adapter",
    "check_backends",
    "inject",
    "load_adapters",
    "load_named_adapters",
    "lora_linear",
    "lorfa_linear",
    "merge_adapters",
    "named_adapters",
    "print_trainable_parameters",
    "remove_named_adapter",
    "save_adapters",
    "save_adapters_distributed",
    "select_adapters",
    "trainable_parameters",
    "unload",
    "unmerge_adapters",
    "vefa_linear",
]
