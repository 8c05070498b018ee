"""Adapter modules that wrap a frozen nn.Linear."""

from .layers import ADAPTER_CLASSES, AdapterLinear, LoRALinear, LoRFALinear, VeFALinear

__all__ = ["ADAPTER_CLASSES", "AdapterLinear", "LoRALinear", "LoRFALinear", "VeFALinear"]
