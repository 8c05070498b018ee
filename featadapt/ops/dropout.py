"""Dropout on the adapter path, defined by a seed instead of a stored mask.

The autograd Functions save the seed, not x̂ and not the mask: backward draws
the same mask again. Every backend that honours a seed must give the same mask
for the same (seed, shape, device), which is what lets the tests compare them.
"""

import torch


def draw_seed():
    """A fresh seed from torch's default generator, so torch.manual_seed repeats runs."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def keep_mask(shape, p, seed, device):
    """1.0 where an element is kept, 0.0 where dropped, float32, independent of dtype."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.empty(shape, dtype=torch.float32, device=device).bernoulli_(1.0 - p, generator=generator)


def apply_dropout(x, p, seed):
    """Inverted dropout of x with the mask of `seed`; also its own backward."""
    if p == 0.0:
        return x
    mask = keep_mask(x.shape, p, seed, x.device).to(x.dtype)
    return x * mask * (1.0 / (1.0 - p))
