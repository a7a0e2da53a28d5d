"""loraforge: LoRA fine-tuning — train, evaluate, merge and serve low-rank adapters."""

from loraforge.runtime import bound_onednn_caches

bound_onednn_caches()  # before any matmul of this process: oneDNN and ideep read their capacity once

from loraforge.config import LoraConfig
from loraforge.errors import (AdapterError, AdapterFileError, ConfigError, LoraforgeError, MergeError,
                              QuantizationError, TrainingError)

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


def __getattr__(name: str) -> object:
    # What needs torch loads when first asked for: `loraforge train` settles its process (runtime.py) before torch.
    if name in ("LoraModel", "DEFAULT_ADAPTER"):
        from loraforge import lora

        return getattr(lora, name)
    raise AttributeError(f"module 'loraforge' has no attribute {name!r}")
