"""loraforge: LoRA fine-tuning — train, evaluate, merge and serve low-rank adapters."""

from loraforge.hardware import bound_onednn_caches

bound_onednn_caches()  # before any matmul of this process: oneDNN and ideep read their capacity once

from loraforge.config import LoraConfig
from loraforge.errors import (AdapterError, AdapterFileError, ConfigError, LoraforgeError, MergeError,
                              QuantizationError, TrainingError)
from loraforge.lora import DEFAULT_ADAPTER, LoraModel

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ADAPTER",
    "AdapterError",
    "AdapterFileError",
    "ConfigError",
    "LoraConfig",
    "LoraModel",
    "LoraforgeError",
    "MergeError",
    "QuantizationError",
    "TrainingError",
]
