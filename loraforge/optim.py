"""Optimizer and learning-rate schedule for adapter training."""

from __future__ import annotations

import math

import torch

from loraforge.config import TrainConfig
from loraforge.lora import LoraModel

B_FACTOR_NAMES = (".lora_B.", ".lora_embedding_B.")


def parameter_groups(lora: LoraModel, config: TrainConfig, adapter: str | None = None) -> list[dict]:
    """Group "adapter" at `lr`: A factors and every other adapter tensor (DoRA magnitudes, LoHa/LoKr factors,
    modules_to_save copies); group "lora_B" at `lora.plus_ratio × lr` (LoRA+, Hayou et al. 2024: B sees a much
    larger effective learning rate at the optimum, ratio ~16). `adapter`: only that adapter's tensors (several
    adapters training on one base each have their own optimizer)."""
    own = None if adapter is None else {id(p) for p in lora.adapter_parameters(adapter)}
    a_params, b_params = [], []
    for name, param in lora.named_parameters():
        if param.requires_grad and (own is None or id(param) in own):
            (b_params if any(key in name + "." for key in B_FACTOR_NAMES) else a_params).append(param)
    groups = [{"params": a_params, "lr": config.lr, "name": "adapter"}]
    if b_params:
        groups.append({"params": b_params, "lr": config.lr * config.lora.plus_ratio, "name": "lora_B"})
    return groups


def build_optimizer(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over parameter groups (parameter_groups for an adapter; one group for a whole model)."""
    device = groups[0]["params"][0].device
    # The fused kernel does the whole update in one launch per group; CPU gained it in torch 2.4.
    fused = device.type in ("cuda", "cpu")
    try:
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(step: int, total: int, config: TrainConfig) -> float:
    """Multiplier of the peak lr at `step`: linear warmup, then cosine / linear / constant down to min_lr_ratio."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1 - progress
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))
