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

    Gradients flow to x, scale and shift (and to weight and bias if they
    require grad). x may be float32, float16, bfloat16 or float64, with any
    number of leading dimensions and any strides; the adapter parameters may
    have another floating dtype (float32 on bfloat16 activations is the common
    case). Under ``torch.autocast`` the frozen matmul runs in autocast's dtype,
    as ``F.linear`` would.

    Args:
        x: the input, ``(..., K)``.
        weight: the frozen weight ``W0``, ``(N, K)``.
        scale: the per-feature scale ``s``, ``(K,)``; ``(n, K)`` with ``adapter_index``.
        bias: the frozen bias, ``(N,)``, or None.
        shift: the per-feature shift ``t``, like `scale`, or None.
        adapter_index: many adapters in one batch: integer ids of shape
            ``x.shape[:-1]``, row i of x using adapter ``adapter_index[i]`` (a
            row of `scale` and `shift`); id -1 gives the base layer's output.
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or ``"reference"``;
            None: the ``FEATADAPT_BACKEND`` environment variable, else automatic.

    Returns:
        torch.Tensor: ``(..., N)``, in x's dtype.

    Raises:
        ValueError: a wrong shape, device or id (the message names the
            argument, the expected and the actual value).
        TypeError: a wrong dtype or argument type.
        BackendUnavailableError: a backend asked for by name cannot run this call.

    Example:
        >>> x, weight = torch.randn(4, 16), torch.randn(32, 16)
        >>> featadapt.vefa_linear(x, weight, torch.ones(16)).shape
        torch.Size([4, 32])
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


_LOW_RANK_DOC = """

    Gradients flow to x, lora_A and lora_B (and to weight and bias if they
    require grad). Dtypes, strides, leading dimensions and autocast as for
    `vefa_linear`.

    Args:
        x: the input, ``(..., K)``.
        weight: the frozen weight ``W0``, ``(N, K)``.
        lora_A: ``(r, K)``; ``(n, r, K)`` with ``adapter_index``.
        lora_B: ``({b_rows}, r)``; ``(n, {b_rows}, r)`` with ``adapter_index``.
        bias: the frozen bias, ``(N,)``, or None.
        scaling: ``γ`` (``alpha / r`` in the modules); with ``adapter_index``
            also an ``(n,)`` tensor (not differentiated).
        dropout_p: the dropout probability of ``x̂``, applied whenever it is
            above 0 (the modules pass 0 in eval mode).
        adapter_index: many adapters in one batch: integer ids of shape
            ``x.shape[:-1]``, row i of x using adapter ``adapter_index[i]``;
            id -1 gives the base layer's output. Dropout draws one mask over x.
        backend: as for `vefa_linear`.

    Returns:
        torch.Tensor: ``(..., N)``, in x's dtype.

    Raises:
        ValueError: a wrong shape, rank, device, id or dropout probability
            (the message names the argument, the expected and the actual value).
        TypeError: a wrong dtype or argument type.
        BackendUnavailableError: a backend asked for by name cannot run this call.
"""


def lorfa_linear(x, weight, lora_A, lora_B, bias=None, *, scaling=1.0, dropout_p=0.0, adapter_index=None,
                 backend=None):
    """LoRFA: ``u = x̂ lora_Aᵀ``, ``x̃ = x + scaling · u lora_Bᵀ``, ``y = x̃ weightᵀ + bias``."""
    return _low_rank("lorfa", "lorfa_linear", "K", x, weight, lora_A, lora_B, bias, scaling, dropout_p,
                     adapter_index, backend)


lorfa_linear.__doc__ += _LOW_RANK_DOC.format(b_rows="K")


def lora_linear(x, weight, lora_A, lora_B, bias=None, *, scaling=1.0, dropout_p=0.0, adapter_index=None,
                backend=None):
    """LoRA: ``u = x̂ lora_Aᵀ``, ``y = x weightᵀ + bias + scaling · u lora_Bᵀ``."""
    return _low_rank("lora", "lora_linear", "N", x, weight, lora_A, lora_B, bias, scaling, dropout_p,
                     adapter_index, backend)


lora_linear.__doc__ += _LOW_RANK_DOC.format(b_rows="N")
