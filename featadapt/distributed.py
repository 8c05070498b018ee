"""Adapters under torch.distributed: save from one rank what the ranks hold.

Under DistributedDataParallel every rank holds the whole adapters, and
`featadapt.save_adapters` on one rank is enough. Under FSDP2 (`fully_shard`)
each rank holds a shard of every parameter, adapters included: the adapter
tensors (never the frozen base weights) must be gathered, by all ranks
together, before one rank writes them. `save_adapters_distributed` does both
and works for either engine, or with no process group at all.

Loading needs nothing from here: `featadapt.load_adapters` on every rank reads
the files, and on sharded adapters each rank keeps its own shard.
"""

import torch
import torch.distributed as dist

from .adapter_files import _is_dtensor, _saved_layers, write_adapter_files


def gather_adapter_tensors(model):
    """{"<module>.<parameter>": full tensor on CPU} for every adapter parameter.

    A collective when adapters are sharded (DTensors): every rank must call it.
    Only adapter parameters are gathered, one all-gather each.
    """
    tensors = {}
    with torch.no_grad():
        for name, layer in _saved_layers(model, "gather_adapter_tensors"):
            for pname, param in layer.named_parameters(recurse=False):
                full = param.full_tensor() if _is_dtensor(param) else param.detach()
                tensors[f"{name}.{pname}"] = full.to("cpu").contiguous()
    return tensors


def save_adapters_distributed(model, path, *, rank=0):
    """Save `model`'s adapters into the directory `path`, written by `rank` alone.

    Every rank must call it (it gathers the sharded adapter tensors, never the
    frozen weights); it returns once the files are written, so any rank may then
    `load_adapters` them. Without an initialized process group it is
    `save_adapters`.

    Args:
        model: a model with adapters, plain, under DDP or sharded by FSDP2.
        path: the directory to write, on a file system every loading rank sees.
        rank: the rank that writes.

    Raises:
        ValueError: `rank` is not a rank of the process group.
    """
    initialized = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if initialized else 1
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"save_adapters_distributed: rank must be an integer in [0, {world_size}), got {rank!r}")
    layers = _saved_layers(model, "save_adapters_distributed")
    tensors = gather_adapter_tensors(model)
    if not initialized or dist.get_rank() == rank:
        write_adapter_files(layers, tensors, path)
    if initialized:
        dist.barrier()
