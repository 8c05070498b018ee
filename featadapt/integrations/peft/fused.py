"""featadapt's PEFT layers on nn.Linear and transformers' Conv1D: the forward
runs featadapt's fused ops (`vefa_linear`, `lorfa_linear`), so the backend
dispatch applies; mixed-adapter batches are one call with ``adapter_index``."""

import torch
from torch import nn

from ...nn.bases import LINEAR
from ...ops import lorfa_linear, vefa_linear
from ...ops.stacking import stack_low_rank, stack_vefa
from .configs import LoRFAConfig, VeFAConfig
from .layers import LoRFALayer, VeFALayer
from .mixed_batches import rows_index, shared_dropout


class VeFAPeftLinear(nn.Module, VeFALayer):
    """An nn.Linear or transformers' Conv1D with VeFA adapters (PEFT's tuner layer for VeFA)."""

    base_kinds = (LINEAR,)
    bases_wrapped = "an nn.Linear or transformers' Conv1D"

    def __init__(self, base_layer, adapter_name: str, config: VeFAConfig, **kwargs) -> None:
        super().__init__()
        VeFALayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x, *args, **kwargs):
        return self._feature_forward(x, *args, **kwargs)

    def _adapted_forward(self, x, adapters):
        scale, shift = self._composed(adapters)
        return vefa_linear(x, self._w0(), scale, self.base_layer.bias, shift, backend=self.backend)

    def _mixed_batch_forward(self, x, adapters, ids):
        scale, shift = stack_vefa([self.vefa_scale[name] for name in adapters],
                                  [self.vefa_shift[name] if name in self.vefa_shift else None for name in adapters])
        return vefa_linear(x, self._w0(), scale, self.base_layer.bias, shift,
                           adapter_index=rows_index(ids, x), backend=self.backend)

    def __repr__(self) -> str:
        return "vefa." + super().__repr__()


class LoRFAPeftLinear(nn.Module, LoRFALayer):
    """An nn.Linear or transformers' Conv1D with LoRFA adapters (PEFT's tuner layer for LoRFA)."""

    base_kinds = (LINEAR,)
    bases_wrapped = "an nn.Linear or transformers' Conv1D"

    def __init__(self, base_layer, adapter_name: str, config: LoRFAConfig, module_name: str = "", **kwargs) -> None:
        super().__init__()
        LoRFALayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name=module_name)

    def forward(self, x, *args, **kwargs):
        return self._feature_forward(x, *args, **kwargs)

    def _adapted_forward(self, x, adapters):
        A, B, scaling, p = self._factors(adapters)
        return lorfa_linear(
            x, self._w0(), A, B, self.base_layer.bias,
            scaling=scaling, dropout_p=p if self.training else 0.0, backend=self.backend,
        )

    def _mixed_batch_forward(self, x, adapters, ids):
        A, B = stack_low_rank([self.lorfa_A[name] for name in adapters], [self.lorfa_B[name] for name in adapters])
        scaling = torch.tensor([self.scaling[name] for name in adapters], device=x.device)
        p = shared_dropout("LoRFA", {name: self.lora_dropout[name] for name in adapters}) if self.training else 0.0
        return lorfa_linear(x, self._w0(), A, B, self.base_layer.bias, scaling=scaling, dropout_p=p,
                            adapter_index=rows_index(ids, x), backend=self.backend)

    def __repr__(self) -> str:
        return "lorfa." + super().__repr__()
