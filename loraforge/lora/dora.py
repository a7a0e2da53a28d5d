"""DoRA (Liu et al. 2024): W = m · (W0 + s·B·A) / ‖W0 + s·B·A‖, the norm taken per output row.

The direction is LoRA's; a learned magnitude m (one number per output, PEFT key `lora_magnitude_vector`)
rescales it. As in the paper (§4.3) and PEFT, the norm is treated as a constant in backward, which saves
memory and barely changes the gradient. With y0 = W0·x (no bias) the layer adds
    (m/‖·‖ − 1)·y0 + (m/‖·‖)·s·B·A·x
to the base output, so a fresh adapter (B = 0, m = ‖W0‖) changes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.lora.variant import LoraVariant


def _rows_first(layer, weight: torch.Tensor) -> torch.Tensor:
    """The weight as (out, in) whatever the base layout (GPT-2 Conv1D stores (in, out))."""
    return weight.T if layer.fan_in_fan_out else weight


def _norm(layer, name: str, weight: torch.Tensor) -> torch.Tensor:
    """‖W + s·B·A‖ per output row, W in the base layout."""
    return _rows_first(layer, weight + layer.delta_weight(name).to(weight.dtype)).norm(dim=1)


class DoRA(LoraVariant):
    fusable = False  # the fused node computes s·B·A·x only
    mixable = False
    not_mixable_because = "DoRA adapters cannot run in mixed-adapter batches (their scale depends on the whole weight)"

    def __init__(self) -> None:
        super().__init__()
        self.magnitude: nn.Parameter | None = None
        self._merge_factor: torch.Tensor | None = None  # kept by merge so that unmerge can divide it out

    def init(self, layer, name: str) -> None:
        with torch.no_grad():
            weight = layer.dense_base_weight().to(layer.lora_A[name].weight.dtype)
            self.magnitude = nn.Parameter(_norm(layer, name, weight))

    def forward_term(self, layer, x: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor:
        a = layer.lora_A[name].weight
        weight = layer.dense_base_weight().to(a.dtype)
        with torch.no_grad():
            norm = _norm(layer, name, weight)
        scale = self.magnitude / norm
        dropped = layer._dropout(x.to(a.dtype), name)
        lora_out = layer.lora_B[name](layer.lora_A[name](dropped)) * layer.scaling[name]
        if layer.dropout_p[name] == 0 or not layer.training:
            bias = layer.base_layer.bias
            plain = base_out.to(a.dtype) - (bias.to(a.dtype) if bias is not None else 0)
        else:  # dropout changed the input: the rescaled base term must see the same input as B·A
            plain = F.linear(dropped, _rows_first(layer, weight))
        return ((scale - 1) * plain + scale * lora_out).to(base_out.dtype)

    def merge(self, layer, weight: torch.Tensor, name: str) -> torch.Tensor:
        """m · (W + ΔW) / ‖W + ΔW‖ in the base layout."""
        factor = self.magnitude.detach().to(weight.dtype) / _norm(layer, name, weight)
        self._merge_factor = factor[None, :] if layer.fan_in_fan_out else factor[:, None]
        return (weight + layer.delta_weight(name).detach().to(weight.dtype)) * self._merge_factor

    def unmerge(self, layer, weight: torch.Tensor, name: str) -> torch.Tensor:
        factor, self._merge_factor = self._merge_factor, None
        return weight / factor - layer.delta_weight(name).detach().to(weight.dtype)

    def file_tensors(self, layer, name: str) -> dict[str, torch.Tensor]:
        return {"lora_magnitude_vector": self.magnitude}
