"""Mixed-adapter batches (``adapter_names=[...]``): PEFT's semantics and errors,
one adapter name per sequence, computed in one batched call per layer."""

import contextvars

import torch

BASE_NAME = "__base__"  # PEFT's name for "no adapter" in adapter_names

# The adapter_names of the model call running in this thread (or asyncio task),
# as {id(module): names} for the modules of that model. PEFT hands them to the
# layers with forward hooks on the shared modules, which a concurrent call would
# overwrite; a ContextVar keeps each call's own names. (Keyed by id(), as
# featadapt.nn.layers.SELECTED_ADAPTERS, for torch.compile.)
CALL_ADAPTER_NAMES = contextvars.ContextVar("featadapt_peft_adapter_names", default=None)


def call_adapter_names(module):
    """The adapter_names of the current model call for `module`, or None."""
    names = CALL_ADAPTER_NAMES.get()
    return None if names is None else names.get(id(module))


def check_mixed_batch_args(layer, x, adapter_names):
    """PEFT's own checks and errors for adapter_names at a layer (LoRA's _check_forward_args)."""
    if len(x) != len(adapter_names):
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(adapter_names)} and {len(x)} respectively."
        )
    if layer.merged:
        raise ValueError(
            "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
        )


def mixed_batch_ids(x, adapter_names, adapters_here):
    """(the adapters this layer runs, in order of first use; one id per sequence,
    shape (len(x),)) for one name per sequence, or None when no sequence uses one
    of `adapters_here`. "__base__" and names this layer lacks get id -1 (the
    base layer), as in PEFT."""
    slots = {}
    for name in adapter_names:
        if name != BASE_NAME and name in adapters_here and name not in slots:
            slots[name] = len(slots)
    if not slots:
        return None
    return list(slots), torch.tensor([slots.get(name, -1) for name in adapter_names], device=x.device)


def rows_index(ids, x):
    """One id per sequence expanded to adapter_index of shape x.shape[:-1], one
    per row of a linear input (..., K), as the ops take it."""
    return ids.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])


def mixed_batch_rows(x, adapter_names, adapters_here):
    """As `mixed_batch_ids`, with the ids as `rows_index` gives them."""
    found = mixed_batch_ids(x, adapter_names, adapters_here)
    if found is None:
        return None
    adapters, ids = found
    return adapters, rows_index(ids, x)


def shared_dropout(method, ps):
    """The one dropout p of adapters that run in one call (a single mask over x)."""
    if len(set(ps.values())) > 1:
        raise ValueError(f"{method}: adapters that run in one call must share lora_dropout to train, got {ps}")
    return next(iter(ps.values()))
