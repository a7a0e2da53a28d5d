"""Adapter folders in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor keys are `base_model.model.<module path>.<PEFT name>` with the adapter name left out
(`…q_proj.lora_A.weight`, `…embed_tokens.lora_embedding_A`, `…experts.base_layer.lora_B.weight`,
`…lm_head.weight` for a modules_to_save copy). Only safetensors are read: a pickle can run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

from loraforge.atomic import write_file, write_text
from loraforge.config import LoraConfig, parse_section
from loraforge.errors import AdapterFileError, ConfigError
from loraforge.lora.layers import LoraLayer, LoraLinear, ModulesToSave
from loraforge.lora.method_table import method, method_for_peft_type
from loraforge.lora.targeting import expanded_target_names

if TYPE_CHECKING:
    from loraforge.lora.model import LoraModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
KEY_PREFIX = "base_model.model."


def adapter_state(lora: LoraModel, name: str) -> dict[str, torch.Tensor]:
    """The adapter's live parameters under their file keys."""
    state: dict[str, torch.Tensor] = {}
    for module_name, module in lora.wrappers():
        if isinstance(module, LoraLayer) and name in module.ranks:
            for key, tensor in module.peft_tensors(name).items():
                state[f"{KEY_PREFIX}{module_name}.{key}"] = tensor
        elif isinstance(module, ModulesToSave) and name in module.modules_to_save:
            for key, tensor in module.modules_to_save[name].state_dict(keep_vars=True).items():
                state[f"{KEY_PREFIX}{module_name}.{key}"] = tensor
    return state


# -- config <-> adapter_config.json ---------------------------------------------------------------
def to_peft_config(lora: LoraModel, name: str) -> dict:
    """adapter_config.json: the keys every PEFT method shares, then the method's own (methods.py)."""
    config = lora.configs[name]
    uses_conv1d = any(
        isinstance(layer, LoraLinear) and isinstance(layer.base_layer, Conv1D) and name in layer.ranks
        for _, layer in lora.lora_layers()
    )
    model_class = type(lora.model).__name__
    common = {
        "peft_type": method(config.method).peft_type,
        "task_type": "CAUSAL_LM" if model_class.endswith("ForCausalLM") else None,
        "base_model_name_or_path": config.base_model_name_or_path,
        "r": config.r,
        "target_modules": expanded_target_names(lora.model, config),
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": config.layers_pattern,
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "modules_to_save": config.modules_to_save or None,
        "inference_mode": True,
    }
    if config.method in ("lora", "adalora"):  # PEFT's LoHa/LoKr configs have no such key
        common["fan_in_fan_out"] = uses_conv1d
    return {**common, **method(config.method).to_peft(config)}


def from_peft_config(raw: dict, where: Path) -> LoraConfig:
    """Our LoraConfig from a PEFT adapter_config.json; refuses what we would silently get wrong."""
    adapter_method = method_for_peft_type(raw.get("peft_type", "LORA"), where)
    common = {
        "method": adapter_method.name,
        "r": raw.get("r", 8),
        "targets": raw.get("target_modules") or [],  # None / []: only target_parameters
        "layers_to_transform": _as_list(raw.get("layers_to_transform")),
        "layers_pattern": _first(raw.get("layers_pattern")),
        "rank_pattern": raw.get("rank_pattern") or {},
        "alpha_pattern": raw.get("alpha_pattern") or {},
        "modules_to_save": raw.get("modules_to_save") or [],
        "base_model_name_or_path": raw.get("base_model_name_or_path"),
    }
    if adapter_method.name == "adalora":
        del common["r"]  # PEFT writes its unused default; our AdaLoRA config refuses an r it would not read
    try:
        values = {**common, **adapter_method.from_peft(raw)}
    except AdapterFileError as exc:
        raise AdapterFileError(f"{where / CONFIG_FILE}: {exc}") from None
    try:
        return parse_section(LoraConfig, values, where=str(where / CONFIG_FILE))
    except ConfigError as exc:
        raise AdapterFileError(str(exc)) from None


def _as_list(value):
    return [value] if isinstance(value, int) else value


def _first(value):
    return value[0] if isinstance(value, list) and value else (value or None)


# -- save / load ---------------------------------------------------------------------------------
def save_adapter(lora: LoraModel, name: str, directory: Path) -> None:
    """Write one adapter. Files are written under temporary names and renamed, so a crash never leaves
    a half-written adapter where a complete one was."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state(lora, name)
    peft_config = to_peft_config(lora, name)
    tensors, peft_config = _as_plain_lora(lora, name, tensors, peft_config)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    write_file(directory / WEIGHTS_FILE, lambda path: save_file(tensors, str(path), metadata={"format": "pt"}))
    write_text(directory / CONFIG_FILE, json.dumps(peft_config, indent=2, sort_keys=True) + "\n")


def _as_plain_lora(lora: LoraModel, name: str, tensors: dict, peft_config: dict) -> tuple[dict, dict]:
    """The adapter as plain LoRA for the original base where a variant says it is not one as it stands (PiSSA:
    rank 2r, see pissa.py); rank and alpha of each converted module go into rank_pattern / alpha_pattern under
    its full name."""
    tensors = dict(tensors)
    rank_pattern, alpha_pattern = {}, {}  # full names first: the first matching pattern wins
    for module_name, layer in lora.lora_layers():
        if name not in layer.ranks:
            continue
        prefix = f"{KEY_PREFIX}{module_name}."
        for variant in layer.variants(name):
            own = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            plain = variant.as_plain_lora(layer, name, own)
            if plain is not None:
                converted, rank_pattern[module_name], alpha_pattern[module_name] = plain
                tensors.update({prefix + k: v for k, v in converted.items()})
    if not rank_pattern:
        return tensors, peft_config
    return tensors, {**peft_config, "rank_pattern": {**rank_pattern, **peft_config["rank_pattern"]},
                     "alpha_pattern": {**alpha_pattern, **peft_config["alpha_pattern"]}}


def read_adapter_files(directory: Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    if not directory.is_dir():
        raise AdapterFileError(f"adapter folder {directory} does not exist")
    weights = directory / WEIGHTS_FILE
    if not weights.exists():
        pickles = [p for p in PICKLE_FILES if (directory / p).exists()]
        if pickles:
            raise AdapterFileError(
                f"{directory / pickles[0]} is a pickle, and loading a pickle can run arbitrary code, so loraforge "
                f"never does. Convert it where you trust it: PeftModel.from_pretrained(...).save_pretrained(dir, "
                f"safe_serialization=True) writes {WEIGHTS_FILE}."
            )
        raise AdapterFileError(f"{directory} has no {WEIGHTS_FILE}")
    config_path = directory / CONFIG_FILE
    try:
        raw = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise AdapterFileError(f"{directory} has no {CONFIG_FILE}") from None
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{config_path} is not valid JSON: {exc}") from None
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise AdapterFileError(f"{weights} is not a readable safetensors file: {exc}") from None
    return from_peft_config(raw, directory), tensors


def load_adapter(lora: LoraModel, directory: Path, name: str, trainable: bool = False) -> None:
    """Add adapter `name` from a folder. Any mismatch raises AdapterFileError naming the tensor, and the
    model is left exactly as it was."""
    config, tensors = read_adapter_files(directory)
    lora.add_adapter(name, config, trainable=trainable)
    try:
        copy_adapter_tensors(adapter_state(lora, name), tensors, config, directory)
    except Exception:
        lora.delete_adapter(name)
        raise


def copy_adapter_tensors(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], config: LoraConfig,
                         directory: Path) -> None:
    """Copy file tensors into the live adapter, after checking every key and shape (errors name the tensor)."""
    for key in found:
        if key in expected:
            continue
        if key.endswith(".base_layer.weight"):
            continue  # PEFT also saves targeted embedding matrices; the frozen base stays ours
        raise AdapterFileError(
            f"{directory / WEIGHTS_FILE}: tensor {key!r} does not belong to any adapted module of this model "
            f"(targets {config.targets!r}); is this adapter for another base model?"
        )
    missing = [key for key in expected if key not in found]
    if missing:
        raise AdapterFileError(f"{directory / WEIGHTS_FILE}: missing tensor(s) {missing[:5]}")
    for key, param in expected.items():
        tensor = found[key]
        if tensor.shape != param.shape:
            hint = ""
            if "lora_A" in key or "lora_embedding_A" in key:
                hint = f" (rank {tensor.shape[0]} in the file, {param.shape[0]} from adapter_config.json)"
            raise AdapterFileError(
                f"{directory / WEIGHTS_FILE}: tensor {key!r} has shape {tuple(tensor.shape)} but the model "
                f"expects {tuple(param.shape)}{hint}"
            )
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(found[key])
