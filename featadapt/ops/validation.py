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


# -- many adapters in one batch (adapter_index=) --------------------------------


def check_adapter_index(op, adapter_index, x):
    """Checks the per-row adapter ids (shape x.shape[:-1], an integer dtype, x's
    device); returns them flattened to (M,) int64. Their range is checked by
    check_adapter_ids once the number of adapters is known."""
    if not isinstance(adapter_index, torch.Tensor):
        raise TypeError(f"{op}: adapter_index must be a torch.Tensor of integer ids, got {type(adapter_index).__name__}")
    if adapter_index.dtype == torch.bool or adapter_index.is_floating_point() or adapter_index.is_complex():
        raise TypeError(f"{op}: adapter_index must have an integer dtype (e.g. torch.int64), got {adapter_index.dtype}")
    if _shape(adapter_index) != _shape(x)[:-1]:
        raise ValueError(
            f"{op}: adapter_index must have x's leading shape x.shape[:-1] = {_shape(x)[:-1]} "
            f"(one id per row), got {_shape(adapter_index)}"
        )
    check_same_device(op, "adapter_index", adapter_index, x)
    return adapter_index.reshape(-1).to(torch.int64)


def check_adapter_ids(op, ids, n_adapters):
    """Every id in [-1, n_adapters): -1 is the base layer's output. Returns the
    one id every row has, when they all have the same, else None."""
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return None  # (a data-dependent check would break the graph; eager calls run it)
    if ids.device.type == "meta":
        raise ValueError(
            f"{op}: adapter_index must be a tensor with values (its ids choose each row's adapter), "
            "got a tensor on the meta device"
        )
    low, high = (int(v) for v in torch.aminmax(ids))
    if low < -1 or high >= n_adapters:
        bad = low if low < -1 else high
        raise ValueError(
            f"{op}: adapter_index must hold ids in [-1, {n_adapters - 1}] (-1: no adapter; "
            f"{n_adapters} adapter(s) given), got {bad}"
        )
    return low if low == high else None


def check_stacked_parameter(op, name, value, per_adapter_shape, meaning, x, n_adapters=None):
    """A parameter with a leading adapter dimension: (n, *per_adapter_shape). Returns n."""
    check_tensor(op, name, value)
    expected_n = "n" if n_adapters is None else n_adapters
    if value.dim() != 1 + len(per_adapter_shape) or _shape(value)[1:] != tuple(per_adapter_shape) or (
        n_adapters is not None and value.shape[0] != n_adapters
    ):
        shown = ", ".join(str(d) for d in (expected_n, *per_adapter_shape))
        raise ValueError(
            f"{op}: with adapter_index, {name} must have shape (n, {meaning}) = ({shown}), "
            f"one row per adapter, got {_shape(value)}"
        )
    if value.shape[0] < 1:
        raise ValueError(f"{op}: with adapter_index, {name} must hold at least one adapter, got shape {_shape(value)}")
    check_same_device(op, name, value, x)
    return value.shape[0]


def check_stacked_low_rank(op, x, weight, lora_A, lora_B, bias, b_rows):
    """Checks an indexed LoRA/LoRFA call: lora_A (n, r, K), lora_B (n, b_rows, r). Returns n."""
    n_out, k = check_frozen_linear(op, x, weight, bias)
    check_tensor(op, "lora_A", lora_A)
    if lora_A.dim() != 3 or lora_A.shape[2] != k or lora_A.shape[0] < 1 or lora_A.shape[1] < 1:
        raise ValueError(
            f"{op}: with adapter_index, lora_A must have shape (n, r, K) = (n, r, {k}) with n, r >= 1, "
            f"got {_shape(lora_A)}"
        )
    n, r = lora_A.shape[:2]
    check_same_device(op, "lora_A", lora_A, x)
    rows = {"N": n_out, "K": k}[b_rows]
    check_stacked_parameter(op, "lora_B", lora_B, (rows, r), f"{b_rows}, r", x, n_adapters=n)
    return n


def check_stacked_scaling(op, scaling, n_adapters, x):
    """A float for every adapter, or an (n,) tensor: returned as an (n,) tensor
    (float64 for float64 x, else float32) on x's device. Not differentiated."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not isinstance(scaling, torch.Tensor):
        return torch.full((n_adapters,), check_scaling(op, scaling), dtype=dtype, device=x.device)
    if not scaling.is_floating_point() or _shape(scaling) != (n_adapters,):
        raise ValueError(
            f"{op}: scaling must be a finite real number or a floating tensor of shape (n,) = ({n_adapters},), "
            f"got a {scaling.dtype} tensor of shape {_shape(scaling)}"
        )
    check_same_device(op, "scaling", scaling, x)
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(scaling).all()):
        raise ValueError(f"{op}: scaling must be finite, got {scaling.tolist()}")
    return scaling.detach().to(dtype)
