"""What trains, behind one small protocol: a LoRA-family adapter on a frozen base, or the whole model.

The loop and the step see only this: the model to run, the parameter groups, an optional extra loss term,
a hook after each optimizer step, the tensors a checkpoint must hold for a step-exact resume, and the folder
a user gets at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from loraforge.attention import use_short_row_attention
from loraforge.config import TrainConfig
from loraforge.errors import TrainingError
from loraforge.hardware import frozen_storage_dtype
from loraforge.lora import DEFAULT_ADAPTER, LoraModel
from loraforge.lora.files import adapter_state
from loraforge.memory import release_checkpoint_mapping, store_embeddings_in
from loraforge.models import DEFAULT_MODEL_HUB_ID, enable_gradient_checkpointing, is_default_model
from loraforge.optim import parameter_groups
from loraforge.rms_norm import keep_rms_norm_outputs

CONTROLLER_PREFIX = "controller."


class Trainee(Protocol):
    model: nn.Module  # what the loss runs

    def trainable(self) -> Iterator[nn.Parameter]: ...
    def parameter_groups(self, config: TrainConfig) -> list[dict]: ...
    def extra_loss(self) -> torch.Tensor | None: ...
    def after_optimizer_step(self, step: int) -> None: ...
    def checkpoint_tensors(self) -> dict[str, torch.Tensor]: ...
    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor], where: Path) -> None: ...
    def save(self, directory: Path) -> None: ...
    def finish(self) -> list[str]: ...
    def describe(self) -> str: ...


def _copy_checked(live: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], where: Path) -> None:
    """Copy checkpoint tensors into live ones after checking that keys and shapes agree (errors name the tensor)."""
    missing, extra = sorted(live.keys() - saved.keys()), sorted(saved.keys() - live.keys())
    if missing or extra:
        raise TrainingError(f"{where}: checkpoint does not fit this run: missing {missing[:3]}, unexpected "
                            f"{extra[:3]}")
    for key, tensor in live.items():
        if saved[key].shape != tensor.shape:
            raise TrainingError(f"{where}: tensor {key!r} has shape {tuple(saved[key].shape)}, the run has "
                                f"{tuple(tensor.shape)}")
    with torch.no_grad():
        for key, tensor in live.items():
            tensor.copy_(saved[key])


class AdapterTrainee:
    """One trainable adapter of a LoraModel (any method: LoRA, DoRA, PiSSA, LoHa, LoKr, AdaLoRA, on a float or
    quantized base). Checkpoints hold its live tensors as they are (PiSSA's rank-r factors, not the rank-2r file
    form) and its method controller's state (AdaLoRA's sensitivities and allocation)."""

    def __init__(self, lora: LoraModel, name: str) -> None:
        self.lora, self.name = lora, name
        self.model = lora.model

    def trainable(self) -> Iterator[nn.Parameter]:
        return (p for p in self.lora.adapter_parameters(self.name) if p.requires_grad)

    def parameter_groups(self, config: TrainConfig) -> list[dict]:
        return parameter_groups(self.lora, config, self.name)

    def extra_loss(self) -> torch.Tensor | None:
        controller = self._controller()
        return controller.regularization_loss() if controller is not None else None

    def after_optimizer_step(self, step: int) -> None:
        controller = self._controller()
        if controller is not None:
            controller.after_optimizer_step(step)

    def _controller(self):
        return self.lora.controllers.get(self.name)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        tensors = dict(adapter_state(self.lora, self.name))
        controller = self._controller()
        if controller is not None:
            tensors.update({CONTROLLER_PREFIX + k: v for k, v in controller.state_tensors().items()})
        return tensors

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor], where: Path) -> None:
        controller = self._controller()
        if controller is not None:  # first: a pruned AdaLoRA adapter takes its final ranks before the copy
            controller.load_state_tensors({k.removeprefix(CONTROLLER_PREFIX): v for k, v in tensors.items()
                                           if k.startswith(CONTROLLER_PREFIX)})
        own = {k: v for k, v in tensors.items() if not k.startswith(CONTROLLER_PREFIX)}
        _copy_checked(adapter_state(self.lora, self.name), own, where)

    def save(self, directory: Path) -> None:
        self.lora.save(directory, adapter_names=[self.name])

    def finish(self) -> list[str]:
        controller = self._controller()
        return [controller.finish()] if controller is not None else []  # AdaLoRA: prune, report the ranks

    def describe(self) -> str:
        trainable, total = self.lora.trainable_parameters()
        config = self.lora.configs[self.name]
        rank = (f"ranks {config.adalora.init_r} → {config.adalora.target_r}" if config.method == "adalora"
                else f"r={config.r}")
        return (f"adapter: {config.method} {rank} on {sum(1 for _ in self.lora.lora_layers())} layers, "
                f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")


class FullModelTrainee:
    """finetune=full: every weight of the base trains; checkpoints hold every weight, the end writes a whole model
    folder (safetensors + tokenizer) that AutoModelForCausalLM.from_pretrained loads."""

    def __init__(self, model: nn.Module, tokenizer) -> None:
        self.model = model.requires_grad_(True)
        self.tokenizer = tokenizer

    def trainable(self) -> Iterator[nn.Parameter]:
        return (p for p in self.model.parameters() if p.requires_grad)

    def parameter_groups(self, config: TrainConfig) -> list[dict]:
        return [{"params": list(self.trainable()), "lr": config.lr, "name": "weights"}]

    def extra_loss(self) -> None:
        return None

    def after_optimizer_step(self, step: int) -> None:
        pass

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_parameters())  # tied weights appear once

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor], where: Path) -> None:
        _copy_checked(self.checkpoint_tensors(), tensors, where)

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def finish(self) -> list[str]:
        return []

    def describe(self) -> str:
        return f"full fine-tuning: {sum(p.numel() for p in self.trainable()):,} trainable parameters"


def build_trainee(config: TrainConfig, model: torch.nn.Module, tokenizer, steps: int,
                  amp_dtype: torch.dtype | None, say: Callable[[str], None]) -> Trainee:
    """What trains, as the config says: the adapter (or the whole model), gradient checkpointing, and the frozen
    weights' storage dtype (base_dtype), with the memory map of the checkpoint released. Attention in training
    takes the short-row path where it is the faster (a CPU, short rows; attention.py), sdpa elsewhere; an adapter's
    frozen RMSNorms keep their bf16 output for backward instead of their fp32 input (rms_norm.py)."""
    use_short_row_attention(model)
    if config.finetune == "full":
        trainee = FullModelTrainee(model, tokenizer)
    else:
        base_name = DEFAULT_MODEL_HUB_ID if is_default_model(config.model) else config.model
        lora_config = config.lora.model_copy(update={"base_model_name_or_path": base_name})
        if lora_config.method == "adalora" and lora_config.adalora.total_step is None:
            lora_config.adalora = lora_config.adalora.model_copy(update={"total_step": steps})
        lora = LoraModel(model, lora_config)
        lora.train()
        keep_rms_norm_outputs(model)
        trainee = AdapterTrainee(lora, DEFAULT_ADAPTER)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    storage = frozen_storage_dtype(config, amp_dtype)
    if storage is not None and isinstance(trainee, AdapterTrainee):
        saved = trainee.lora.store_frozen_weights(storage)
        # The embedding and head only in the dtype the run computes in: else every step would widen the head.
        embeddings = store_embeddings_in(model, storage) if storage == amp_dtype else 0
        release_checkpoint_mapping(model)  # else the fp32 file stays resident behind the norms' views
        if saved or embeddings:
            say(f"frozen weights kept in {str(storage).removeprefix('torch.')}: adapted layers' {saved / 2**20:,.0f} MB "
                f"saved" + (f", embedding and head's {embeddings / 2**20:,.0f} MB" if embeddings else ""))
    return trainee
