"""What every adapter layer is: the common base class, and the checks they share."""

import warnings

from torch import nn


class AdapterLayer(nn.Module):
    """An adapter around a frozen base layer (kept as ``.base_layer``).

    Every adapter layer has `method` ("vefa", "lorfa", "lora"), `merged`,
    `merge()`, `unmerge()` and `config()` (the keyword arguments that rebuild
    it), and its trainable tensors as its own parameters under the names the
    adapter files use (``scale``, ``shift``, ``lora_A``, ``lora_B``).
    `AdapterLinear` (nn.Linear and Conv1D bases, fused ops) and the black-box
    adapters (quantized linears, convolutions) are its two families.
    """

    method = None
    merged = False

    def _already(self, merged, operation):
        """Whether merge()/unmerge() finds nothing to do (the layer is already
        `merged`, or not), after warning so."""
        if self.merged != merged:
            return False
        state = "already merged" if merged else "not merged"
        warnings.warn(f"{type(self).__name__}.{operation}(): {state}; nothing to do", stacklevel=3)
        return True


TORCH_ONLY_BACKENDS = (None, "auto", "torch")


def check_torch_only_backend(owner, backend):
    """Adapters on black-box bases compute with torch ops around the base's own
    forward: a fused backend asked for by name cannot run there."""
    if backend not in TORCH_ONLY_BACKENDS:
        raise ValueError(
            f"{owner}: backend={backend!r} cannot run here: adapters on quantized and convolution bases "
            f"compute with torch ops around the base layer's own forward; use backend=None or 'torch'"
        )
    return backend
