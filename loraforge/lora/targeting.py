"""Which modules and parameters an adapter config selects, with PEFT's matching rules.

- a list of names: a module matches when its full name equals an entry or ends with "." + entry;
- a string: a regex that must match the full module name;
- "all-linear": every Linear / GPT-2 Conv1D except the output head.
`layers_to_transform` then keeps modules whose first numbered path segment is one of the indices.
Names are the model's own (what `named_modules()` printed before any adapter was added).
"""

from __future__ import annotations

import functools
import importlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from loraforge.config import ALL_LINEAR, LoraConfig
from loraforge.errors import AdapterError
from loraforge.lora.layers import LINEAR_MODULES, SUPPORTED_MODULES, LoraLayer, ModulesToSave


@functools.cache
def transformers_classes(*names: tuple[str, str]) -> tuple[type, ...]:
    """The classes named (module, class) that this transformers has, for modules matched by class (fused MLPs,
    norms): a model it lacks has nothing to match."""
    classes = []
    for module_name, class_name in names:
        try:
            classes.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):
            continue
    return tuple(classes)


def base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) as the user's model names them: an existing LoRA wrapper stands for its base module."""

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            yield name, child
            if not isinstance(child, (LoraLayer, ModulesToSave)):
                yield from walk(child, name + ".")

    yield from walk(model, "")


def unwrap(module: nn.Module) -> nn.Module:
    """The original module under any number of LoRA wrappers."""
    while isinstance(module, LoraLayer):
        module = module.base_layer
    return module.original_module if isinstance(module, ModulesToSave) else module


def layer_index(name: str, layers_pattern: str | None) -> int | None:
    # The first numbered segment, not the last: "layers.1.mlp.experts.0" is layer 1 (PEFT does the same).
    if layers_pattern:
        match = re.match(rf"(?:^|.*?\.){re.escape(layers_pattern)}\.(\d+)(?:\.|$)", name)
    else:
        match = re.match(r".*?\.[^.]*\.(\d+)(?:\.|$)", name) or re.match(r"^[^.]*\.(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


def pattern_value(patterns: dict, name: str):
    """The value of the first pattern that matches the end of `name` (PEFT's rank_pattern rule), else None."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def _suffix_match(name: str, entries: list[str]) -> str | None:
    return next((e for e in entries if name == e or name.endswith("." + e)), None)


def _in_modules_to_save(name: str, config: LoraConfig) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in config.modules_to_save)


def _layer_allowed(name: str, config: LoraConfig) -> bool:
    if config.layers_to_transform is None:
        return True
    return layer_index(name, config.layers_pattern) in config.layers_to_transform


@dataclass
class Targets:
    modules: list[str]  # modules to wrap
    parameters: list[tuple[str, str]]  # (owner module, parameter name), in the owner's parameter order
    modules_to_save: list[str]


def find_targets(model: nn.Module, config: LoraConfig) -> Targets:
    """Resolve a config against a model. Errors when nothing matches; warns for list entries that match nothing."""
    modules = dict(base_modules(model))
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    selected: list[str] = []
    used_entries: set[str] = set()
    for name, module in modules.items():
        base = unwrap(module)
        if _in_modules_to_save(name, config) or not _layer_allowed(name, config):
            continue
        if config.targets == ALL_LINEAR:
            hit = isinstance(base, LINEAR_MODULES) and base is not output_head
        elif isinstance(config.targets, str):
            hit = re.fullmatch(config.targets, name) is not None
        else:
            entry = _suffix_match(name, config.targets)
            hit = entry is not None
            if hit:
                used_entries.add(entry)
        if not hit:
            continue
        if not isinstance(base, SUPPORTED_MODULES):
            if isinstance(config.targets, str):
                continue  # a regex may also match containers (e.g. "model.layers.0"); keep only what we can adapt
            raise AdapterError(
                f"target {name!r} is a {type(base).__name__}; LoRA supports Linear, GPT-2 Conv1D, Embedding and "
                "Conv2d modules (use target_parameters for expert tensors)"
            )
        selected.append(name)

    parameters = _find_parameters(modules, config)
    to_save = [n for n, m in modules.items() if _suffix_match(n, config.modules_to_save)]

    if isinstance(config.targets, list):
        for entry in config.targets:
            if entry not in used_entries:
                warnings.warn(f"LoRA target {entry!r} matches no module of this model", stacklevel=3)
    missing_saves = [m for m in config.modules_to_save if not any(_suffix_match(n, [m]) for n in to_save)]
    if missing_saves:
        raise AdapterError(f"modules_to_save {missing_saves} match no module of this model")
    if not selected and not parameters:
        raise AdapterError(
            f"LoRA targets {config.targets!r} / target_parameters {config.target_parameters} match no module of "
            f"{type(model).__name__}; module names look like {list(modules)[:6]}"
        )
    return Targets(selected, parameters, to_save)


def _find_parameters(modules: dict[str, nn.Module], config: LoraConfig) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    used: set[str] = set()
    for name, module in modules.items():
        owner = unwrap(module)
        if not config.target_parameters or not _layer_allowed(name, config):
            continue
        for param_name, _ in owner.named_parameters(recurse=False):
            entry = _suffix_match(f"{name}.{param_name}", config.target_parameters)
            if entry is not None:
                found.append((name, param_name))
                used.add(entry)
    unused = [e for e in config.target_parameters if e not in used]
    if unused:
        raise AdapterError(f"target_parameters {unused} match no parameter of this model")
    return found


def expanded_target_names(model: nn.Module, config: LoraConfig) -> list[str] | str:
    """target_modules for adapter_config.json: 'all-linear' is written as the last name segments it
    selected (as PEFT does), so that any tool re-selects exactly these modules."""
    if config.targets != ALL_LINEAR:
        return config.targets
    return sorted({name.rsplit(".", 1)[-1] for name in find_targets(model, config).modules})
