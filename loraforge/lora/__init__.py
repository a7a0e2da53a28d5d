"""The LoRA core: layers and their math, targeting, the multi-adapter model, PEFT-format files."""

from loraforge.lora.layers import LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear, LoraParameter, ModulesToSave
from loraforge.lora.model import DEFAULT_ADAPTER, LoraModel

__all__ = [
    "DEFAULT_ADAPTER",
    "LoraConv2d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraModel",
    "LoraParameter",
    "ModulesToSave",
]
