"""Adapter modules: on a frozen nn.Linear or Conv1D (fused ops), and on
quantized linears and convolutions (called as black boxes)."""

from .adapter import AdapterLayer
from .black_box import BLACK_BOX_CLASSES, BlackBoxAdapter, LoRABlackBox, LoRFABlackBox, VeFABlackBox
from .layers import ADAPTER_CLASSES, AdapterLinear, LoRALinear, LoRFALinear, VeFALinear

__all__ = [
    "ADAPTER_CLASSES", "AdapterLayer", "AdapterLinear", "BLACK_BOX_CLASSES", "BlackBoxAdapter",
    "LoRABlackBox", "LoRALinear", "LoRFABlackBox", "LoRFALinear", "VeFABlackBox", "VeFALinear",
]
