"""Functional ops, their backends and the dispatch between them."""

from .dispatch import (
    Backend,
    BackendUnavailableError,
    backends,
    get_backend,
    register_backend,
    select_backend,
)
from .functional import lora_linear, lorfa_linear, vefa_linear

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "backends",
    "get_backend",
    "register_backend",
    "select_backend",
    "lora_linear",
    "lorfa_linear",
    "vefa_linear",
]
