"""What an adapter method is: which layer class holds its update, and how it reads and writes PEFT's
`adapter_config.json`; and LoRA's own. LoRA's layers live in layers.py; each other method is one short module
beside it that defines its Method; method_table.py lists them all (so no variant imports this module's users).

A method provides
  wrap(module) -> LoraLayer             the wrapper for one base module (raises AdapterError if unsupported)
  to_peft(config) -> dict               its own adapter_config.json keys (the common ones are in files.py)
  from_peft(raw) -> dict                LoraConfig values read back from those keys
  controller(lora, name, config)        optional: an object with regularization_loss() and
                                        after_optimizer_step(step) that the trainer calls (AdaLoRA's budget)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from loraforge.errors import AdapterFileError
from loraforge.lora.layers import wrap_module


@dataclass(frozen=True)
class Method:
    name: str
    peft_type: str
    wrap: Callable[[nn.Module], Any]
    to_peft: Callable[[Any], dict]
    from_peft: Callable[[dict], dict]
    controller: Callable[..., Any] | None = None


def _lora_to_peft(config) -> dict:
    return {
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_parameters": config.target_parameters or None,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        # Saved PiSSA adapters are already converted to plain LoRA on the original base (pissa.py).
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "bias": "none",
        "lora_bias": False,
    }


def _lora_from_peft(raw: dict) -> dict:
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith("pissa"):
        raise AdapterFileError(
            "this PiSSA adapter was saved without conversion, so it only works on its residual base model; save "
            "it from PEFT with save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a plain "
            "LoRA adapter for the original base"
        )
    for key, bad_values in {"bias": ("all", "lora_only"), "lora_bias": (True,), "layer_replication": None}.items():
        value = raw.get(key)
        if value and (bad_values is None or value in bad_values):
            raise AdapterFileError(f"{key}={value!r} is not supported by loraforge yet")
    return {
        "alpha": raw.get("lora_alpha", 8),
        "dropout": raw.get("lora_dropout", 0.0),
        "target_parameters": raw.get("target_parameters") or [],
        "use_rslora": bool(raw.get("use_rslora", False)),
        "use_dora": bool(raw.get("use_dora", False)),
        "init": "gaussian" if init == "gaussian" else "kaiming",
    }


LORA = Method("lora", "LORA", wrap_module, _lora_to_peft, _lora_from_peft)
