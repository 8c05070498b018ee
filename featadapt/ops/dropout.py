"""Dropout on the adapter path, defined by a seed instead of a stored mask.

The autograd Functions save the seed, not x̂ and not the mask: backward draws
the same mask again. Every backend that honours a seed must give the same mask
for the same (seed, shape, device), which is what lets the tests compare them.

The mask is boolean (one byte an element): it is the tensor the fused dx
kernels read, so a float32 mask would cost four times the memory and traffic
(128 MB a layer at 8192×4096). It is drawn with torch's generator rather than
inside the kernels (Philox from the seed, no mask at all) because every
backend must draw the same mask, the torch backend included, and that one
generator is what all of them share.

Under torch.compile the mask is drawn inside a custom op
(featadapt::dropout_keep_mask): dynamo cannot trace a seeded torch.Generator,
an opaque op it can, and the op is still a pure function of (shape, p, seed,
device), so compiled and eager code draw the same mask for the same seed.
"""

from typing import Sequence

import torch


def draw_seed():
    """A fresh seed from torch's default generator, so torch.manual_seed repeats runs."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


# The dtype the kernels' ahead-of-time cases compile the mask as (jit/low_rank_gemm.py).
KEEP_MASK_DTYPE = torch.bool


def _draw_keep_mask(shape, p, seed, device):
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.empty(shape, dtype=KEEP_MASK_DTYPE, device=device).bernoulli_(1.0 - p, generator=generator)


@torch.library.custom_op("featadapt::dropout_keep_mask", mutates_args=())
def _keep_mask_op(shape: Sequence[int], p: float, seed: int, device: torch.device) -> torch.Tensor:
    return _draw_keep_mask(shape, p, seed, device)


@_keep_mask_op.register_fake
def _(shape, p, seed, device):
    return torch.empty(shape, dtype=KEEP_MASK_DTYPE, device=device)


def keep_mask(shape, p, seed, device):
    """True where an element is kept, False where dropped (boolean, whatever x's dtype)."""
    if torch.compiler.is_compiling():
        return _keep_mask_op(list(shape), float(p), seed, torch.device(device))
    # Eager skips the op's dispatch (about 20 µs a call); the mask is the same.
    return _draw_keep_mask(shape, p, seed, device)


def apply_dropout(x, p, seed):
    """Inverted dropout of x with the mask of `seed`; also its own backward."""
    if p == 0.0:
        return x
    mask = keep_mask(x.shape, p, seed, x.device).to(x.dtype)
    return x * mask * (1.0 / (1.0 - p))
