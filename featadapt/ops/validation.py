"""Argument checks for the functional API.

They run once, before dispatch, so every backend sees inputs of the same form
and every error names the argument, what was expected and what was given.
"""

import math
import numbers

import torch


def _shape(t):
    return tuple(t.shape)


def check_tensor(op, name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(
            f"{op}: {name} must have a floating dtype "
            f"(float16, bfloat16, float32 or float64), got {value.dtype}"
        )


def check_same_device(op, name, value, x):
    if value.device != x.device:
        raise ValueError(f"{op}: {name} must be on x's device {x.device}, got {value.device}")


def check_frozen_linear(op, x, weight, bias):
    """Checks x, weight (N, K) and bias (N,); returns (N, K)."""
    check_tensor(op, "x", x)
    check_tensor(op, "weight", weight)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension (..., K), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D (N, K), got shape {_shape(weight)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(
            f"{op}: x's last dimension must equal weight's in_features K={k}, "
            f"got x of shape {_shape(x)}"
        )
    check_same_device(op, "weight", weight, x)
    if weight.dtype != x.dtype:
        raise TypeError(
            f"{op}: weight must have x's dtype {x.dtype}, got {weight.dtype} "
            "(the frozen layer computes in the activation dtype; adapter parameters may differ)"
        )
    if bias is not None:
        check_tensor(op, "bias", bias)
        if _shape(bias) != (n,):
            raise ValueError(f"{op}: bias must have shape (N,) = ({n},), got {_shape(bias)}")
        check_same_device(op, "bias", bias, x)
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: bias must have x's dtype {x.dtype}, got {bias.dtype}")
    return n, k


def check_parameter(op, name, value, expected_shape, meaning, x):
    check_tensor(op, name, value)
    if _shape(value) != tuple(expected_shape):
        raise ValueError(
            f"{op}: {name} must have shape {meaning} = {tuple(expected_shape)}, got {_shape(value)}"
        )
    check_same_device(op, name, value, x)


def check_low_rank(op, x, weight, lora_A, lora_B, bias, b_rows):
    """Checks a LoRA/LoRFA call; lora_B must be (b_rows, r). Returns r."""
    n, k = check_frozen_linear(op, x, weight, bias)
    check_tensor(op, "lora_A", lora_A)
    if lora_A.dim() != 2 or lora_A.shape[1] != k:
        raise ValueError(f"{op}: lora_A must have shape (r, K) = (r, {k}), got {_shape(lora_A)}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"{op}: the rank r (lora_A's first dimension) must be >= 1, got {r}")
    check_same_device(op, "lora_A", lora_A, x)
    rows = {"N": n, "K": k}[b_rows]
    check_parameter(op, "lora_B", lora_B, (rows, r), f"({b_rows}, r)", x)
    return r


def check_scaling(op, scaling):
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) or not math.isfinite(scaling):
        raise ValueError(f"{op}: scaling must be a finite real number, got {scaling!r}")
    return float(scaling)


def check_dropout(op, name, p):
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
        raise ValueError(f"{op}: {name} must be a number in [0, 1), got {p!r}")
    return float(p)
