"""A model with named LoRA adapters: add, activate, mix per row, merge, unload, save and load.

    lora = LoraModel(model, LoraConfig(r=16, targets="all-linear"))   # adapter "default", active
    lora.print_trainable_parameters()
    logits = lora(input_ids).logits
    lora.save("out/")                                                  # PEFT format
    plain = lora.merge_and_unload()                                    # a plain transformers model

The base model is modified in place (its target modules are wrapped) and every base parameter is
frozen. `LoraModel` is itself an `nn.Module` whose `model` attribute is the wrapped model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from loraforge.config import LoraConfig, unread_options
from loraforge.errors import AdapterError, MergeError
from loraforge.lora.fused_mlp import install_fused_mlps, remove_fused_mlps
from loraforge.lora.layers import LoraLayer, LoraLinear, LoraParameter, ModulesToSave, RowAdapters
from loraforge.lora.method_table import method
from loraforge.lora.targeting import base_modules, find_targets, pattern_value, unwrap
from loraforge.lora.variants import variants_for
from loraforge.memory import narrow_in_place

DEFAULT_ADAPTER = "default"
class LoraModel(nn.Module):
    def __init__(self, model: nn.Module, config: LoraConfig | None = None, adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        self.model = model
        self.configs: dict[str, LoraConfig] = {}
        # Per-adapter training hooks of methods that have them (AdaLoRA's rank budget).
        self.controllers: dict[str, object] = {}
        self.train(model.training)
        for param in model.parameters():
            param.requires_grad_(False)
        if config is not None:
            self.add_adapter(adapter_name, config)

    # -- adapters --------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: LoraConfig, trainable: bool = True) -> None:
        """Add an adapter (A random, B zero: the model's output is unchanged). It becomes active when no
        other adapter is active; otherwise call `set_active`."""
        if name in self.configs:
            raise AdapterError(f"adapter {name!r} already exists; delete_adapter() it first or pick another name")
        if not name or "." in name:
            raise AdapterError(f"adapter name {name!r} must be non-empty and contain no '.'")
        if config.target_parameters and config.method != "lora":
            raise AdapterError(f"target_parameters (expert tensors) take method=lora only, not {config.method}")
        for key, reason in unread_options(config):  # also for configs made by model_copy, which skips validation
            raise AdapterError(f"{key}: {reason}")
        targets = find_targets(self.model, config)
        self.configs[name] = config
        try:
            for module_name in targets.modules:
                self._wrapper_for(module_name, config).add_adapter(name, **self._layer_options(config, module_name))
            for owner, param_name in targets.parameters:
                layer = self._parameter_wrapper_for(owner, param_name)
                layer.add_adapter(name, **self._layer_options(config, f"{owner}.{param_name}"))
            for module_name in targets.modules_to_save:
                module = self.model.get_submodule(module_name)
                if not isinstance(module, ModulesToSave):
                    module = ModulesToSave(module).train(module.training)
                    self.model.set_submodule(module_name, module)
                module.add_adapter(name)
        except Exception:
            self.delete_adapter(name)
            raise
        for param in self.adapter_parameters(name):
            param.requires_grad_(trainable)
        make_controller = method(config.method).controller
        if make_controller is not None and trainable:
            self.controllers[name] = make_controller(self, name, config)
        if not self.active_adapters:
            self.set_active(name)
        else:
            self._broadcast(active_adapters=self.active_adapters)
        install_fused_mlps(self.model)  # each falls back to its own forward when not fusable

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter; wrappers left with no adapter are replaced by their base module."""
        # Innermost first, so that nested parameter wrappers unwrap from the inside out.
        for module_name, module in reversed(list(self.wrappers())):
            module.delete_adapter(name)
            empty = not (module.ranks if isinstance(module, LoraLayer) else module.modules_to_save)
            if empty:
                base = module.original_module if isinstance(module, ModulesToSave) else module.base_layer
                self.model.set_submodule(module_name, base)
        self.configs.pop(name, None)
        self.controllers.pop(name, None)
        if name in self.active_adapters:  # what was active stays so, less the deleted one
            self._active = tuple(n for n in self.active_adapters if n != name)
            self._broadcast(active_adapters=self._active)

    @staticmethod
    def _layer_options(config: LoraConfig, name: str) -> dict:
        default_r = config.adalora.init_r if config.method == "adalora" else config.r
        r = pattern_value(config.rank_pattern, name)
        r = default_r if r is None else r  # 0 is a rank too: AdaLoRA prunes some modules away entirely
        alpha = pattern_value(config.alpha_pattern, name) or config.alpha
        return dict(r=r, alpha=alpha, config=config)

    def _wrapper_for(self, module_name: str, config: LoraConfig) -> LoraLayer:
        module = self.model.get_submodule(module_name)
        wrap = method(config.method).wrap
        if not isinstance(module, LoraLayer):
            module = wrap(module).train(module.training)  # a wrapper inherits train/eval mode
            self.model.set_submodule(module_name, module)
        elif type(module) is not type(wrap(unwrap(module))):
            raise AdapterError(
                f"{module_name} already holds {type(module).__name__} adapters; one model holds adapters of one "
                f"method per module (this one is {config.method}). Use a second LoraModel for the other method."
            )
        return module

    def _parameter_wrapper_for(self, owner_name: str, param_name: str) -> LoraParameter:
        # Nested wrappers, one per parameter, the first parameter innermost (PEFT's layout and file keys).
        outer = self.model.get_submodule(owner_name)
        layer = outer
        while isinstance(layer, LoraParameter):
            if layer.parameter_name == param_name:
                return layer
            layer = layer.base_layer
        wrapper = LoraParameter(outer, param_name).train(outer.training)
        self.model.set_submodule(owner_name, wrapper)
        return wrapper

    def wrappers(self) -> Iterator[tuple[str, LoraLayer | ModulesToSave]]:
        """Every LoRA wrapper with its module path (outermost first for nested parameter wrappers)."""
        for name, module in self.model.named_modules():
            if isinstance(module, (LoraLayer, ModulesToSave)):
                yield name, module

    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        for name, module in self.wrappers():
            if isinstance(module, LoraLayer):
                yield name, module

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """Every trainable tensor of one adapter (factors and modules_to_save copies)."""
        params = []
        for _, module in self.wrappers():
            if isinstance(module, LoraLayer) and name in module.ranks:
                params.extend(module.peft_tensors(name).values())
            elif isinstance(module, ModulesToSave) and name in module.modules_to_save:
                params.extend(module.modules_to_save[name].parameters())
        return params

    # -- which adapters run ----------------------------------------------------------------------
    @property
    def active_adapters(self) -> tuple[str, ...]:
        return getattr(self, "_active", ())

    def set_active(self, names: str | Sequence[str]) -> None:
        """One adapter, several (their updates add up), or none (an empty list: the base model)."""
        names = (names,) if isinstance(names, str) else tuple(names)
        self._check_known(names)
        self._active = names
        self._broadcast(active_adapters=names)

    @contextlib.contextmanager
    def using(self, names: str | Sequence[str] | None) -> Iterator[None]:
        """Run with these adapters active inside the block (None or an empty list: the base model); the previous
        active set comes back on exit."""
        previous = self.active_adapters
        self.set_active(() if names is None else names)
        try:
            yield
        finally:
            self.set_active(previous)

    def disable_adapters(self) -> contextlib.AbstractContextManager[None]:
        """Run the base model inside the block; the previous active set comes back on exit."""
        return self.using(())

    @contextlib.contextmanager
    def mixed_batch(self, per_row: Sequence[str | None]) -> Iterator[None]:
        """Row i of every forward inside the block uses adapter per_row[i] (None: the base model).
        One batched pass; in training, each row's gradient reaches only its own adapter."""
        self._check_known([n for n in per_row if n is not None])
        plan = RowAdapters.from_names(per_row, device=self._device())
        self._broadcast(row_adapters=plan)
        replaced = self._replay_plan_when_recomputing(plan)
        try:
            yield
        finally:
            self._broadcast(row_adapters=None)
            for module, original in replaced:
                module._gradient_checkpointing_func = original

    def _replay_plan_when_recomputing(self, plan: RowAdapters) -> list[tuple[nn.Module, object]]:
        """Gradient checkpointing runs a layer's forward again inside backward(), after this block has exited:
        each checkpointed layer (transformers calls its `_gradient_checkpointing_func(forward, *args)`) gets a
        forward that sets the row plan itself, so the recomputation routes rows as the forward did."""
        replaced = []
        if not torch.is_grad_enabled():  # no backward, no recomputation (serving: every decode step comes here)
            return replaced
        for module in self.model.modules():
            original = getattr(module, "_gradient_checkpointing_func", None)
            if original is None or not getattr(module, "gradient_checkpointing", False):
                continue

            def checkpointed(function, *args, _original=original, **kwargs):
                def under_plan(*inner, **inner_kwargs):
                    previous = next((m.row_adapters for _, m in self.wrappers()), None)
                    self._broadcast(row_adapters=plan)
                    try:
                        return function(*inner, **inner_kwargs)
                    finally:
                        self._broadcast(row_adapters=previous)

                return _original(under_plan, *args, **kwargs)

            module._gradient_checkpointing_func = checkpointed
            replaced.append((module, original))
        return replaced

    def mixed_batch_refusal(self, name: str) -> str | None:
        """Why adapter `name` cannot take rows of its own in a mixed batch, or None when it can (every method and
        layer type can, but DoRA, whose scale depends on the whole weight, and adapted expert tensors, which would
        need a weight per token). The layers raise the same at forward time (from the same variant objects); this
        says it before."""
        config = self.configs[name]
        for variant in variants_for(config):
            if not variant.mixable:
                return variant.not_mixable_because
        if config.target_parameters:
            return "it adapts expert tensors directly (target_parameters), which would need a weight per token"
        return None

    def _check_known(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self.configs]
        if unknown:
            raise AdapterError(f"unknown adapter(s) {unknown}; this model has {sorted(self.configs)}")

    def _broadcast(self, **state) -> None:
        for _, module in self.wrappers():
            for key, value in state.items():
                setattr(module, key, value)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- running ---------------------------------------------------------------------------------
    def forward(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with self.mixed_batch(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        # generate() expands every prompt into num_beams × num_return_sequences rows, next to each other.
        copies = max(kwargs.get("num_beams", 1), kwargs.get("num_return_sequences", 1))
        with self.mixed_batch([name for name in adapter_names for _ in range(copies)]):
            return self.model.generate(*args, **kwargs)

    # -- merge -----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: Sequence[str] | None = None, safe: bool = True) -> None:
        """Fold adapters (default: the active ones) into the base weights: same outputs, no extra latency.
        With `safe`, every merged weight is computed and checked for NaN/inf before any is written."""
        names = list(self.active_adapters if names is None else names)
        self._check_known(names)
        layers = list(self.lora_layers())
        self._refuse_tied_weights(layers)
        if safe:
            for module_name, layer in layers:
                layer.check_mergeable(names, where=module_name)
        for module_name, layer in layers:
            layer.merge(names, safe=False, where=module_name)

    def _refuse_tied_weights(self, layers: list[tuple[str, LoraLayer]]) -> None:
        # GPT-2 and many small models share the input embedding with the output head; folding an embedding
        # adapter into that one tensor would change the head too, so merged != unmerged.
        names_of: dict[int, list[str]] = {}
        for param_name, param in self.model.named_parameters(remove_duplicate=False):
            names_of.setdefault(id(param), []).append(param_name)
        for module_name, layer in layers:
            sharing = names_of.get(id(layer.base_weight), [])
            if len(sharing) > 1:
                raise MergeError(
                    f"the weight of {module_name} is shared with {[n for n in sharing if not n.startswith(module_name)]}"
                    "; merging would change those too. Keep this adapter unmerged, or untie the weights "
                    "(tie_word_embeddings=False) before adding it."
                )

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged adapter again: the base weights come back (to fp32 rounding)."""
        for _, layer in self.lora_layers():
            layer.unmerge()

    def merge_and_unload(self, names: Sequence[str] | None = None, safe: bool = True) -> nn.Module:
        """Merge, then remove every LoRA module: returns the plain model (modules_to_save: the active copy)."""
        self.merge(names, safe=safe)
        return self._unwrap_all(keep_merged=True)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging (merged ones are subtracted first): returns the base model."""
        self.unmerge()
        return self._unwrap_all(keep_merged=False)

    def _unwrap_all(self, keep_merged: bool) -> nn.Module:
        remove_fused_mlps(self.model)
        for module_name, module in list(base_modules(self.model)):
            if isinstance(module, ModulesToSave):
                self.model.set_submodule(module_name, module.active_module() if keep_merged else module.original_module)
            elif isinstance(module, LoraLayer):
                self.model.set_submodule(module_name, unwrap(module))
        self.configs.clear()
        self._active = ()
        return self.model

    # -- training hooks --------------------------------------------------------------------------
    def regularization_loss(self) -> torch.Tensor | None:
        """Extra loss terms of the trainable adapters' methods (AdaLoRA's orthogonality), or None."""
        terms = [c.regularization_loss() for c in self.controllers.values()]
        terms = [t for t in terms if t is not None]
        return sum(terms) if terms else None

    def after_optimizer_step(self, step: int) -> None:
        """Called by the trainer after each optimizer step, gradients still present (AdaLoRA's rank budget)."""
        for controller in self.controllers.values():
            controller.after_optimizer_step(step)

    # -- reporting -------------------------------------------------------------------------------
    @torch.no_grad()
    def store_frozen_weights(self, dtype: torch.dtype) -> int:
        """Keep the frozen float weights of adapted Linear/Conv1D layers in `dtype` (e.g. bf16 under fp32 compute:
        the layers widen them per use). Returns the bytes saved."""
        saved = 0
        for _, layer in self.lora_layers():
            if not isinstance(layer, LoraLinear):
                continue
            weight = layer.base_weight
            if weight.is_floating_point() and not weight.requires_grad and weight.dtype != dtype:
                saved += narrow_in_place(weight, dtype)
        return saved

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> str:
        trainable, total = self.trainable_parameters()
        line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
        print(line)
        return line

    # -- files -----------------------------------------------------------------------------------
    def save(self, directory: str | Path, adapter_names: Sequence[str] | None = None) -> None:
        """Write adapters in PEFT's format: 'default' at the top, every other adapter in a subfolder."""
        from loraforge.lora.files import save_adapter

        for name in adapter_names or list(self.configs):
            save_adapter(self, name, Path(directory) if name == DEFAULT_ADAPTER else Path(directory) / name)

    def load_adapter(self, directory: str | Path, name: str = DEFAULT_ADAPTER, trainable: bool = False) -> None:
        """Add an adapter from a PEFT-format folder (ours or PEFT's), validated tensor by tensor."""
        from loraforge.lora.files import load_adapter

        load_adapter(self, Path(directory), name, trainable=trainable)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, directory: str | Path, name: str = DEFAULT_ADAPTER, trainable: bool = False
    ) -> LoraModel:
        lora = cls(model)
        lora.load_adapter(directory, name, trainable=trainable)
        return lora
