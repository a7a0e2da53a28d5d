"""Quantized frozen bases (QLoRA): placeholder for the bitsandbytes integration."""

from __future__ import annotations

import torch
from torch import nn


def dequantized_weight(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A module's weight as a float tensor: unchanged when it already is one, dequantized when 4/8-bit."""
    if weight.is_floating_point():
        return weight
    import bitsandbytes as bnb

    if isinstance(weight, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    raise NotImplementedError(f"cannot dequantize a {type(weight).__name__}")
