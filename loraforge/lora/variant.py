"""What a LoRA variant is: a small object per adapter of a LoraLinear that changes one thing about it.

    class LoraVariant(nn.Module)       every hook's default keeps plain LoRA: h = W0·x + s·B·A·x
      init(layer, name)                after A and B exist (PiSSA: start from W0's principal part)
      forward_term(layer, x, name, y0) what the adapter adds to the base output y0, or None for s·B·A·x
      merge / unmerge(layer, W, name)  the merged / unmerged weight, or None for W ± s·B·A
      file_tensors(layer, name)        extra PEFT tensors of the adapter ({"lora_magnitude_vector": m} for DoRA)
      as_plain_lora(layer, name, t)    (tensors, rank, alpha) of the adapter as plain LoRA for the original base,
                                       or None when it already is one (PiSSA: rank 2r)
      fusable / mixable                whether the fused node / a mixed-adapter batch can run it

A variant is an nn.Module, so what it learns (DoRA's magnitude) is a parameter of the layer like A and B. The
variants of one adapter come from its config (variants.py); layers.py only calls the hooks.
"""

from __future__ import annotations

import torch
from torch import nn


class LoraVariant(nn.Module):
    fusable = True
    mixable = True
    not_mixable_because = ""

    def init(self, layer, name: str) -> None:
        pass

    def forward_term(self, layer, x: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor | None:
        return None

    def merge(self, layer, weight: torch.Tensor, name: str) -> torch.Tensor | None:
        return None

    def unmerge(self, layer, weight: torch.Tensor, name: str) -> torch.Tensor | None:
        return None

    def file_tensors(self, layer, name: str) -> dict[str, torch.Tensor]:
        return {}

    def as_plain_lora(self, layer, name: str, tensors: dict[str, torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], int, float] | None:
        return None
