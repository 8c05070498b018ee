"""featadapt's PEFT layers on bases the fused ops cannot read: quantized
linears (bitsandbytes 4-bit and 8-bit, torchao weight-only) and
nn.Conv1d/2d/3d. The base is called as a black box on the transformed input
(DESIGN.md §1, "Other frozen bases"), over the input channels:

- VeFA:  ``base(x ⊙ s + t)``;
- LoRFA: ``base(x + γ · (x̂ Aᵀ) Bᵀ)``.

The adapters compute with torch ops (`set_backend` leaves these layers
alone), and a quantized weight is never dequantized per step. Merging is
in `layers.FeatureAdapterLayer`: exact for a convolution, re-quantizing (only
when asked) for a quantized base.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ...nn.bases import CONV, QUANTIZED
from ...nn.input_channels import channel_dim, channel_linear, scaled_input
from ...ops.stacking import stack_vefa
from .configs import LoRFAConfig, VeFAConfig
from .layers import LoRFALayer, VeFALayer


def _per_sequence(rows, x, spatial_dims):
    """(len(x), C) rows shaped to broadcast over x: (N, 1.., C) for a linear input,
    (N, C, 1..) for a convolution's."""
    middle = x.dim() - spatial_dims - 2
    return rows.view((rows.shape[0],) + (1,) * middle + (rows.shape[1],) + (1,) * spatial_dims)


class _BlackBoxModule(nn.Module):
    """The forward and checks both black-box layers share."""

    def forward(self, x, *args, **kwargs):
        return self._feature_forward(x, *args, **kwargs)

    def _check_input(self, x):
        dim = channel_dim(x, self.spatial_dims)
        if dim < 0 or x.shape[dim] != self.in_features:
            what = "(N, C, *spatial) or (C, *spatial)" if self.spatial_dims else "(..., in_features)"
            raise ValueError(
                f"{type(self).__name__}: x must be {what} with {self.in_features} input channels, "
                f"got shape {tuple(x.shape)}"
            )

    def _channel_linear(self, x, matrix):
        return channel_linear(x, matrix.to(x.dtype), channel_dim(x, self.spatial_dims))


class VeFAPeftBlackBox(_BlackBoxModule, VeFALayer):
    """A quantized linear or a convolution with VeFA adapters (PEFT's tuner layer for VeFA)."""

    base_kinds = (QUANTIZED, CONV)
    bases_wrapped = "a quantized linear or an nn.Conv1d/2d/3d"

    def __init__(self, base_layer, adapter_name: str, config: VeFAConfig, **kwargs) -> None:
        super().__init__()
        VeFALayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _adapted_forward(self, x, adapters):
        self._check_input(x)
        scale, shift = self._composed(adapters)
        return self.base_layer(scaled_input(x, scale, shift, self.spatial_dims))

    def _mixed_batch_forward(self, x, adapters, ids):
        self._check_input(x)
        scale, shift = stack_vefa([self.vefa_scale[name] for name in adapters],
                                  [self.vefa_shift[name] if name in self.vefa_shift else None for name in adapters])
        # id -1 (the base) picks the appended identity row
        scale = torch.cat([scale, scale.new_ones(1, scale.shape[1])])[ids]
        out = x * _per_sequence(scale, x, self.spatial_dims)
        if shift is not None:
            shift = torch.cat([shift, shift.new_zeros(1, shift.shape[1])])[ids]
            out = out + _per_sequence(shift, x, self.spatial_dims)
        return self.base_layer(out.to(x.dtype))

    def __repr__(self) -> str:
        return "vefa." + super().__repr__()


class LoRFAPeftBlackBox(_BlackBoxModule, LoRFALayer):
    """A quantized linear or a convolution with LoRFA adapters (PEFT's tuner layer for LoRFA)."""

    base_kinds = (QUANTIZED, CONV)
    bases_wrapped = "a quantized linear or an nn.Conv1d/2d/3d"

    def __init__(self, base_layer, adapter_name: str, config: LoRFAConfig, module_name: str = "", **kwargs) -> None:
        super().__init__()
        LoRFALayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name=module_name)

    def _delta(self, x, A, B, scaling, p):
        x_hat = F.dropout(x, p, training=True) if self.training and p > 0 else x
        return scaling * self._channel_linear(self._channel_linear(x_hat, A), B)

    def _adapted_forward(self, x, adapters):
        self._check_input(x)
        A, B, scaling, p = self._factors(adapters)
        return self.base_layer(x + self._delta(x, A, B, scaling, p))

    def _mixed_batch_forward(self, x, adapters, ids):
        self._check_input(x)
        delta = torch.zeros_like(x)
        for i, name in enumerate(adapters):
            rows = ids == i
            if rows.any():
                delta[rows] = self._delta(x[rows], self.lorfa_A[name], self.lorfa_B[name], self.scaling[name], 0.0)
        return self.base_layer(x + delta)

    def __repr__(self) -> str:
        return "lorfa." + super().__repr__()
