"""The functional API: check the arguments, honour autocast, pick a backend,
flatten x to (M, K) and give the result back with x's leading dimensions."""

import contextlib
import math

import torch

from . import validation
from .dispatch import choose
from .dropout import draw_seed

_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_dtype(x):
    """The dtype autocast would run a linear layer in for x, or None when it is off."""
    if not isinstance(x, torch.Tensor):
        return None
    try:
        if not torch.is_autocast_enabled(x.device.type):
            return None
        return torch.get_autocast_dtype(x.device.type)
    except RuntimeError:  # a device type autocast does not know
        return None


def _autocast(x, weight, bias):
    """Under autocast the frozen linear runs in autocast's dtype, as F.linear
    would; adapter parameters keep theirs."""
    dtype = _autocast_dtype(x)
    if dtype is None:
        return x, weight, bias, False

    def cast(t):
        if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_ELIGIBLE and t.dtype != dtype:
            return t.to(dtype)
        return t

    return cast(x), cast(weight), cast(bias), True


def _dispatch(op, backend, autocasting, x, weight, bias, params, extra=()):
    # Only the floating tensors decide the backend: integer ids and the
    # scaling vector are on x's device and every kernel takes them.
    chosen = choose(op, (x, weight, bias, *params), backend)
    # M spelled out: reshape(-1, K) is ambiguous for K = 0, where y is the bias, as F.linear gives
    x2d = x.reshape(math.prod(x.shape[:-1]), weight.shape[1])
    # The backend runs with autocast off, so its forward and backward see the
    # dtypes that were checked.
    no_autocast = torch.autocast(x.device.type, enabled=False) if autocasting else contextlib.nullcontext()
    with no_autocast:
        y = chosen.ops[op](x2d, weight, bias, *params, *extra)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def vefa_linear(x, weight, scale, bias=None, shift=None, *, adapter_index=None, backend=None):
    """VeFA: ``y = (x ⊙ scale + shift) weightᵀ + bias``.

    x is (..., K), weight (N, K) and frozen, bias (N,), scale and shift (K,).
    Gradients flow to x, scale and shift (and to weight and bias if they
    require grad). The result has x's dtype.

    Many adapters in one batch: with ``adapter_index`` (integer ids of shape
    x.shape[:-1]), scale and shift are (n, K), one row per adapter, and row i
    of x uses adapter ``adapter_index[i]``; id -1 gives the base layer's output.
    """
    op = "vefa_linear"
    x, weight, bias, autocasting = _autocast(x, weight, bias)
    _, k = validation.check_frozen_linear(op, x, weight, bias)
    if adapter_index is not None:
        ids = validation.check_adapter_index(op, adapter_index, x)
        n = validation.check_stacked_parameter(op, "scale", scale, (k,), "K", x)
        if shift is not None:
            validation.check_stacked_parameter(op, "shift", shift, (k,), "K", x, n_adapters=n)
        same = validation.check_adapter_ids(op, ids, n)
        if same is not None and same >= 0:  # one adapter for every row: the single-adapter op
            shift = None if shift is None else shift[same]
            return _dispatch("vefa", backend, autocasting, x, weight, bias, (scale[same], shift))
        return _dispatch("vefa_indexed", backend, autocasting, x, weight, bias, (scale, shift), (ids,))
    validation.check_parameter(op, "scale", scale, (k,), "(K,)", x)
    if shift is not None:
        validation.check_parameter(op, "shift", shift, (k,), "(K,)", x)
    return _dispatch("vefa", backend, autocasting, x, weight, bias, (scale, shift))


def _low_rank(op, name, b_rows, x, weight, lora_A, lora_B, bias, scaling, dropout_p, adapter_index, backend):
    x, weight, bias, autocasting = _autocast(x, weight, bias)
    dropout_p = validation.check_dropout(name, "dropout_p", dropout_p)
    if adapter_index is not None:
        ids = validation.check_adapter_index(name, adapter_index, x)
        n = validation.check_stacked_low_rank(name, x, weight, lora_A, lora_B, bias, b_rows)
        same = validation.check_adapter_ids(name, ids, n)
        scaling = validation.check_stacked_scaling(name, scaling, n, x)
        seed = draw_seed() if dropout_p > 0.0 else 0
        if same is not None and same >= 0:  # one adapter for every row: the single-adapter op
            return _dispatch(op, backend, autocasting, x, weight, bias, (lora_A[same], lora_B[same]),
                             (float(scaling[same]), dropout_p, seed))
        return _dispatch(op + "_indexed", backend, autocasting, x, weight, bias, (lora_A, lora_B),
                         (scaling, ids, dropout_p, seed))
    validation.check_low_rank(name, x, weight, lora_A, lora_B, bias, b_rows)
    scaling = validation.check_scaling(name, scaling)
    seed = draw_seed() if dropout_p > 0.0 else 0
    return _dispatch(op, backend, autocasting, x, weight, bias, (lora_A, lora_B), (scaling, dropout_p, seed))


_INDEXED_LOW_RANK_DOC = """
    Many adapters in one batch: with ``adapter_index`` (integer ids of shape
    x.shape[:-1]), lora_A is (n, r, K) and lora_B ({b_shape}), one adapter per
    leading index, scaling a float or an (n,) tensor (not differentiated), and
    row i of x uses adapter ``adapter_index[i]``; id -1 gives the base layer's
    output. Dropout (one p for all) draws one mask over x.
"""


def lorfa_linear(x, weight, lora_A, lora_B, bias=None, *, scaling=1.0, dropout_p=0.0, adapter_index=None,
                 backend=None):
    """LoRFA: ``u = x̂ lora_Aᵀ``, ``x̃ = x + scaling · u lora_Bᵀ``, ``y = x̃ weightᵀ + bias``.

    x is (..., K), weight (N, K) and frozen, lora_A (r, K), lora_B (K, r).
    ``x̂`` is x after dropout with probability dropout_p (applied whenever
    dropout_p > 0; modules pass 0 in eval mode). The result has x's dtype.
    """
    return _low_rank("lorfa", "lorfa_linear", "K", x, weight, lora_A, lora_B, bias, scaling, dropout_p,
                     adapter_index, backend)


lorfa_linear.__doc__ += _INDEXED_LOW_RANK_DOC.format(b_shape="n, K, r")


def lora_linear(x, weight, lora_A, lora_B, bias=None, *, scaling=1.0, dropout_p=0.0, adapter_index=None,
                backend=None):
    """LoRA: ``u = x̂ lora_Aᵀ``, ``y = x weightᵀ + bias + scaling · u lora_Bᵀ``.

    x is (..., K), weight (N, K) and frozen, lora_A (r, K), lora_B (N, r).
    ``x̂`` is x after dropout with probability dropout_p (applied whenever
    dropout_p > 0; modules pass 0 in eval mode). The result has x's dtype.
    """
    return _low_rank("lora", "lora_linear", "N", x, weight, lora_A, lora_B, bias, scaling, dropout_p,
                     adapter_index, backend)


lora_linear.__doc__ += _INDEXED_LOW_RANK_DOC.format(b_shape="n, N, r")
